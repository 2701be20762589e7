"""Feature preparation for training speculative-decoding drafts (EAGLE / Jakiro style).

A draft learns to continue the target from the target's own final-norm hidden states
("features"). :func:`prepare_features` turns a chat dataset (Alpaca or ShareGPT rows, as a
JSON list or JSON Lines) into token ids, a loss mask over the assistant answers and the
target's feature at every position, stored in safetensors shards that
:class:`FeatureDataset` reads back for training.

The output directory survives a kill: a shard is renamed into place only when whole, and
``meta.json``, rewritten atomically after each shard, is the only record of what is done.
A rerun continues after the last listed shard and writes the same bytes an uninterrupted
run would, because a shard depends only on its own rows.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ...core.attention import without_cudnn_attention
from ...core.chat import encode_chat
from ...core.errors import DataError, ParameterError, TurboLMError
from ...core.generation import FeatureCapture, cache_kwarg, context_length, eos_token_ids
from ...core.io import atomic_write, load_safetensors, open_safetensors, write_json
from ...core.kvcache import growing_cache
from ...core.models import load_target, model_identity
from ...core.rows import SkipRow, read_rows, row_messages, row_prompt

log = logging.getLogger("turbolm")

FORMAT = 1
META = "meta.json"
ESTIMATE_ROWS = 200
# Everything that shapes the shards: a resumed run must agree on all of it.
RESUME_KEYS = ("format", "target", "hidden_size", "features_dtype", "data", "regenerate", "regen_max_new_tokens",
               "regen_dtype", "regen_temperature", "max_length", "chat_template_sha256")
_AGAIN = "prepare the features again into an empty directory"
_SHARD = re.compile(r"shard-\d+\.safetensors")
_OURS = re.compile(r"shard-\d+\.safetensors|\.(shard-\d+\.safetensors|meta\.json)(\.\w+)?\.tmp")


@dataclass
class _Prompt:
    messages: list[dict]  # ends with the user turn to answer
    ids: list[int]


@dataclass
class _Sample:
    input_ids: list[int]
    loss_mask: list[int]


# --- tokenizing ----------------------------------------------------------------------------------


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    from jinja2 import TemplateError

    try:
        return encode_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except TemplateError:  # e.g. a template that refuses system turns
        raise SkipRow("template_error") from None


def _is_prefix(short: list[int], long: list[int]) -> bool:
    return len(short) <= len(long) and long[: len(short)] == short


def tokenize_chat(tokenizer, messages: list[dict], eos_ids: set[int], max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of a chat and its loss mask: 1 on each assistant turn's content and the
    end-of-turn token that closes it, 0 elsewhere (system, user, template markup).

    Each answer's span lies between the rendering of the chat before it (with the generation
    prompt) and the rendering that includes it; this holds for any template as long as the
    shorter tokenization is a prefix of the longer, which is checked (BPE merges across a
    boundary break it, and such a row is skipped). Template text after the end-of-turn token
    (a newline) is never generated, so it is not learnt either.
    """
    ids = _render(tokenizer, messages, False)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _render(tokenizer, messages[:i], True)
        end = _render(tokenizer, messages[: i + 1], False)
        if not (_is_prefix(start, end) and _is_prefix(end, ids)):
            raise SkipRow("template_mismatch")
        closing = [j for j in range(len(start), len(end)) if end[j] in eos_ids]
        stop = closing[-1] + 1 if closing else len(end)
        mask[len(start) : stop] = [1] * (stop - len(start))
    ids, mask = ids[:max_length], mask[:max_length]
    if not any(mask):
        raise SkipRow("no_answer_within_max_length")
    return ids, mask


# --- running the target --------------------------------------------------------------------------


def _pad_id(tokenizer, eos_ids: set[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return min(eos_ids) if eos_ids else 0


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    return next((tokens[:i] for i, t in enumerate(tokens) if t in eos_ids), tokens)


@torch.inference_mode()
def generate_answers(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int, batch_size: int,
                     max_length: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
    """The target's greedy (or sampled) answer to each prompt, batched (left padding), prompts of similar
    length together. Answer tokens past ``max_length`` would be cut anyway, so a batch stops
    once its shortest prompt reaches it. The cache grows in place (``growing_cache``): at large
    batches transformers' concatenating cache copies gigabytes per step (Intel CPU, bf16, 128
    rows: 451 -> 516 row-tokens/s).

    ``temperature`` > 0: answers *sampled* from the target's distribution at that temperature
    (no top-k / top-p), the text a draft meets when it serves sampling; batch ``b`` draws from
    torch's generator seeded with ``(seed, b)`` (the global generator is restored after), so the
    same prompts and seed give the same answers."""
    from transformers import GenerationConfig

    eos_ids = eos_token_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos_ids)
    answers: list[str] = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for r, i in enumerate(batch):
            ids[r, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            attention[r, width - len(prompts[i]) :] = 1
        # The target's own choice (greedy, or a sample of its plain softmax): neutralise logits processors
        # that a checkpoint's generation_config may switch on (Qwen2.5 ships repetition_penalty 1.05).
        sample = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if temperature > 0 else {
            "do_sample": False}
        config = GenerationConfig(
            max_new_tokens=min(max_new_tokens, max_length - min(len(prompts[i]) for i in batch)),
            num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0,
            pad_token_id=pad, eos_token_id=sorted(eos_ids) or None, **sample,
        )
        devices = [model.device] if model.device.type == "cuda" else []
        with without_cudnn_attention(), torch.random.fork_rng(devices=devices, enabled=temperature > 0):
            if temperature > 0:
                torch.manual_seed(seed * 1_000_003 + b)
            out = model.generate(input_ids=ids.to(model.device), attention_mask=attention.to(model.device),
                                 generation_config=config,
                                 **{cache_kwarg(type(model)): growing_cache(model.config)})
        for r, i in enumerate(batch):
            answers[i] = tokenizer.decode(_until_eos(out[r, width:].tolist(), eos_ids), skip_special_tokens=True)
    return answers


@torch.inference_mode()
def extract_features(model, sequences: list[list[int]], *, batch_size: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """The target's final-norm feature at every position of each sequence, shape [len, hidden],
    on the CPU in ``dtype``. Batches sequences of similar length with right padding, which a
    causal model's real positions never see; the padded positions are dropped."""
    features: list[torch.Tensor] = [torch.empty(0)] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    with FeatureCapture(model) as capture:
        for b in range(0, len(order), batch_size):
            batch = order[b : b + batch_size]
            lengths = [len(sequences[i]) for i in batch]
            ids = torch.zeros((len(batch), max(lengths)), dtype=torch.long)
            attention = torch.zeros_like(ids)
            for r, i in enumerate(batch):
                ids[r, : lengths[r]] = torch.tensor(sequences[i])
                attention[r, : lengths[r]] = 1
            # logits_to_keep=1: the features are all we need, not [batch, len, vocab] logits.
            with without_cudnn_attention():
                model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device), use_cache=False,
                      logits_to_keep=1)
            batch_features = capture.features.to("cpu", dtype)
            if not torch.isfinite(batch_features).all():
                raise ParameterError(f"the target's features overflow {str(dtype).replace('torch.', '')}; "
                                     "prepare with {} bfloat16", "dtype")
            for r, i in enumerate(batch):
                features[i] = batch_features[r, : lengths[r]].clone()  # a view would keep the padded batch alive
    return features


# --- the output directory ------------------------------------------------------------------------


def _write_shard(path: Path, samples: list[_Sample], features: list[torch.Tensor]) -> None:
    from safetensors.torch import save_file

    lengths = [len(s.input_ids) for s in samples]
    tensors = {
        "input_ids": torch.tensor([t for s in samples for t in s.input_ids], dtype=torch.int32),
        "loss_mask": torch.tensor([m for s in samples for m in s.loss_mask], dtype=torch.uint8),
        "features": torch.cat(features).contiguous(),
        "offsets": torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _append_shard(out: Path, meta: dict, samples: list[_Sample], features: list[torch.Tensor], start: int, end: int) -> None:
    """Write rows ``start..end``'s samples as the next shard (none if all were skipped) and
    record them in meta, which is written last: a kill in between leaves an unlisted shard
    that the resumed run removes."""
    if samples:
        name = f"shard-{len(meta['shards']):05d}.safetensors"
        _write_shard(out / name, samples, features)
        meta["shards"].append({"file": name, "samples": len(samples), "tokens": sum(len(s.input_ids) for s in samples),
                               "rows": [start, end]})
    meta["rows_done"] = end
    meta["samples"] += len(samples)
    meta["tokens"] += sum(len(s.input_ids) for s in samples)
    meta["loss_tokens"] += sum(sum(s.loss_mask) for s in samples)
    write_json(out / META, meta)


def read_meta(directory: str | os.PathLike) -> dict:
    """The checked ``meta.json`` of a prepared feature directory; anything else (a dataset file, an
    empty or foreign directory, a damaged meta) is a :class:`DataError` saying what it is."""
    directory = Path(directory)
    make = "make one with `turbolm draft prepare --data DATASET --out DIR`"
    if directory.is_file():
        hint = (f"; to train on this dataset, prepare its features first: `turbolm draft prepare --data {directory} "
                "--out DIR`" if directory.suffix.lower() in (".json", ".jsonl") else f"; {make}")
        raise DataError(f"{directory} is a file, not a prepared feature directory (the directory `turbolm draft "
                        f"prepare` writes) or a token file (.safetensors){hint}")
    if not directory.is_dir():
        raise DataError(f"feature directory not found: {directory} ({make})")
    path = directory / META
    if not path.is_file():
        what = "is empty" if not any(directory.iterdir()) else f"holds no {META}"
        raise DataError(f"{directory} {what}: it is not a prepared feature directory; {make}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0]}; {_AGAIN}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a turbolm feature meta file of format {FORMAT}")
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{path} is damaged: {problem}; {_AGAIN}")
    return meta


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _meta_problem(meta: dict) -> str | None:
    """What is wrong with a meta.json's fields that reading the features relies on, else None."""
    target = meta.get("target")
    if not isinstance(target, dict) or not _count(target.get("vocab_size")) or not target["vocab_size"]:
        return "'target' must be the target's identity (an object with its vocab_size)"
    if not _count(meta.get("hidden_size")) or not meta["hidden_size"]:
        return "'hidden_size' must be a positive integer"
    if not isinstance(meta.get("complete"), bool):
        return "'complete' must be true or false"
    shards = meta.get("shards")
    if not isinstance(shards, list):
        return "'shards' must be a list"
    for i, s in enumerate(shards):
        if (not isinstance(s, dict) or not isinstance(s.get("file"), str) or not _SHARD.fullmatch(s["file"])
                or not _count(s.get("samples")) or not _count(s.get("tokens"))):
            return f"shard entry {i} must name a shard-NNNNN.safetensors file with its sample and token counts"
    return None


def _open_out_dir(out: Path, header: dict) -> dict:
    """The meta to continue from: the directory's own if it was made with the same settings,
    else a fresh one. Shard files that meta does not list (a killed run's) are removed."""
    if out.exists() and not out.is_dir():
        raise ParameterError(f"{{}} {out} is a file; give a directory", "out")
    out.mkdir(parents=True, exist_ok=True)
    if (out / META).is_file():
        meta = read_meta(out)
        for key in RESUME_KEYS:
            if meta.get(key) != header[key]:
                raise ParameterError(f"{out} belongs to another preparation ({key} differs: {_short(meta.get(key))} "
                                     f"there, {_short(header[key])} now); use another {{}}", "out")
    else:
        strangers = sorted(p.name for p in out.iterdir() if not _OURS.fullmatch(p.name))
        if strangers:
            raise ParameterError(f"{out} holds other files ({strangers[0]}, ...) and no {META}; use a new or empty {{}}", "out")
        meta = {**header, "rows_total": 0, "rows_done": 0, "samples": 0, "tokens": 0, "loss_tokens": 0,
                "skipped": {}, "shards": [], "complete": False}
    listed = {s["file"] for s in meta["shards"]}
    for p in out.iterdir():
        if _OURS.fullmatch(p.name) and p.name not in listed:
            p.unlink()
    return meta


def _short(value) -> str:
    return "another model" if isinstance(value, dict) else repr(value)


def _template_sha(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# --- the preparation -----------------------------------------------------------------------------


class _Preparation:
    """One run over the rows ``meta["rows_done"]:`` of a dataset, shard by shard."""

    def __init__(self, model, tokenizer, rows: list, out: Path, meta: dict, *, batch_size: int, shard_size: int,
                 generator=None):
        self.model, self.tokenizer, self.rows, self.out, self.meta = model, tokenizer, rows, out, meta
        self.generator = generator or model  # the copy that writes the answers (--regen-dtype)
        self.batch_size, self.shard_size = batch_size, shard_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.features_dtype = getattr(torch, meta["features_dtype"])

    def conversation(self, row) -> list[dict]:
        """The chat to learn (the dataset's answers), or with --regenerate the question to answer."""
        return row_prompt(row) if self.meta["regenerate"] else row_messages(row)

    def tokenize(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        return tokenize_chat(self.tokenizer, messages, self.eos_ids, self.meta["max_length"])

    def estimate(self) -> str:
        """Disk estimate from tokenizing (no model run) up to ESTIMATE_ROWS rows spread over the rest."""
        start, remaining = self.meta["rows_done"], len(self.rows) - self.meta["rows_done"]
        picks = range(start, len(self.rows), max(1, remaining // ESTIMATE_ROWS))[:ESTIMATE_ROWS]
        lengths = []
        for i in picks:
            try:
                if self.meta["regenerate"]:  # the prompt and the longest answer allowed
                    prompt = _render(self.tokenizer, self.conversation(self.rows[i]), True)
                    lengths.append(min(self.meta["max_length"], len(prompt) + self.meta["regen_max_new_tokens"]))
                else:
                    lengths.append(len(self.tokenize(self.conversation(self.rows[i]))[0]))
            except SkipRow:
                pass
        if not lengths:
            return f"estimated disk: unknown (none of {len(picks)} sampled rows is usable)"
        mean = sum(lengths) / len(lengths)
        per_token = self.meta["hidden_size"] * self.features_dtype.itemsize + 5  # + int32 id + uint8 mask
        line = f"estimated disk: {_human_bytes(remaining * mean * per_token)} for {remaining} rows (~{mean:.0f} tokens each)"
        if self.meta["regenerate"]:
            line += ", at most: every answer as long as --regen-max-new-tokens allows"
        return line

    def run(self, bar) -> None:
        while self.meta["rows_done"] < len(self.rows):
            self.next_shard(bar)

    def next_shard(self, bar) -> None:
        """Prepare rows from ``rows_done`` until ``shard_size`` are usable, write them as one
        shard (none if every row was skipped), then record it in meta."""
        start = end = self.meta["rows_done"]
        skipped: dict[str, int] = {}
        picked: list = []
        while end < len(self.rows) and len(picked) < self.shard_size:
            try:
                picked.append(self.candidate(end))
            except SkipRow as s:
                skipped[str(s)] = skipped.get(str(s), 0) + 1
                bar.update(1)
            end += 1
        samples = self.regenerated(picked, skipped, bar, start) if self.meta["regenerate"] else picked
        features = extract_features(self.model, [s.input_ids for s in samples], batch_size=self.batch_size,
                                    dtype=self.features_dtype)
        for reason, n in skipped.items():
            self.meta["skipped"][reason] = self.meta["skipped"].get(reason, 0) + n
        _append_shard(self.out, self.meta, samples, features, start, end)
        bar.update(len(samples))

    def candidate(self, i: int) -> _Sample | _Prompt:
        """Row ``i`` ready for the target: a sample, or with --regenerate the prompt to answer."""
        if not self.meta["regenerate"]:
            return _Sample(*self.tokenize(self.conversation(self.rows[i])))
        messages = self.conversation(self.rows[i])
        ids = _render(self.tokenizer, messages, True)
        if len(ids) >= self.meta["max_length"]:
            raise SkipRow("no_answer_within_max_length")
        return _Prompt(messages, ids)

    def regenerated(self, prompts: list[_Prompt], skipped: dict[str, int], bar, first_row: int) -> list[_Sample]:
        """The samples of ``prompts`` with the target's answers; sampled answers are seeded by the
        shard's first row, so a resumed preparation writes the same shards."""
        answers = generate_answers(self.generator, self.tokenizer, [p.ids for p in prompts],
                                   max_new_tokens=self.meta["regen_max_new_tokens"], batch_size=self.batch_size,
                                   max_length=self.meta["max_length"],
                                   temperature=self.meta.get("regen_temperature") or 0.0, seed=first_row)
        samples = []
        for prompt, answer in zip(prompts, answers):
            try:
                samples.append(_Sample(*self.tokenize(prompt.messages + [{"role": "assistant", "content": answer}])))
            except SkipRow as s:
                skipped[str(s)] = skipped.get(str(s), 0) + 1
                bar.update(1)
        return samples


def _check_settings(max_samples, max_length, batch_size, shard_size, regen_max_new_tokens) -> None:
    for name, value, low in (("max_samples", max_samples, 1), ("max_length", max_length, 2), ("batch_size", batch_size, 1),
                             ("shard_size", shard_size, 1), ("regen_max_new_tokens", regen_max_new_tokens, 1)):
        if value is not None and value < low:
            raise ParameterError(f"{{}} must be >= {low}, got {value}", name)


def prepare_features(
    target_source,
    data_path,
    out_dir,
    *,
    regenerate: bool = False,
    max_samples: int | None = None,
    max_length: int = 1024,
    batch_size: int = 8,
    shard_size: int = 256,
    dtype: str = "float32",
    device: str = "cpu",
    regen_max_new_tokens: int = 256,
    regen_dtype: str | None = None,
    regen_temperature: float = 0.0,
    progress: bool = True,
) -> dict:
    """Run the target over a chat dataset and store, per sample, its token ids, the loss mask
    over the assistant answers and the target's final-norm features, in shards under ``out_dir``.

    ``target_source`` is what :func:`turbolm.load_target` takes (None: the default model);
    ``regenerate`` has the target write the answers itself (greedy, up to
    ``regen_max_new_tokens``, first user turn only) so the draft learns the target's own
    distribution; ``regen_dtype`` writes them with a copy of the target in that precision
    (bfloat16 generates ~2x faster on a CPU with AMX; answers may differ from ``dtype``'s at
    near-ties, the features are still computed in ``dtype``); ``regen_temperature`` > 0 samples the
    answers at that temperature instead (see :func:`generate_answers`). ``max_length`` is capped at the target's context. A rerun with the same
    ``out_dir`` resumes an interrupted run. ``progress`` prints the disk estimate and a
    progress bar on stderr. Returns the final meta.
    """
    from tqdm import tqdm

    _check_settings(max_samples, max_length, batch_size, shard_size, regen_max_new_tokens)
    if not (math.isfinite(regen_temperature) and regen_temperature >= 0):
        raise ParameterError(f"{{}} must be >= 0 (0: greedy answers), got {regen_temperature}", "regen_temperature")
    data = Path(data_path).expanduser().resolve()
    rows = read_rows(data)[:max_samples]
    model, tokenizer = load_target(target_source, dtype=dtype, device=device)
    ctx = context_length(model, tokenizer)
    if ctx is not None and max_length > ctx:
        log.warning("turbolm: max_length %d exceeds the target's context; using %d", max_length, ctx)
        max_length = ctx
    header = {
        "format": FORMAT,
        "target": model_identity(model),
        "hidden_size": model.config.hidden_size,
        "features_dtype": "bfloat16" if model.dtype == torch.bfloat16 else "float16",
        "data": str(data),
        "regenerate": regenerate,
        "regen_max_new_tokens": regen_max_new_tokens if regenerate else None,
        "regen_dtype": (regen_dtype or dtype) if regenerate else None,
        "regen_temperature": regen_temperature if regenerate and regen_temperature > 0 else None,
        "max_length": max_length,
        "chat_template_sha256": _template_sha(tokenizer),
    }
    out = Path(out_dir).expanduser()
    meta = _open_out_dir(out, header)
    if meta["complete"]:
        if progress:
            print(f"{out} is already complete ({meta['samples']} samples, {meta['tokens']} tokens); nothing to do",
                  file=sys.stderr)
        return meta
    meta["rows_total"] = len(rows)
    write_json(out / META, meta)
    generator = None
    if regenerate and regen_dtype and regen_dtype != dtype:
        generator, _ = load_target(target_source, dtype=regen_dtype, device=device)
    prep = _Preparation(model, tokenizer, rows, out, meta, batch_size=batch_size, shard_size=shard_size,
                        generator=generator)
    if progress and meta["rows_done"] < len(rows):
        print(prep.estimate(), file=sys.stderr)
    with tqdm(total=len(rows), initial=meta["rows_done"], unit="row", desc="features", disable=not progress,
              file=sys.stderr) as bar:
        prep.run(bar)
    meta["complete"] = True
    write_json(out / META, meta)
    return meta


# --- reading prepared features -------------------------------------------------------------------


class FeatureDataset(torch.utils.data.Dataset):
    """The samples of a prepared directory, read lazily: one shard is open (memory-mapped) at a
    time and only the requested sample's slices are read. ``dataset[i]`` is a dict of
    ``input_ids`` (long [L]), ``loss_mask`` (bool [L]) and ``features`` (float32 [L, H]).
    ``partial``: also read an unfinished preparation (the shards written so far; a preparation
    only appends, so its first samples never change)."""

    def __init__(self, directory: str | os.PathLike, partial: bool = False):
        self.directory = Path(directory)
        self.meta = read_meta(self.directory)
        if not self.meta.get("complete") and not partial:
            raise DataError(f"{self.directory} is an unfinished preparation ({self.meta.get('rows_done')} of "
                            f"{self.meta.get('rows_total')} rows); rerun `turbolm draft prepare` into it to finish it")
        if self.meta.get("complete") and not self.meta["shards"]:
            skipped = self.meta.get("skipped") if isinstance(self.meta.get("skipped"), dict) else {}
            skipped = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "none recorded"
            raise DataError(f"{self.directory} holds no samples: every row of its data was skipped ({skipped})")
        for k in range(len(self.meta["shards"])):
            self._check_shard(k)
        self._ends = list(itertools.accumulate(s["samples"] for s in self.meta["shards"]))
        self._open = None  # (shard index, safe_open handle, offsets)

    def _check_shard(self, k: int) -> None:
        """Shard ``k`` is whole and holds what meta.json lists (its header and offsets: no features read)."""
        entry = self.meta["shards"][k]
        path = self.directory / entry["file"]
        with open_safetensors(path, remedy=_AGAIN) as h:
            shapes = {name: h.get_slice(name).get_shape() for name in h.keys()}
            want = {"input_ids": [entry["tokens"]], "loss_mask": [entry["tokens"]],
                    "features": [entry["tokens"], self.meta["hidden_size"]], "offsets": [entry["samples"] + 1]}
            wrong = next((name for name in want if shapes.get(name) != want[name]), None)
            if wrong is None:
                offsets = h.get_tensor("offsets")
                if offsets[0] != 0 or offsets[-1] != entry["tokens"] or bool((offsets.diff() < 0).any()):
                    wrong = "offsets"
        if wrong is not None:
            raise DataError(f"{path} does not hold what {self.directory / META} lists ({wrong}: "
                            f"{shapes.get(wrong, 'missing')}); {_AGAIN}")

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range ({len(self)} samples)")
        k = bisect.bisect_right(self._ends, i)
        handle, offsets = self._shard(k)
        j = i - (self._ends[k - 1] if k else 0)
        a, b = offsets[j], offsets[j + 1]
        return {
            "input_ids": handle.get_slice("input_ids")[a:b].long(),
            "loss_mask": handle.get_slice("loss_mask")[a:b].bool(),
            "features": handle.get_slice("features")[a:b].float(),
        }

    @property
    def vocab_size(self) -> int:
        return self.meta["target"]["vocab_size"]

    def lengths(self) -> list[int]:
        """Token count of every sample, from the shard offsets (no features are read)."""
        out = []
        for k in range(len(self.meta["shards"])):
            offsets = self._shard(k)[1]
            out += [b - a for a, b in zip(offsets, offsets[1:])]
        return out

    def iter_tokens(self, samples: int | None = None):
        """(input_ids, loss_mask) of each whole shard, for token statistics; ``samples``: of the
        first that many samples only."""
        for k in range(len(self.meta["shards"])):
            first = self._ends[k - 1] if k else 0
            if samples is not None and first >= samples:
                return
            handle, offsets = self._shard(k)
            end = offsets[min(len(offsets) - 1, samples - first)] if samples is not None else offsets[-1]
            yield handle.get_slice("input_ids")[:end].long(), handle.get_slice("loss_mask")[:end].bool()

    def _shard(self, k: int):
        if self._open is None or self._open[0] != k:
            handle = open_safetensors(self.directory / self.meta["shards"][k]["file"], remedy=_AGAIN)
            self._open = (k, handle, handle.get_tensor("offsets").tolist())
        return self._open[1], self._open[2]

    def __getstate__(self):
        # DataLoader workers pickle the dataset; each opens its own shard handle.
        return {**self.__dict__, "_open": None}


class FeatureDatasets(torch.utils.data.ConcatDataset):
    """Several prepared directories read as one dataset, in the order given (so a held-out tail
    comes from the last one): the chunks a long regeneration writes (``draft_recipe.py`` prepares
    row ranges) trained on together. Each directory is checked as ``FeatureDataset`` checks one;
    they must hold features of the same width (the caller checks each one's target)."""

    def __init__(self, directories: list[str | os.PathLike], partial: bool = False):
        if not directories:
            raise ParameterError("{} needs at least one prepared directory", "directories")
        parts = [FeatureDataset(d, partial=partial) for d in directories]
        for part in parts[1:]:
            if part.meta["hidden_size"] != parts[0].meta["hidden_size"]:
                raise DataError(f"{part.directory} holds {part.meta['hidden_size']}-wide features, "
                                f"{parts[0].directory} {parts[0].meta['hidden_size']}-wide: prepared for different targets")
        super().__init__(parts)
        self.parts = parts

    @property
    def vocab_size(self) -> int:
        return self.parts[0].vocab_size

    def lengths(self) -> list[int]:
        return [n for part in self.parts for n in part.lengths()]

    def iter_tokens(self, samples: int | None = None):
        """As ``FeatureDataset.iter_tokens``, over the directories in order."""
        for part, first in zip(self.parts, [0, *self.cumulative_sizes]):
            if samples is not None and first >= samples:
                return
            yield from part.iter_tokens(None if samples is None else samples - first)


# --- token files: regenerate on one machine, compute features on another -------------------------


def export_tokens(prepared_dir: str | os.PathLike, out_file: str | os.PathLike) -> int:
    """Write the token ids and answer masks of a prepared directory (no features: ~1/250 of the
    size) to one safetensors file, with the preparation's settings as metadata; returns the
    number of samples. ``prepare_features(..., from_tokens=out_file)`` computes the features
    again elsewhere, e.g. after regenerating the answers on a GPU."""
    prepared_dir = Path(prepared_dir)
    meta = read_meta(prepared_dir)
    source = {k: meta.get(k) for k in ("data", "regenerate", "regen_max_new_tokens", "regen_dtype", "regen_temperature",
                                       "max_length", "target")}
    return _join_tokens([prepared_dir / s["file"] for s in meta["shards"]], out_file, json.dumps(source))


def merge_tokens(files: list[str | os.PathLike], out_file: str | os.PathLike) -> int:
    """One token file holding every sample of the token ``files``, in order, with the first
    file's settings as metadata (e.g. two regeneration runs); returns the number of samples."""
    with open_safetensors(files[0], remedy="give token files written by export_tokens") as h:
        source = (h.metadata() or {}).get("turbolm_source", "{}")
    return _join_tokens(files, out_file, source)


def _join_tokens(files, out_file, source: str) -> int:
    """The input ids, answer masks and offsets of safetensors ``files`` (token files or feature
    shards: both hold these three) concatenated into ``out_file``, written atomically."""
    from safetensors.torch import save_file

    ids, masks, offsets = [], [], [0]
    for f in files:
        t = load_safetensors(f, remedy=_AGAIN)
        ids.append(t["input_ids"]), masks.append(t["loss_mask"])
        offsets += (t["offsets"][1:] + offsets[-1]).tolist()
    tensors = {"input_ids": torch.cat(ids), "loss_mask": torch.cat(masks), "offsets": torch.tensor(offsets)}
    atomic_write(Path(out_file), lambda tmp: save_file(tensors, str(tmp), metadata={"turbolm_source": source}))
    return len(offsets) - 1


def read_tokens(path: str | os.PathLike) -> tuple[list[_Sample], dict]:
    """The samples of a token file (or of a prepared directory's shards) and its source settings."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        files, source = [path / s["file"] for s in read_meta(path)["shards"]], read_meta(path)
    elif path.is_file():
        files, source = [path], {}
    else:
        raise TurboLMError(f"token file not found: {path}")
    samples = []
    for f in files:
        try:
            with safe_open(str(f), "pt") as h:
                if not source:
                    source = json.loads((h.metadata() or {}).get("turbolm_source", "{}"))
                ids, mask, off = h.get_tensor("input_ids").tolist(), h.get_tensor("loss_mask").tolist(), h.get_tensor("offsets").tolist()
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise TurboLMError(f"cannot read token file {f}: {str(e).splitlines()[0]}") from None
        samples += [_Sample(ids[a:b], mask[a:b]) for a, b in zip(off, off[1:])]
    return samples, source


def _tokens_for(path, model) -> tuple[list[_Sample], dict]:
    """:func:`read_tokens`, checked against the target that will compute their features."""
    from ...core.models import identity_mismatch

    samples, source = read_tokens(path)
    if source.get("target") and identity_mismatch(source["target"], model):
        raise TurboLMError(f"the tokens in {path} were made with another target: {identity_mismatch(source['target'], model)}")
    if any(max(s.input_ids, default=0) >= model.config.vocab_size for s in samples):
        raise TurboLMError(f"{path} holds token ids outside the target's vocabulary")
    return samples, source


class TokenFeatures(torch.utils.data.Dataset):
    """The samples of a token file (:func:`export_tokens`) with the target's features computed
    once, in memory, by ``model`` (on its device, in its precision): training without storing
    features (they cost hidden_size x 2 bytes per token on disk, ~1.2 KB for a 576-wide model).
    ``samples``: the first N samples only. Items and methods as :class:`FeatureDataset`'s;
    ``meta`` holds the target's identity and hidden size."""

    def __init__(self, path: str | os.PathLike, model, *, samples: int | None = None, batch_size: int = 64,
                 progress: bool = False):
        items, source = _tokens_for(path, model)
        items = items[:samples] if samples else items
        if not items:
            raise DataError(f"{path} holds no samples")
        self.meta = {"target": model_identity(model), "hidden_size": model.config.hidden_size, "source": source}
        self._ids = [torch.tensor(s.input_ids, dtype=torch.long) for s in items]
        self._masks = [torch.tensor(s.loss_mask, dtype=torch.bool) for s in items]
        self._features = []
        step = max(1, batch_size) * 16  # progress in chunks; each chunk batched by length
        for a in _progress_range(len(items), step, "features", progress):
            chunk = extract_features(model, [s.input_ids for s in items[a : a + step]], batch_size=batch_size,
                                     dtype=model.dtype)
            self._features += [f.to(model.device) for f in chunk]  # kept where training reads them (a GPU)

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self._ids[i], "loss_mask": self._masks[i], "features": self._features[i].float()}

    @property
    def vocab_size(self) -> int:
        return self.meta["target"]["vocab_size"]

    def lengths(self) -> list[int]:
        return [len(t) for t in self._ids]

    def iter_tokens(self, samples: int | None = None):
        """(input_ids, loss_mask) of the first ``samples`` samples (default all), as one pair."""
        n = len(self) if samples is None else min(samples, len(self))
        yield torch.cat(self._ids[:n]), torch.cat(self._masks[:n])


def _progress_range(total: int, step: int, desc: str, progress: bool):
    """range(0, total, step) with a progress bar over ``total`` items on stderr."""
    from tqdm import tqdm

    with tqdm(total=total, unit="sample", desc=desc, disable=not progress, file=sys.stderr) as bar:
        for a in range(0, total, step):
            yield a
            bar.update(min(step, total - a))


def prepare_from_tokens(target_source, tokens_path, out_dir, *, batch_size: int = 8, shard_size: int = 256,
                        dtype: str = "float32", device: str = "cpu", progress: bool = True) -> dict:
    """Like :func:`prepare_features`, from token ids and answer masks already made (see
    :func:`export_tokens`): only the target's features are computed. Resumable the same way."""
    from tqdm import tqdm

    _check_settings(None, None, batch_size, shard_size, None)
    tokens_path = Path(tokens_path).expanduser().resolve()
    model, tokenizer = load_target(target_source, dtype=dtype, device=device)
    samples, source = _tokens_for(tokens_path, model)
    header = {
        "format": FORMAT, "target": model_identity(model), "hidden_size": model.config.hidden_size,
        "features_dtype": "bfloat16" if model.dtype == torch.bfloat16 else "float16",
        "data": str(tokens_path), "regenerate": source.get("regenerate"),
        "regen_max_new_tokens": source.get("regen_max_new_tokens"), "regen_dtype": source.get("regen_dtype"),
        "regen_temperature": source.get("regen_temperature"), "max_length": source.get("max_length"),
        "chat_template_sha256": _template_sha(tokenizer), "tokens_source": source.get("data"),
    }
    out = Path(out_dir).expanduser()
    meta = _open_out_dir(out, header)
    meta["rows_total"] = len(samples)
    write_json(out / META, meta)
    features_dtype = getattr(torch, header["features_dtype"])
    with tqdm(total=len(samples), initial=meta["rows_done"], unit="sample", desc="features", disable=not progress,
              file=sys.stderr) as bar:
        while meta["rows_done"] < len(samples):
            chunk = samples[meta["rows_done"] : meta["rows_done"] + shard_size]
            features = extract_features(model, [s.input_ids for s in chunk], batch_size=batch_size, dtype=features_dtype)
            _append_shard(out, meta, chunk, features, meta["rows_done"], meta["rows_done"] + len(chunk))
            bar.update(len(chunk))
    meta["complete"] = True
    write_json(out / META, meta)
    return meta
