"""Spec-Bench for speculative decoding: every method on the same questions, in one process.

Per question, each method answers every turn of the question as a chat (its own earlier
answers are part of the conversation), one method after the other, the order rotating from
question to question, so machine drift hits every method alike. Each (question, method) is appended to
``results.jsonl`` as soon as it is measured; ``report.json``, ``report.md`` and the plots
are written at the end, also after Ctrl-C (from the questions every method finished).

A run never destroys an earlier one in the same directory: without ``resume`` or ``overwrite``
it refuses. ``resume`` continues it (``run.json`` holds the settings every question was measured
with; they must not differ), measuring only the questions it has not finished. ``overwrite``
measures again into ``results.new.jsonl`` and replaces the old results only when the new run is
complete or has measured at least as many questions.

Speedup follows Spec-Bench: the mean over questions of the per-question tokens/s ratio
method / vanilla. tau is the mean number of tokens per target forward after the prefill
(the mean accepted length incl. the bonus token; 1.0 for vanilla). At temperature 0 every
method's token ids are compared with vanilla's: turbolm's methods must never differ.
On request, ``llama-cpp`` and ``llama-cpp-prompt-lookup`` run llama.cpp on the model's GGUF file
(quantised weights) from the same prompt ids: the outside anchor (``turbolm.bench.llamacpp``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..core.chat import run_turns
from ..core.errors import ParameterError, TurboLMError, literal
from ..core.generation import GenerationResult, SamplingParams, check_prompt_length, eos_token_ids, synchronize, tau_of
from ..core.io import file_sha256, read_cache_json, settings_differences, write_json, write_text
from ..core.machine import cpu_snapshot, describe_machine, load_average, other_cpus_busy
from ..core.models import describe_model
from ..speculative.factory import DRAFT_METHODS, DecoderSpec, build_decoder
from ..speculative.sizing import SizingGrid
from .llamacpp import LLAMA_CPP_METHODS, build_llama_cpp, import_llama_cpp

log = logging.getLogger(__name__)

METHODS = ("vanilla", "hf-generate", "hf-prompt-lookup", "prompt-lookup", "eagle2", "jakiro", "hybrid")
#: methods run on request only (``methods=[..., "llama-cpp"]``): llama.cpp on the GGUF file, the
#: outside anchor (turbolm.bench.llamacpp; needs the optional package llama-cpp-python)
OPTIONAL_METHODS = LLAMA_CPP_METHODS
#: turbolm's own decoders: at temperature 0 their output must be vanilla's, token for token
OURS = ("vanilla", "prompt-lookup", "eagle2", "jakiro", "hybrid")
#: a suffix for any of turbolm's speculative methods: the same decoder with the speculation gate
#: (``DecoderSpec.adaptive``), e.g. ``hybrid+adaptive``, to compare both in one run
ADAPTIVE = "+adaptive"
HF_PROMPT_LOOKUP_TOKENS = 10
WARMUP_MAX_NEW_TOKENS = 64


@dataclass
class SpecBenchConfig:
    """One benchmark run. ``drafts`` maps eagle2 / jakiro / hybrid to a checkpoint directory
    (default: the shipped draft; hybrid: jakiro's); ``hybrid_mode``: merge (None: the default) or
    choose; ``total_tokens`` / ``depth`` / ``top_k`` of None keep each proposer's default tree."""

    questions: str
    out: str
    methods: Sequence[str] = METHODS
    model: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int = 0
    limit: int | None = None
    categories: Sequence[str] | None = None
    per_category: int | None = None  # the first N questions of each category (after --categories)
    tree: str = "fixed"  # "auto": eagle2 / jakiro / hybrid trees sized for this machine (turbolm.speculative.sizing)
    drafts: dict[str, str] = field(default_factory=dict)
    total_tokens: int | None = None
    depth: int | None = None
    top_k: int | None = None
    hybrid_mode: str | None = None
    warmup: int = 1
    fast_cpu: str = "auto"  # see turbolm.core.kernels.apply_fast_cpu; every method shares the model, so vanilla too
    grid: SizingGrid | None = None  # what tree="auto" chooses among (None: the full grid)
    retime: bool = False  # tree="auto": time the target and the drafts again instead of using the cached timings
    resume: bool = False  # continue the run in ``out`` (same settings): measure only the questions it has not finished
    overwrite: bool = False  # measure again; the old results are replaced only by a complete run or as many questions
    llama_cpp_gguf: str | None = None  # the GGUF the llama-cpp methods run (default: the model's own GGUF file)


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]


# --- questions ------------------------------------------------------------------------------


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("question_id"), (int, str)) or isinstance(row.get("question_id"), bool):
        return "no question_id"
    if not isinstance(row.get("category"), str) or not row["category"]:
        return "no category"
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        return "turns is not a list of non-empty strings"
    return None


def load_questions(path: str | Path) -> tuple[list[Question], Counter]:
    """Questions of a Spec-Bench jsonl file, and a count of skipped rows by reason."""
    p = Path(path)
    if not p.is_file():
        raise TurboLMError(f"questions file not found: {path}")
    questions: list[Question] = []
    skipped: Counter = Counter()
    seen: set = set()
    for line in p.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            skipped["invalid JSON"] += 1
            continue
        problem = _row_problem(row)
        if problem is None and row["question_id"] in seen:
            problem = "duplicate question_id"
        if problem:
            skipped[problem] += 1
            continue
        seen.add(row["question_id"])
        questions.append(Question(row["question_id"], row["category"], tuple(row["turns"])))
    if not questions:
        raise TurboLMError(f"{path} has no valid question (each line: question_id, category, turns)"
                           + (f"; skipped {sum(skipped.values())} malformed row(s)" if skipped else ""))
    return questions, skipped


def select_questions(questions: list[Question], categories: Sequence[str] | None, limit: int | None,
                     per_category: int | None = None) -> list[Question]:
    if categories:
        known = list(dict.fromkeys(q.category for q in questions))
        unknown = [c for c in categories if c not in known]
        if unknown:
            raise TurboLMError(f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)}; "
                               f"the questions file has: {', '.join(known)}")
        questions = [q for q in questions if q.category in set(categories)]
    if per_category is not None:
        seen: Counter = Counter()
        questions = [q for q in questions if (seen.update([q.category]) or seen[q.category] <= per_category)]
    return questions[:limit] if limit is not None else questions


# --- methods --------------------------------------------------------------------------------

#: ``decode(prompt_ids, max_new_tokens, sampling) -> GenerationResult`` whose ``stats`` carry
#: ``tokens_per_step_histogram`` (tokens per target forward after the prefill)
Decoder = Callable[[list[int], int, SamplingParams], GenerationResult]


@dataclass
class Method:
    name: str
    decode: Decoder
    tree: dict | None = None  # the draft tree settings of a speculative method
    about: dict | None = None  # what the report says of a method that is not turbolm's (llama.cpp's build, weights)


class _ForwardRecorder:
    """Counts the target's forwards inside ``with`` and notes the cache length before each:
    the growth between two forwards is what the earlier one committed."""

    def __init__(self, model):
        self.model = model
        self.cache_lengths: list[int | None] = []

    def _pre(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self.cache_lengths.append(cache.get_seq_length() if hasattr(cache, "get_seq_length") else None)

    def __enter__(self):
        self._handle = self.model.register_forward_pre_hook(self._pre, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def histogram(self, end: int) -> dict[str, int] | None:
        """Tokens committed per forward after the prefill; ``end`` is the position of the last token."""
        starts = self.cache_lengths[1:]
        if any(s is None for s in starts):
            return None
        steps = Counter(b - a for a, b in zip(starts, starts[1:] + [end]))
        return {str(k): steps[k] for k in sorted(steps)}


def hf_generate(model, tokenizer, ids: list[int], max_new_tokens: int, sampling: SamplingParams,
                prompt_lookup_tokens: int | None = None) -> GenerationResult:
    """transformers' own ``model.generate`` (optionally its prompt lookup), as a GenerationResult.

    Logits processors a checkpoint's generation_config may switch on (repetition penalty,
    no-repeat n-grams, a default top-k) are neutralised, so it decodes the same distribution as
    vanilla; the output ends at the first EOS (kept), as vanilla's does.
    """
    from transformers import GenerationConfig

    budget = check_prompt_length(len(ids), max_new_tokens, model, tokenizer)
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    config = GenerationConfig(
        max_new_tokens=budget, do_sample=not sampling.greedy, num_beams=1, repetition_penalty=1.0,
        no_repeat_ngram_size=0, pad_token_id=pad, eos_token_id=sorted(eos) or None,
        prompt_lookup_num_tokens=prompt_lookup_tokens,
        **({} if sampling.greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p,
                                        "top_k": sampling.top_k}),
    )
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    x = torch.tensor([ids], device=model.device)
    start = time.perf_counter()
    with torch.inference_mode(), _ForwardRecorder(model) as rec:
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)
    seconds = time.perf_counter() - start
    new = out[0, len(ids):].tolist()[:budget]
    end = next((i + 1 for i, t in enumerate(new) if t in eos), None)
    new, finish = (new, "length") if end is None else (new[:end], "eos")
    forwards = len(rec.cache_lengths)
    histogram = rec.histogram(len(ids) + len(new) - 1)
    return GenerationResult(
        token_ids=new, text=tokenizer.decode(new, skip_special_tokens=True), prompt_tokens=len(ids),
        finish_reason=finish, target_forwards=forwards, seconds=seconds, prefill_seconds=float("nan"),
        stats={"method": "hf-prompt-lookup" if prompt_lookup_tokens else "hf-generate",
               "tokens_per_step_histogram": histogram},
    )


def decoder_spec(name: str, config: SpecBenchConfig) -> DecoderSpec:
    """The DecoderSpec of one of turbolm's own methods in this run: the one ``turbolm generate``
    builds for the same draft, tree and sampling flags (prompt lookup keeps a fixed tree)."""
    name, adaptive = split_method(name)
    sizes = {"total_tokens": config.total_tokens, "depth": config.depth, "top_k": config.top_k, "adaptive": adaptive}
    sampling = SamplingParams(temperature=config.temperature) if config.temperature else None
    if name == "vanilla":
        return DecoderSpec("none")
    if name == "prompt-lookup":
        return DecoderSpec(name, tree="fixed", **sizes)
    drafts = config.drafts or {}
    if name == "hybrid":  # prompt lookup with the Jakiro draft of this run unless it has its own
        return DecoderSpec(name, draft=drafts.get(name, drafts.get("jakiro")), tree=config.tree,
                           hybrid_mode=config.hybrid_mode, retime=config.retime, sampling=sampling, **sizes)
    return DecoderSpec(name, draft=drafts.get(name), tree=config.tree, retime=config.retime, sampling=sampling, **sizes)


def split_method(name: str) -> tuple[str, bool]:
    """``(method, adaptive)`` of a method name: ``hybrid+adaptive`` -> ``("hybrid", True)``."""
    if name.endswith(ADAPTIVE):
        return name[: -len(ADAPTIVE)], True
    return name, False


def is_ours(name: str) -> bool:
    """One of turbolm's own decoders (their greedy outputs must equal vanilla's)."""
    base, adaptive = split_method(name)
    return base in OURS and not (adaptive and base == "vanilla")


def _ours(name: str, model, tokenizer, config: SpecBenchConfig) -> Method:
    """One of turbolm's own methods, built by ``build_decoder``."""
    try:
        decoder = build_decoder(model, tokenizer, decoder_spec(name, config), log=lambda m: log.warning("%s", m),
                                grid=config.grid)
    except ParameterError:
        raise
    except TurboLMError as e:
        if split_method(name)[0] not in DRAFT_METHODS:
            raise
        raise ParameterError(f"{name}: {e}; give a draft trained for this model with {{}} {name}=DIR, "
                             f"or leave {name} out of {{}}", "drafts", "methods") from None
    if decoder.tree_choice is not None:
        log.warning("%s: %s", name, decoder.tree_choice.explain())

    def decode(ids, n, sampling):
        r = decoder.generate(ids, max_new_tokens=n, sampling=sampling)
        if name == "vanilla":
            r.stats = {"method": "vanilla",
                       "tokens_per_step_histogram": {"1": r.target_forwards - 1} if r.target_forwards > 1 else {}}
        return r

    return Method(name, decode, None if decoder.tree is None else vars(decoder.tree).copy())


def build_methods(names: Sequence[str], model, tokenizer, config: SpecBenchConfig) -> list[Method]:
    """One Method per name, in the given order: turbolm's own through ``build_decoder``, the
    transformers baselines through ``hf_generate``, llama.cpp through ``build_llama_cpp``."""
    methods = []
    for name in names:
        if name == "hf-generate":
            methods.append(Method(name, lambda ids, n, s: hf_generate(model, tokenizer, ids, n, s)))
        elif name == "hf-prompt-lookup":
            methods.append(Method(name, lambda ids, n, s: hf_generate(model, tokenizer, ids, n, s, HF_PROMPT_LOOKUP_TOKENS)))
        elif name in LLAMA_CPP_METHODS:
            decoder = build_llama_cpp(name, model, tokenizer, eos_token_ids(model, tokenizer), config.llama_cpp_gguf,
                                      seed=config.seed)
            methods.append(Method(name, decoder.generate, about={"kind": "llama.cpp", **decoder.info}))
        elif is_ours(name):
            methods.append(_ours(name, model, tokenizer, config))
        else:
            raise ParameterError(f"unknown method '{name}' in {{}}; use any of {', '.join(METHODS + OPTIONAL_METHODS)}",
                                 "methods")
    return methods


def check_methods(methods: Sequence[str], drafts: dict[str, str]) -> list[str]:
    """Validated method list, vanilla first (it is the baseline of every comparison)."""
    methods = [m.strip() for m in methods if m.strip()]
    unknown = [m for m in methods if m not in METHODS + OPTIONAL_METHODS and not (is_ours(m) and m.endswith(ADAPTIVE))]
    if unknown:
        raise ParameterError(f"unknown method{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {{}}; "
                             f"use any of {', '.join(METHODS + OPTIONAL_METHODS)} (turbolm's speculative ones also "
                             f"with {ADAPTIVE})", "methods")
    for name in drafts:
        if name not in DRAFT_METHODS:
            raise ParameterError(f"{{}} {name}=...: drafts are for {' / '.join(DRAFT_METHODS)} only", "drafts")
        if name not in (split_method(m)[0] for m in methods):
            raise ParameterError(f"{{}} {name}=... given but {name} is not in {{}}", "drafts", "methods")
    return ["vanilla"] + [m for m in dict.fromkeys(methods) if m != "vanilla"]


# --- earlier runs in the output directory -----------------------------------------------------

RESULTS, RUN, NEW_RESULTS, NEW_RUN = "results.jsonl", "run.json", "results.new.jsonl", "run.new.json"
#: SpecBenchConfig fields a resumed run may change: which questions (the file's content must not),
#: the warm-up, the timing cache, how the run is started
RESUME_MAY_CHANGE = ("questions", "out", "limit", "categories", "per_category", "warmup", "retime", "resume", "overwrite")
#: what a record of results.jsonl needs to count in a report
RECORD_KEYS = {"question_id", "category", "method", "new_tokens", "seconds", "tokens_per_second", "tau",
               "target_forwards", "accepted_length_histogram", "token_ids"}


def run_settings(config: SpecBenchConfig, methods: list[str], drafts: dict[str, str]) -> dict:
    """What every question of a run is measured with, as JSON: a resumed run must share it."""
    settings = {k: v for k, v in asdict(config).items() if k not in RESUME_MAY_CHANGE}
    settings.update(methods=list(methods), drafts=drafts, questions_sha256=file_sha256(config.questions)[:16])
    return json.loads(json.dumps(settings, default=str))


@dataclass
class PreviousRun:
    """A run found in the output directory: its settings and draft trees (``run.json``; None for a
    run of an older turbolm) and the records of the questions every one of its methods finished."""

    settings: dict | None
    trees: dict | None
    records: list[dict]

    @property
    def questions(self) -> int:
        return len({r["question_id"] for r in self.records})


def read_previous_run(out: Path) -> PreviousRun | None:
    """The run in ``out``, or None when it holds no finished question. Unreadable lines (the last
    one of a killed run) are left out."""
    results = out / RESULTS
    if not results.is_file():
        return None
    run, _ = read_cache_json(out / RUN)  # unreadable or damaged: {}, and the records speak for themselves
    run = run if isinstance(run.get("settings"), dict) else None
    by_question: dict = {}
    for line in results.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and RECORD_KEYS <= r.keys() and isinstance(r["question_id"], (int, str)):
            by_question.setdefault(r["question_id"], {})[r["method"]] = r
    methods = run["settings"].get("methods") if run else None
    methods = set(methods or {m for per_method in by_question.values() for m in per_method})
    records = [r for per_method in by_question.values() if methods <= per_method.keys() for r in per_method.values()
               if r["method"] in methods]
    if not records:
        return None
    return PreviousRun(run["settings"] if run else None, run.get("trees") if run else None, records)


def _check_previous(previous: PreviousRun | None, config: SpecBenchConfig, settings: dict) -> list[dict]:
    """The records a run into ``config.out`` continues from (``resume``), or none; refuses to
    touch an earlier run without ``resume`` or ``overwrite``, and a resume with other settings."""
    if config.resume and config.overwrite:
        raise ParameterError("give {} or {}, not both", "resume", "overwrite")
    if previous is None or config.overwrite:
        return []
    out = literal(config.out)
    if not config.resume:
        raise ParameterError(f"{out} already holds a Spec-Bench run ({previous.questions} question(s) measured): pass "
                             "{} to continue it, {} to measure again (the old results are replaced only by a complete "
                             "run or as many questions), or choose another {}", "resume", "overwrite", "out")
    if previous.settings is None:
        raise ParameterError(f"{out} holds results without {RUN} (from an older turbolm): the settings they were "
                             "measured with are unknown; measure again with {}", "overwrite")
    changed = settings_differences(previous.settings, settings)
    if changed:
        raise ParameterError(f"{out} was measured with other settings ({literal(changed)}): resume it with the same "
                             "settings, or measure again with {}", "overwrite")
    return previous.records


def _check_trees(previous: PreviousRun | None, trees: dict, config: SpecBenchConfig) -> None:
    """A resumed run measures with the draft trees of the questions before it (--tree auto sizes
    them for the machine)."""
    if previous is None or previous.trees is None:
        return
    changed = settings_differences(previous.trees, trees)
    if changed:
        raise ParameterError(f"{literal(config.out)} was measured with other draft trees ({literal(changed)}): "
                             "resume it on the machine that started it, or measure again with {}", "overwrite")


# --- measuring ------------------------------------------------------------------------------


def measure(decode: Decoder, model, tokenizer, question: Question, max_new_tokens: int,
            sampling: SamplingParams) -> dict:
    """Answer every turn of ``question`` with one method; the summed measurements and outputs."""
    results: list[GenerationResult] = []
    seconds = 0.0

    def respond(ids):
        nonlocal seconds
        synchronize(model.device)
        t0 = time.perf_counter()
        r = decode(ids, max_new_tokens, sampling)
        synchronize(model.device)
        seconds += time.perf_counter() - t0
        results.append(r)
        return r.text

    run_turns(tokenizer, question.turns, respond)
    histogram: Counter = Counter()
    for r in results:
        h = r.stats.get("tokens_per_step_histogram")
        histogram = None if h is None or histogram is None else histogram + Counter({int(k): v for k, v in h.items()})
    new_tokens = sum(r.new_tokens for r in results)
    forwards = sum(r.target_forwards for r in results)
    return {
        "new_tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_second": new_tokens / seconds if seconds > 0 else float("nan"),
        "tau": tau_of(results),
        "target_forwards": forwards,
        # the speculative engine's own split of its time (None for the other methods)
        "draft_seconds": _stat_sum(results, "draft_seconds"),
        "verify_seconds": _stat_sum(results, "verify_seconds"),
        "accepted_length_histogram": None if histogram is None else {str(k): histogram[k] for k in sorted(histogram)},
        "prompt_tokens": [r.prompt_tokens for r in results],
        "finish_reasons": [r.finish_reason for r in results],
        "token_ids": [r.token_ids for r in results],
        "text": [r.text for r in results],
    }


def _stat_sum(results: list[GenerationResult], key: str) -> float | None:
    values = [r.stats.get(key) for r in results]
    return None if any(v is None for v in values) else sum(values)


def first_difference(a: list[list[int]], b: list[list[int]]) -> dict | None:
    """Where two multi-turn outputs first differ (turn, token position), or None if identical."""
    for turn, (x, y) in enumerate(zip(a, b)):
        if x != y:
            pos = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
            return {"turn": turn, "position": pos}
    return None if len(a) == len(b) else {"turn": min(len(a), len(b)), "position": 0}


def _warm_up(methods: list[Method], tokenizer, questions: list[Question], n: int, max_new_tokens: int,
             sampling: SamplingParams) -> None:
    from ..core.chat import encode_chat

    for q in questions[:n]:
        ids = encode_chat(tokenizer, [{"role": "user", "content": q.turns[0]}])
        for m in methods:
            m.decode(ids, min(max_new_tokens, WARMUP_MAX_NEW_TOKENS), sampling)


def run_question(q: Question, index: int, methods: list[Method], model, tokenizer, max_new_tokens: int,
                 sampling: SamplingParams, sink) -> dict[str, dict]:
    """Every method on one question, each record appended to ``sink`` as soon as it is measured.

    The method order rotates with ``index`` so that no method always runs first (right after
    another question, with colder caches) or always right after a particular other method.
    """
    k = index % len(methods)
    per_method: dict[str, dict] = {}
    for position, m in enumerate(methods[k:] + methods[:k]):
        rec = {"question_id": q.question_id, "category": q.category, "method": m.name, "turns": len(q.turns),
               "order": position, **measure(m.decode, model, tokenizer, q, max_new_tokens, sampling)}
        sink.write(json.dumps(rec) + "\n")
        sink.flush()
        per_method[m.name] = rec
    if sampling.greedy:
        compare_with_vanilla(per_method)
    return {m.name: per_method[m.name] for m in methods}


def compare_with_vanilla(per_method: dict[str, dict]) -> None:
    """Add ``first_difference`` (greedy outputs only) to every record of one question but vanilla's."""
    for name, rec in per_method.items():
        if name != "vanilla":
            rec["first_difference"] = first_difference(rec["token_ids"], per_method["vanilla"]["token_ids"])


def context_at(tokenizer, question: Question, answers: Sequence[str], turn: int, prefix: Sequence[int]) -> list[int]:
    """The token ids a method saw before ``prefix`` of turn ``turn``'s answer, ``answers`` being the earlier turns'."""
    prompts: list[list[int]] = []

    def respond(ids):
        prompts.append(ids)
        return answers[len(prompts) - 1] if len(prompts) <= len(answers) else ""

    run_turns(tokenizer, question.turns[: turn + 1], respond)
    return list(prompts[turn]) + list(prefix)


@torch.inference_mode()
def logit_gaps(records: list[dict], questions: dict, model, tokenizer, reference=None) -> int:
    """At every greedy difference from vanilla, how close the choice was: adds ``logit_gap`` to ``first_difference``.

    ``logit_gap`` = logit(vanilla's token) - logit(the method's token) from one forward of the
    model over the common context (in its own dtype), and ``logit_gap_float32`` the same from
    ``reference`` (a float32 copy of the target) when given: a near-tie that a different
    rounding order can break has both close to 0. Returns the number of differences measured.
    """
    vanilla = {r["question_id"]: r for r in records if r["method"] == "vanilla"}
    measured = 0
    for rec in records:
        diff, base = rec.get("first_difference"), vanilla.get(rec["question_id"])
        if not diff or base is None or rec["question_id"] not in questions or "logit_gap" in diff:
            continue
        turn, pos = diff["turn"], diff["position"]
        ours, theirs = rec["token_ids"], base["token_ids"]
        if turn >= min(len(ours), len(theirs)) or pos >= min(len(ours[turn]), len(theirs[turn])):
            continue  # one output ended where the other went on: no pair of tokens to compare
        ids = context_at(tokenizer, questions[rec["question_id"]], base["text"], turn, theirs[turn][:pos])
        diff.update(vanilla_token=theirs[turn][pos], method_token=ours[turn][pos])
        for key, m in (("logit_gap", model), ("logit_gap_float32", reference)):
            if m is not None:
                logits = m(input_ids=torch.tensor([ids], device=m.device), logits_to_keep=1).logits[0, -1].float()
                diff[key] = round(float(logits[theirs[turn][pos]] - logits[ours[turn][pos]]), 4)
        measured += 1
    return measured


def _measure_gaps(records: list[dict], questions: Sequence[Question], model, tokenizer, config: SpecBenchConfig) -> None:
    """``logit_gaps`` for a run; below float32 also from a float32 copy of the target (loaded for it)."""
    from ..core.models import load_target

    reference = None
    if model.dtype != torch.float32:
        reference = load_target(config.model, dtype="float32", device=config.device)[0]
    logit_gaps(records, {q.question_id: q for q in questions}, model, tokenizer, reference)


def run_spec_bench(config: SpecBenchConfig, target=None, progress: bool = False,
                   on_question: Callable[[Question, dict[str, dict]], None] | None = None) -> dict:
    """Run the benchmark and write its files to ``config.out``; return the report.

    ``target``: an already loaded ``(model, tokenizer)`` (else ``config.model`` is loaded).
    ``on_question(question, records)`` is called after every question all methods finished.
    Ctrl-C (KeyboardInterrupt) ends the run early; the report then covers the questions every
    method finished and has ``interrupted: true``. An earlier run in ``config.out`` is continued
    (``resume``), measured again (``overwrite``; ``kept_previous`` in the report says when the old
    results stay because the new run measured fewer questions) or refused.
    """
    from tqdm.auto import tqdm

    from .report import summarise, write_report

    load_at_start = load_average()
    drafts = dict(config.drafts or {})
    methods = check_methods(config.methods, drafts)
    if any(m in LLAMA_CPP_METHODS for m in methods):
        import_llama_cpp()  # before the model loads: a missing package is refused at once
    elif config.llama_cpp_gguf is not None:
        raise ParameterError(f"{{}} given but no llama.cpp method ({' / '.join(LLAMA_CPP_METHODS)}) is in {{}}",
                             "llama_cpp_gguf", "methods")
    for name, v, lo in (("max_new_tokens", config.max_new_tokens, 1), ("limit", config.limit, 1), ("warmup", config.warmup, 0)):
        if v is not None and v < lo:
            raise ParameterError(f"{{}} must be >= {lo}, got {v}", name)
    sampling = SamplingParams(temperature=config.temperature, seed=None if config.temperature == 0 else config.seed)
    questions, skipped_rows = load_questions(config.questions)
    if skipped_rows:
        log.warning("%s: skipped %d malformed row(s): %s", config.questions, sum(skipped_rows.values()),
                    ", ".join(f"{n} {why}" for why, n in skipped_rows.items()))
    if config.per_category is not None and config.per_category < 1:
        raise ParameterError(f"{{}} must be >= 1, got {config.per_category}", "per_category")
    selected = select_questions(questions, config.categories, config.limit, config.per_category)
    out = Path(config.out)
    previous = read_previous_run(out)
    settings = run_settings(config, methods, drafts)
    kept = _check_previous(previous, config, settings)  # before the model loads: a refusal is immediate

    if target is None:
        from ..core.kernels import apply_fast_cpu
        from ..core.models import load_target

        target = load_target(config.model, dtype=config.dtype, device=config.device)
        apply_fast_cpu(target[0], config.fast_cpu)
    model, tokenizer = target
    built = build_methods(methods, model, tokenizer, config)
    trees = {m.name: m.tree for m in built if m.tree}
    if kept:
        _check_trees(previous, trees, config)

    out.mkdir(parents=True, exist_ok=True)
    staged = previous is not None and config.overwrite  # the old results stay until the new ones are as many
    results, run_file = (out / NEW_RESULTS, out / NEW_RUN) if staged else (out / RESULTS, out / RUN)
    if kept:  # only the questions every method finished; the others are measured again
        write_text(results, "".join(json.dumps(r) + "\n" for r in kept))
    else:
        write_json(run_file, {"settings": settings, "trees": trees})
    done: dict = {}
    for r in kept:
        done.setdefault(r["question_id"], {})[r["method"]] = dict(r)
    records: list[dict] = []  # one per (question, method), questions every method finished
    for per_method in done.values():
        if sampling.greedy:
            compare_with_vanilla(per_method)
        records.extend(per_method[m] for m in methods)
    measured = 0  # questions this run measured
    skipped_questions: list[dict] = []
    ratios: dict[str, list[float]] = {m: [] for m in methods if m != "vanilla"}  # for the progress bar
    interrupted = False
    bar = tqdm(total=len(selected), initial=sum(q.question_id in done for q in selected), desc="spec-bench",
               unit="question", disable=not progress)
    cpu_at_start = cpu_snapshot()  # after loading: our own loading must not read as a busy machine
    try:
        _warm_up(built, tokenizer, selected, config.warmup, config.max_new_tokens, sampling)
        with results.open("a" if kept else "w", encoding="utf-8") as sink:
            for i, q in enumerate(selected):
                if q.question_id in done:
                    continue
                try:
                    per_method = run_question(q, i, built, model, tokenizer, config.max_new_tokens, sampling, sink)
                except TurboLMError as e:  # e.g. a later turn no longer fits the model's context
                    skipped_questions.append({"question_id": q.question_id, "reason": str(e)})
                    bar.update(1)
                    continue
                records.extend(per_method.values())
                measured += 1
                for name, r in ratios.items():
                    r.append(per_method[name]["tokens_per_second"] / per_method["vanilla"]["tokens_per_second"])
                bar.set_postfix({n: f"{sum(r) / len(r):.2f}x" for n, r in ratios.items()})
                bar.update(1)
                if on_question is not None:
                    on_question(q, per_method)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.close()

    if sampling.greedy and not interrupted and any(r.get("first_difference") for r in records):
        try:
            _measure_gaps(records, selected, model, tokenizer, config)
        except KeyboardInterrupt:
            interrupted = True
    report = summarise(records, methods, greedy=sampling.greedy, ours=[m for m in methods if is_ours(m)])
    report.update(
        machine={**describe_machine(), **describe_model(model), "load_average_start": load_at_start, "load_average_end": load_average(),
                 "other_cpus_busy": other_cpus_busy(cpu_at_start, cpu_snapshot())},
        config={**asdict(config), "methods": methods, "drafts": drafts,
                "hf_prompt_lookup_num_tokens": HF_PROMPT_LOOKUP_TOKENS,
                "warmup_max_new_tokens": min(config.max_new_tokens, WARMUP_MAX_NEW_TOKENS)},
        trees=trees,
        outside={m.name: m.about for m in built if m.about},
        questions={"file": str(config.questions), "valid": len(questions), "selected": len(selected),
                   "measured": report["questions_measured"], "resumed": len(done), "skipped_rows": dict(skipped_rows),
                   "skipped_questions": skipped_questions},
        interrupted=interrupted,
    )
    if staged:
        if interrupted and measured < previous.questions:
            report["kept_previous"] = {"questions": previous.questions, "new_results": str(results)}
            return report
        os.replace(results, out / RESULTS)
        os.replace(run_file, out / RUN)
    write_report(report, out)
    return report
