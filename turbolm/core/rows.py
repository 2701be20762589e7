"""Dataset rows: Alpaca (``instruction``/``input``/``output``) and ShareGPT (``conversations``)
rows read from a JSON list or a JSON Lines file and turned into chat messages. Shared by the draft
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


def row_messages(row) -> list[dict]:
    """The chat in an Alpaca or ShareGPT row as ``[{"role", "content"}, ...]``, ending with its
    last assistant turn. Raises ``SkipRow`` with the reason for a malformed row."""
    if row is _INVALID_JSON:
        raise SkipRow("invalid_json")
    if not isinstance(row, dict):
        raise SkipRow("not_an_object")
    if "conversations" in row:
        return _sharegpt(row["conversations"])
    if "instruction" in row:
        return _alpaca(row)
    raise SkipRow("missing_keys")


def _alpaca(row: dict) -> list[dict]:
    if "output" not in row:
        raise SkipRow("missing_keys")
    instruction, extra, output = row["instruction"], row.get("input"), row["output"]
    extra = "" if extra is None else extra
    if not all(isinstance(x, str) for x in (instruction, extra, output)):
        raise SkipRow("wrong_types")
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _sharegpt(turns) -> list[dict]:
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
        raise SkipRow("no_assistant_turn")
    return messages[: len(messages) - len(body) % 2]  # a trailing user turn has no answer to learn


def first_exchange(messages: list[dict]) -> list[dict]:
    """The optional system turn, the first user turn and its answer."""
    return messages[: 3 if messages[0]["role"] == "system" else 2]
