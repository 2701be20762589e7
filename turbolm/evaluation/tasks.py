"""Zero-shot evaluation tasks read from local files, formatted as lm-evaluation-harness formats them.

Every task becomes a list of text requests; :mod:`turbolm.evaluation.harness` tokenizes and scores
them. Three kinds of task:

``choice``
    multiple choice: each item has one ``(context, continuation)`` pair per option and a gold
    index. The option with the highest summed log-prob of its continuation wins (``acc``); with
    ``acc_norm`` the sum is divided by the option's length in characters (lm-eval: the choice text
    without the leading delimiter space).
``loglikelihood``
    one ``(context, continuation)`` pair per item (LAMBADA): ``acc`` = the greedy continuation is
    the target; ``ppl`` = exp(-mean summed log-prob per item), lm-eval's ``perplexity``.
``rolling``
    whole documents scored token by token in sliding windows (WikiText-2): token-, word- and
    byte-level perplexity.

Prompt formats (lm-eval's, with the target delimiter " " before every continuation):

=================  ======================================================================
piqa, arc_*        ``"Question: {question}\\nAnswer:"`` + ``" " + choice``; the local rows hold
                   ``"Question: {question}"`` (PIQA's with a trailing newline, dropped)
boolq              ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` + ``" no"`` / ``" yes"``
winogrande         each ``context_option`` + ``" " + continuation`` (partial scoring)
hellaswag          ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`` +
                   ``" " + preprocess(ending)``
mmlu, mmlu_5shot   ``"The following are multiple choice questions (with answers) about
                   {subject}.\\n\\n"`` [+ the first 5 dev examples, each ``"{q}\\nA. ..\\nD.
                   ..\\nAnswer: {letter}\\n\\n"``] + ``"{q}\\nA. ..\\nD. ..\\nAnswer:"`` and
                   the choices ``" A"`` .. ``" D"``
lambada            ``context`` + ``" " + continuation``
--task-file FILE   MC rows: the ``query`` exactly as written + ``" " + choice``;
                   WinoGrande-style rows are scored as winogrande
=================  ======================================================================
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..core.errors import ParameterError, TurboLMError

DEFAULT_DATA_DIR = Path("..") / "shared" / "data"
TARGET_DELIMITER = " "  # lm-eval's target_delimiter: between a context and every continuation


@dataclass
class ChoiceItem:
    """One multiple-choice question: option ``i`` is scored as ``continuations[i]`` after ``contexts[i]``."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    # characters per option for acc_norm (lm-eval: len(choice) without the delimiter); None: no acc_norm
    norm_lengths: list[int] | None = None
    group: str | None = None  # MMLU's subject


@dataclass
class ContinuationItem:
    context: str
    continuation: str


@dataclass
class Document:
    """A document for rolling perplexity: ``text`` is scored; ``words`` / ``bytes`` count the raw text."""

    text: str
    words: int
    bytes: int


@dataclass
class Task:
    name: str
    kind: str  # "choice" | "loglikelihood" | "rolling"
    source: str  # the file or folder the items came from
    items: list = field(default_factory=list)
    prompt: str = ""  # the prompt format, in one line, for the report

    def __len__(self) -> int:
        return len(self.items)


# --- reading files with errors that name the file and line ---------------------------------------


def _check_file(path: Path, task: str) -> Path:
    if not path.exists():
        raise ParameterError(f"{task}: data file not found: {path} (give {{}} DIR, or {{}} {task}=FILE)", "data_dir", "task_paths")
    if not path.is_file():
        raise TurboLMError(f"{task}: {path} is not a file")
    return path


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) for every non-blank line; TurboLMError on a line that is not a JSON object."""
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise TurboLMError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TurboLMError(f"{path}, line {lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise TurboLMError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def _where(path: Path, lineno: int) -> str:
    return f"{path}, line {lineno}"


def _get(row: dict, key: str, kind, where: str):
    if key not in row:
        raise TurboLMError(f"{where}: missing field '{key}' (has: {', '.join(sorted(row)) or 'nothing'})")
    value = row[key]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TurboLMError(f"{where}: field '{key}' must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise TurboLMError(f"{where}: field '{key}' must be an integer, got {value!r}") from None
    if kind is str:
        if not isinstance(value, str):
            raise TurboLMError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
        return value
    if kind is list:  # a list of non-empty strings
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise TurboLMError(f"{where}: field '{key}' must be a non-empty list of strings")
        if not all(v.strip() for v in value):
            raise TurboLMError(f"{where}: field '{key}' holds an empty string")
        return value
    raise AssertionError(kind)


def _gold(row: dict, n: int, where: str, key: str = "gold") -> int:
    gold = _get(row, key, int, where)
    if not 0 <= gold < n:
        raise TurboLMError(f"{where}: '{key}' is {gold} but there are {n} options (0..{n - 1})")
    return gold


def _nonempty(task: Task, limit: int | None) -> Task:
    if not task.items:
        raise TurboLMError(f"{task.name}: {task.source} holds no items")
    if limit is not None:
        task.items = task.items[:limit]
    return task


# --- multiple choice: {"query","choices","gold"} -------------------------------------------------


def _as_is(query: str) -> str:
    return query


def question_answer_prompt(query: str) -> str:
    """lm-eval's PIQA / ARC prompt ``"Question: {q}\\nAnswer:"`` from a local ``"Question: {q}"`` row."""
    q = query.rstrip("\n")
    return q if q.rstrip().endswith("Answer:") else q + "\nAnswer:"


def boolq_prompt(query: str) -> str:
    """lm-eval's BoolQ prompt ``"{passage}\\nQuestion: {q}?\\nAnswer:"`` from ``"Passage: {passage}\\nQuestion: {q}?"``."""
    q = query[len("Passage: "):] if query.startswith("Passage: ") else query
    q = q.rstrip("\n")
    return q if q.rstrip().endswith("Answer:") else q + "\nAnswer:"


def load_multiple_choice(path, name: str, limit: int | None = None,
                         prompt: Callable[[str], str] = _as_is, prompt_doc: str = "query + ' ' + choice") -> Task:
    """``{"query","choices","gold"}`` rows (also WinoGrande-style ``{"context_options","continuation","gold"}``
    rows, told apart per row)."""
    path = _check_file(Path(path), name)
    task = Task(name, "choice", str(path), prompt=prompt_doc)
    for lineno, row in _read_jsonl(path):
        if limit is not None and len(task.items) >= limit:
            break
        where = _where(path, lineno)
        if "context_options" in row and "query" not in row:
            task.items.append(_winogrande_item(row, where))
            task.prompt = "context_option + ' ' + continuation (partial scoring)"
            continue
        query = _get(row, "query", str, where)
        choices = _get(row, "choices", list, where)
        gold = _gold(row, len(choices), where)
        context = prompt(query)
        task.items.append(ChoiceItem(
            contexts=[context] * len(choices),
            continuations=[TARGET_DELIMITER + c for c in choices],
            gold=gold,
            norm_lengths=[len(c) for c in choices],
        ))
    return _nonempty(task, limit)


# --- WinoGrande: {"context_options","continuation","gold"} ---------------------------------------


def _winogrande_item(row: dict, where: str) -> ChoiceItem:
    options = _get(row, "context_options", list, where)
    continuation = _get(row, "continuation", str, where)
    if not continuation.strip():
        raise TurboLMError(f"{where}: field 'continuation' is empty")
    gold = _gold(row, len(options), where)
    # lm-eval's "multiple input" form: the shared continuation after each context; acc only
    return ChoiceItem(contexts=list(options), continuations=[TARGET_DELIMITER + continuation] * len(options),
                      gold=gold, norm_lengths=None)


def load_winogrande(path, name: str = "winogrande", limit: int | None = None) -> Task:
    path = _check_file(Path(path), name)
    task = Task(name, "choice", str(path), prompt="context_option + ' ' + continuation (partial scoring)")
    for lineno, row in _read_jsonl(path):
        if limit is not None and len(task.items) >= limit:
            break
        task.items.append(_winogrande_item(row, _where(path, lineno)))
    return _nonempty(task, limit)


# --- HellaSwag (original schema) -----------------------------------------------------------------


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag clean-up (the brackets are WikiHow artefacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def load_hellaswag(path, name: str = "hellaswag", limit: int | None = None) -> Task:
    path = _check_file(Path(path), name)
    task = Task(name, "choice", str(path),
                prompt="preprocess(activity_label + ': ' + ctx_a + ' ' + ctx_b.capitalize()) + ' ' + preprocess(ending)")
    for lineno, row in _read_jsonl(path):
        if limit is not None and len(task.items) >= limit:
            break
        where = _where(path, lineno)
        ctx = _get(row, "ctx_a", str, where) + " " + _get(row, "ctx_b", str, where).capitalize()
        query = hellaswag_preprocess(_get(row, "activity_label", str, where) + ": " + ctx)
        endings = [hellaswag_preprocess(e) for e in _get(row, "endings", list, where)]
        if not all(endings):
            raise TurboLMError(f"{where}: an ending is empty after lm-eval's clean-up")
        gold = _gold(row, len(endings), where, key="label")
        task.items.append(ChoiceItem(contexts=[query] * len(endings),
                                     continuations=[TARGET_DELIMITER + e for e in endings],
                                     gold=gold, norm_lengths=[len(e) for e in endings]))
    return _nonempty(task, limit)


# --- MMLU: CSV per subject -----------------------------------------------------------------------

MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
MMLU_LETTERS = ["A", "B", "C", "D"]


def _read_mmlu_csv(path: Path) -> list[tuple[str, list[str], int]]:
    try:
        f = open(path, encoding="utf-8", newline="")
    except OSError as e:
        raise TurboLMError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise TurboLMError(f"{path}: empty file (expected the header {','.join(MMLU_HEADER)})")
            if [h.strip() for h in header] != MMLU_HEADER:
                raise TurboLMError(f"{path}, line 1: expected the header {','.join(MMLU_HEADER)}, got {','.join(header)}")
            for row in reader:
                where = _where(path, reader.line_num)
                if not any(c.strip() for c in row):
                    continue
                if len(row) != 6:
                    raise TurboLMError(f"{where}: expected 6 columns ({','.join(MMLU_HEADER)}), got {len(row)}")
                question, choices, answer = row[0], row[1:5], row[5].strip()
                if answer.upper() in MMLU_LETTERS:
                    gold = MMLU_LETTERS.index(answer.upper())
                elif answer in ("0", "1", "2", "3"):
                    gold = int(answer)
                else:
                    raise TurboLMError(f"{where}: answer must be 0-3 (or A-D), got {answer!r}")
                if not question.strip():
                    raise TurboLMError(f"{where}: empty question")
                rows.append((question, choices, gold))
        except csv.Error as e:
            raise TurboLMError(f"{path}, line {reader.line_num}: malformed CSV ({e})") from None
    return rows


def mmlu_question(question: str, choices: list[str]) -> str:
    """lm-eval's ``doc_to_text`` for MMLU."""
    lines = [question.strip()] + [f"{letter}. {c}" for letter, c in zip(MMLU_LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def load_mmlu(path, name: str = "mmlu", limit: int | None = None, num_fewshot: int = 0) -> Task:
    """MMLU from ``path/test/SUBJECT_test.csv`` (and ``path/dev/SUBJECT_dev.csv`` for few-shot examples:
    the first ``num_fewshot`` dev rows, lm-eval's ``first_n`` sampler). ``limit`` applies per subject,
    as lm-eval applies it to each MMLU subtask."""
    root = Path(path)
    if not root.is_dir():
        raise ParameterError(f"{name}: MMLU folder not found: {root} (expected test/SUBJECT_test.csv files; "
                             f"give {{}} DIR, or {{}} {name}=FOLDER)", "data_dir", "task_paths")
    tests = sorted((root / "test").glob("*_test.csv"))
    if not tests:
        raise TurboLMError(f"{name}: no MMLU test files in {root / 'test'} (expected SUBJECT_test.csv)")
    prompt = "description + " + (f"{num_fewshot} dev examples + " if num_fewshot else "") + "question + A-D + 'Answer:' + ' A'..' D'"
    task = Task(name, "choice", str(root), prompt=prompt)
    for test in tests:
        subject = test.name[: -len("_test.csv")]
        prefix = mmlu_description(subject)
        if num_fewshot:
            dev = root / "dev" / f"{subject}_dev.csv"
            if not dev.is_file():
                raise TurboLMError(f"{name}: {num_fewshot}-shot needs the dev file {dev}")
            shots = _read_mmlu_csv(dev)[:num_fewshot]
            if len(shots) < num_fewshot:
                raise TurboLMError(f"{name}: {dev} holds {len(shots)} examples; {num_fewshot}-shot needs {num_fewshot}")
            prefix += "".join(f"{mmlu_question(q, c)}{TARGET_DELIMITER}{MMLU_LETTERS[g]}\n\n" for q, c, g in shots)
        rows = _read_mmlu_csv(test)
        if limit is not None:
            rows = rows[:limit]
        for question, choices, gold in rows:
            context = prefix + mmlu_question(question, choices)
            task.items.append(ChoiceItem(contexts=[context] * 4,
                                         continuations=[TARGET_DELIMITER + letter for letter in MMLU_LETTERS],
                                         gold=gold, norm_lengths=[1, 1, 1, 1], group=subject))
    return _nonempty(task, None)


# --- LAMBADA: {"context","continuation"} ---------------------------------------------------------


def load_lambada(path, name: str = "lambada", limit: int | None = None) -> Task:
    path = _check_file(Path(path), name)
    task = Task(name, "loglikelihood", str(path), prompt="context + ' ' + continuation (greedy match, perplexity)")
    for lineno, row in _read_jsonl(path):
        if limit is not None and len(task.items) >= limit:
            break
        where = _where(path, lineno)
        context = _get(row, "context", str, where)
        continuation = _get(row, "continuation", str, where)
        if not continuation.strip():
            raise TurboLMError(f"{where}: field 'continuation' is empty")
        task.items.append(ContinuationItem(context, TARGET_DELIMITER + continuation.lstrip(" ")))
    return _nonempty(task, limit)


# --- WikiText-2 raw --------------------------------------------------------------------------------


def wikitext_detokenizer(string: str) -> str:
    """lm-eval's WikiText detokenizer (undoes the dataset's tokenization: ``@-@``, spaces around punctuation)."""
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")
    return string


_ARTICLE = re.compile(r"^ = [^=].* = ?$")


def load_wikitext(path, name: str = "wikitext", limit: int | None = None) -> Task:
    """WikiText-2 raw: one document per article (a top-level `` = Title = `` row starts one), its rows
    joined with newlines, detokenized with lm-eval's detokenizer; words (``re.split(r"\\s+")``) and
    UTF-8 bytes are counted on the raw article, as lm-eval counts them."""
    path = _check_file(Path(path), name)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise TurboLMError(f"cannot read {path}: {e}") from None
    articles: list[list[str]] = []
    for line in lines:
        if not line.strip():
            continue
        if _ARTICLE.match(line) or not articles:
            articles.append([])
        articles[-1].append(line)
    task = Task(name, "rolling", str(path), prompt="detokenized articles, rolling windows")
    for rows in articles[:limit] if limit is not None else articles:
        raw = "\n".join(rows) + "\n"
        task.items.append(Document(text=wikitext_detokenizer(raw), words=len(re.split(r"\s+", raw)),
                                   bytes=len(raw.encode("utf-8"))))
    return _nonempty(task, limit)


# --- the registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    name: str
    relpath: str  # under --data-dir
    load: Callable[..., Task]
    summary: str


def _mc(prompt, doc):
    def load(path, name, limit=None):
        return load_multiple_choice(path, name, limit, prompt=prompt, prompt_doc=doc)
    return load


_QA_DOC = "'Question: {q}\\nAnswer:' + ' ' + choice"
TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa", "multiple_choice/piqa.jsonl", _mc(question_answer_prompt, _QA_DOC), "PIQA validation (1838)"),
    "arc_easy": TaskSpec("arc_easy", "multiple_choice/arc_easy.jsonl", _mc(question_answer_prompt, _QA_DOC), "ARC-Easy test (2376)"),
    "arc_challenge": TaskSpec("arc_challenge", "multiple_choice/arc_challenge.jsonl", _mc(question_answer_prompt, _QA_DOC),
                              "ARC-Challenge test (1172)"),
    "winogrande": TaskSpec("winogrande", "multiple_choice/winogrande.jsonl", load_winogrande, "WinoGrande dev (1267)"),
    "boolq": TaskSpec("boolq", "multiple_choice/boolq.jsonl",
                      _mc(boolq_prompt, "'{passage}\\nQuestion: {q}?\\nAnswer:' + ' no' / ' yes'"), "BoolQ dev (3270)"),
    "hellaswag": TaskSpec("hellaswag", "multiple_choice/hellaswag_val1000.jsonl", load_hellaswag,
                          "HellaSwag validation, 1000-item subset"),
    "mmlu": TaskSpec("mmlu", "multiple_choice/mmlu", load_mmlu, "MMLU test, 57 subjects (14042), 0-shot"),
    "mmlu_5shot": TaskSpec("mmlu_5shot", "multiple_choice/mmlu",
                           lambda path, name, limit=None: load_mmlu(path, name, limit, num_fewshot=5),
                           "MMLU test, 5-shot from the dev split"),
    "lambada": TaskSpec("lambada", "language_modeling/lambada_openai.jsonl", load_lambada, "LAMBADA (OpenAI) (5153)"),
    "wikitext": TaskSpec("wikitext", "language_modeling/wikitext-2-raw/wiki.test.raw", load_wikitext,
                         "WikiText-2 raw test (62 articles)"),
}
DEFAULT_TASKS = ["piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "hellaswag", "lambada", "wikitext"]


def task_path(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    if name not in TASKS:
        raise ParameterError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)} (or {{}} FILE)", "task_files")
    return Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR) / TASKS[name].relpath


def load_task(name: str, data_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None,
              limit: int | None = None) -> Task:
    """A built-in task, from ``path`` if given, else from its usual place under ``data_dir``."""
    if limit is not None and limit < 1:
        raise ParameterError(f"{{}} must be >= 1, got {limit}", "limit")
    where = Path(path) if path is not None else task_path(name, data_dir)
    if name not in TASKS:
        raise ParameterError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)} (or {{}} FILE)", "task_files")
    return TASKS[name].load(where, name, limit)


def load_task_file(path: str | os.PathLike, limit: int | None = None, name: str | None = None) -> Task:
    """A multiple-choice jsonl file given by path; the task is named after the file's stem."""
    if limit is not None and limit < 1:
        raise ParameterError(f"{{}} must be >= 1, got {limit}", "limit")
    path = Path(path)
    return load_multiple_choice(path, name or path.stem, limit)
