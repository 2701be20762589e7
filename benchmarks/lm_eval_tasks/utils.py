"""Helpers for the custom lm-eval tasks in this folder (read by lm-eval, not by turbolm).

The local files are llm-foundry's copies of the benchmarks; these functions turn them back into
lm-eval's own prompts. HellaSwag is preprocessed by lm-eval's own ``process_docs``.
"""

from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401


def question_answer(doc):
    """PIQA / ARC: lm-eval's "Question: {q}\\nAnswer:" from the local "Question: {q}" (PIQA's ends in a newline)."""
    q = doc["query"].rstrip("\n")
    return q if q.rstrip().endswith("Answer:") else q + "\nAnswer:"


def boolq_text(doc):
    """BoolQ: lm-eval's "{passage}\\nQuestion: {q}?\\nAnswer:" from the local "Passage: {passage}\\nQuestion: {q}?"."""
    q = doc["query"]
    q = q[len("Passage: "):] if q.startswith("Passage: ") else q
    q = q.rstrip("\n")
    return q if q.rstrip().endswith("Answer:") else q + "\nAnswer:"


# WinoGrande in lm-eval's "multiple input" form: the text is the gold index, the choices are the contexts,
# the target is the shared continuation.
def winogrande_text(doc):
    return int(doc["gold"])


def winogrande_choices(doc):
    return list(doc["context_options"])


def winogrande_target(doc):
    return doc["continuation"]
