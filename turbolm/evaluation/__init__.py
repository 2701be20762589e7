"""Zero-shot evaluation on local benchmark files in lm-evaluation-harness conventions (``turbolm eval``)."""

from .harness import Scorer, evaluate, evaluate_task, hf_logits_fn, rolling_windows
from .run import EvalConfig, markdown_table, run_eval
from .tasks import DEFAULT_TASKS, TASKS, Task, load_task, load_task_file

__all__ = ["DEFAULT_TASKS", "TASKS", "EvalConfig", "Scorer", "Task", "evaluate", "evaluate_task", "hf_logits_fn",
           "load_task", "load_task_file", "markdown_table", "rolling_windows", "run_eval"]
