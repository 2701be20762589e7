"""Zero-shot evaluation on local benchmark files in lm-evaluation-harness conventions (``turbolm eval``)."""

from .harness import Scorer, evaluate, evaluate_task, hf_logits_fn, rolling_windows
from .tasks import DEFAULT_TASKS, TASKS, Task, load_task, load_task_file

__all__ = ["DEFAULT_TASKS", "TASKS", "Scorer", "Task", "evaluate", "evaluate_task", "hf_logits_fn", "load_task",
           "load_task_file", "rolling_windows"]
