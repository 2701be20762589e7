"""Text for the sparsity search and router training: chat rows rendered and packed into chunks.

Rows are Alpaca (``instruction``/``input``/``output``) or ShareGPT (``conversations``), read by
the same reader as the draft data (malformed rows are counted and skipped). Each row is
rendered with the model's chat template, the renderings are concatenated and cut into
``seq_len``-token chunks. The first ``calibration`` chunks are held out for the sparsity
search and evaluation, the following ones are for training, so the two never overlap (and
the held-out set does not depend on how much training data is read).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import torch

from ..core.chat import encode_chat
from ..core.errors import ParameterError
from ..core.rows import SkipRow, read_rows, row_messages


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


def pack_rows(tokenizer, path: str | os.PathLike, seq_len: int, calibration: int,
              max_train: int | None = None) -> Chunks:
    if seq_len < 2:
        raise ParameterError(f"{{}} must be at least 2, got {seq_len}", "seq_len")
    rows = read_rows(path)
    skipped: Counter = Counter()
    stream: list[int] = []
    need = None if max_train is None else (max_train + calibration) * seq_len
    used = 0
    for row in rows:
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
