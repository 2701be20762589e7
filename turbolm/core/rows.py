"""Dataset rows read from a JSON list or a JSON Lines file and turned into chat messages:
Alpaca (``instruction``/``input``/``output``, also Dolly's ``context``/``response`` and
GPTeacher's ``response``), ShareGPT (``conversations``), plain ``messages`` lists, question/answer
rows (GSM8K: ``question``/``answer``) and MBPP (``text``/``code``/``test_list``). Shared by the draft
data pipeline and the pruning calibration; a malformed row is skipped with a reason, never fatal."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import TurboLMError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_INVALID_JSON = object()  # a JSON Lines line that does not parse: skipped like any malformed row


class SkipRow(Exception):
    """A row that cannot be used; the message is the reason it is counted under in meta's ``skipped``."""


def read_rows(path: str | os.PathLike) -> list:
    """The rows of a JSON list or a JSON Lines file, in file order.

    A JSON Lines line that does not parse becomes a row that is skipped later: one bad
    line must not cost the whole file.
    """
    path = Path(path)
    if not path.is_file():
        raise TurboLMError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TurboLMError(f"cannot read the data file {path}: {e}") from e
    rows = _json_list(path, text) if path.suffix.lower() != ".jsonl" else None
    if rows is None:
        rows = [_json_line(line) for line in text.splitlines() if line.strip()]
        if all(r is _INVALID_JSON for r in rows):
            raise TurboLMError(f"{path} is not JSON: expected a list of Alpaca or ShareGPT rows, or one row per line (JSON Lines)")
    if not rows:
        raise TurboLMError(f"{path} holds no rows")
    return rows


def _json_list(path: Path, text: str) -> list | None:
    """The rows of a JSON document, or None if it does not parse (it may be JSON Lines)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, list):
        raise TurboLMError(f"{path} holds a JSON {type(data).__name__}, not a list of rows (Alpaca or ShareGPT)")
    return data


def _json_line(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return _INVALID_JSON


def row_text(row) -> str | None:
    """The text of a plain-text row (``{"text": ...}``, e.g. an encyclopedia article), or None for
    a chat row (MBPP's ``text`` is a task, with its ``code``)."""
    if isinstance(row, dict) and isinstance(row.get("text"), str) and not CHAT_KEYS & row.keys():
        return row["text"]
    return None


CHAT_KEYS = frozenset({"conversations", "messages", "instruction", "question", "code"})


def row_messages(row) -> list[dict]:
    """The chat in an Alpaca or ShareGPT row as ``[{"role", "content"}, ...]``, ending with its
    last assistant turn. Raises ``SkipRow`` with the reason for a malformed row."""
    if row is _INVALID_JSON:
        raise SkipRow("invalid_json")
    if not isinstance(row, dict):
        raise SkipRow("not_an_object")
    if "conversations" in row:
        return _sharegpt(row["conversations"])
    if "messages" in row:
        return _sharegpt([{"from": m.get("role"), "value": m.get("content")} if isinstance(m, dict) else m
                          for m in row["messages"]] if isinstance(row["messages"], list) else row["messages"])
    if "instruction" in row:
        return _alpaca(row)
    if "question" in row and "answer" in row:  # GSM8K
        return _pair(row["question"], row["answer"])
    if "text" in row and "code" in row:  # MBPP: the task and its tests are the prompt
        tests = row.get("test_list") or []
        if not isinstance(tests, list) or not all(isinstance(t, str) for t in tests):
            raise SkipRow("wrong_types")
        prompt = row["text"] if not tests else f"{row['text']}\nYour code should pass these tests:\n" + "\n".join(tests)
        return _pair(prompt, row["code"])
    raise SkipRow("missing_keys")


def _pair(user, answer) -> list[dict]:
    if not isinstance(user, str) or not isinstance(answer, str):
        raise SkipRow("wrong_types")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _alpaca(row: dict) -> list[dict]:
    """Alpaca; Dolly names the input ``context`` and the output ``response``, GPTeacher the output ``response``."""
    output = row.get("output", row.get("response"))
    if output is None:
        raise SkipRow("missing_keys")
    instruction, extra = row["instruction"], row.get("input", row.get("context"))
    extra = "" if extra is None else extra
    if not all(isinstance(x, str) for x in (instruction, extra, output)):
        raise SkipRow("wrong_types")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _sharegpt(turns, answered: bool = True) -> list[dict]:
    if not isinstance(turns, list):
        raise SkipRow("wrong_types")
    if not turns:
        raise SkipRow("empty_conversation")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise SkipRow("missing_keys")
        if not isinstance(turn["from"], str) or not isinstance(turn["value"], str):
            raise SkipRow("wrong_types")
        role = ROLES.get(turn["from"].lower())
        if role is None:
            raise SkipRow("unknown_role")
        messages.append({"role": role, "content": turn["value"]})
    body = messages[1:] if messages[0]["role"] == "system" else messages
    # Strict alternation from a user turn is the one order every chat template accepts.
    if any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(body)):
        raise SkipRow("roles_out_of_order")
    if len(body) < 2:
        if not answered and body:
            return messages
        raise SkipRow("no_assistant_turn")
    return messages[: len(messages) - len(body) % 2]  # a trailing user turn has no answer to learn


def row_prompt(row) -> list[dict]:
    """The first question of a row, to be answered by a model: the optional system turn and the
    first user turn. Unlike :func:`row_messages` it takes rows without an answer (ShareGPT
    first turns)."""
    try:
        return first_exchange(row_messages(row))[:-1]
    except SkipRow as s:
        turns = row.get("conversations") if isinstance(row, dict) else None
        if str(s) != "no_assistant_turn" or not isinstance(turns, list):
            raise
    messages = _sharegpt(turns, answered=False)
    return messages[: 2 if messages[0]["role"] == "system" else 1]


def first_exchange(messages: list[dict]) -> list[dict]:
    """The optional system turn, the first user turn and its answer."""
    return messages[: 3 if messages[0]["role"] == "system" else 2]
