"""Text for the sparsity search and router training: rows rendered and packed into chunks.

Rows are chat rows - Alpaca (``instruction``/``input``/``output``), ShareGPT (``conversations``)
and the other forms the draft data reads (malformed rows are counted and skipped), rendered with
the model's chat template - or plain-text rows (``{"text": ...}``, e.g. encyclopedia articles),
tokenized as they are and closed with the end-of-sequence token. Each source is concatenated and
cut into ``seq_len``-token chunks. The first ``calibration`` chunks are held out for the sparsity
search and evaluation, the following ones are for training, so the two never overlap (and
the held-out set does not depend on how much training data is read). Several sources (a
mixture, e.g. general text with instruction data) share both sets evenly: each gives its share
of the held-out chunks from its own beginning, and the training chunks alternate between them.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch

from ..core.chat import encode_chat
from ..core.errors import ParameterError
from ..core.rows import SkipRow, read_rows, row_messages, row_text


@dataclass
class Chunks:
    train: torch.Tensor        # (N, seq_len) token ids
    calibration: torch.Tensor  # (M, seq_len)
    rows: int
    skipped: dict

    def describe(self) -> str:
        skipped = sum(self.skipped.values())
        return (f"{self.rows} rows ({skipped} skipped) -> {len(self.train)} training and "
                f"{len(self.calibration)} calibration chunks of {self.calibration.shape[1]} tokens")


def pack_rows(tokenizer, path, seq_len: int, calibration: int, max_train: int | None = None) -> Chunks:
    """``path``: one file, or a list of files to mix (see the module docstring)."""
    if seq_len < 2:
        raise ParameterError(f"{{}} must be at least 2, got {seq_len}", "seq_len")
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        raise ParameterError("give at least one {} file", "data")
    shares = [calibration // len(paths) + (i < calibration % len(paths)) for i in range(len(paths))]
    train_shares = (None if max_train is None else
                    [max_train // len(paths) + (i < max_train % len(paths)) for i in range(len(paths))])
    parts = [_pack_one(tokenizer, p, seq_len, c, None if train_shares is None else train_shares[i])
             for i, (p, c) in enumerate(zip(paths, shares))]
    calib = torch.cat([c.calibration for c in parts])
    longest = max(len(c.train) for c in parts)
    train = [c.train[i] for i in range(longest) for c in parts if i < len(c.train)]  # alternating sources
    train = torch.stack(train) if train else calib[:0]
    skipped: Counter = Counter()
    for c in parts:
        skipped.update(c.skipped)
    return Chunks(train=train, calibration=calib, rows=sum(c.rows for c in parts), skipped=dict(skipped))


def _pack_one(tokenizer, path, seq_len: int, calibration: int, max_train: int | None) -> Chunks:
    rows = read_rows(path)
    skipped: Counter = Counter()
    stream: list[int] = []
    need = None if max_train is None else (max_train + calibration) * seq_len
    used = 0
    eos = tokenizer.eos_token_id
    for row in rows:
        text = row_text(row)
        if text is not None:
            stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + ([] if eos is None else [eos]))
        else:
            try:
                messages = row_messages(row)
            except SkipRow as e:
                skipped[str(e)] += 1
                continue
            stream.extend(encode_chat(tokenizer, messages, add_generation_prompt=False))
        used += 1
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // seq_len
    least = calibration + (0 if max_train == 0 else 1)
    if n < least:
        raise ParameterError(f"{path} gives {n} chunks of {seq_len} tokens; need at least {least} "
                             f"({calibration} for calibration): give more rows or a smaller {{}}", "seq_len")
    ids = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
    calib, train = ids[:calibration], ids[calibration:]
    if max_train is not None:
        train = train[:max_train]
    return Chunks(train=train, calibration=calib, rows=used, skipped=dict(skipped))
