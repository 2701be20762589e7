"""The one place that turns a plain description of a decoder into a decoder.

``build_decoder(model, tokenizer, DecoderSpec(...))`` is used by the command line, the Spec-Bench
runner, the demo and anything later (a server): the same spec gives the same proposer, the same
tree and the same ``--tree auto`` cache entry everywhere.

Every decoder has ``generate(ids, max_new_tokens, sampling, stop, on_text) -> GenerationResult``,
``stream(ids, ...)`` (text pieces; ``result`` afterwards), ``name``, ``tree`` (the draft tree, None
for vanilla) and ``tree_choice`` (what ``--tree auto`` chose and why, else None).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import ParameterError, literal
from ..core.generation import SamplingParams, VanillaDecoder
from .engine import SpeculativeGenerator
from .sizing import SizingGrid, auto_tree, stored_acceptance, timing_key
from .tree import TreeConfig

METHODS = ("none", "prompt-lookup", "model", "jakiro", "eagle2", "hybrid")
DRAFT_METHODS = ("eagle2", "jakiro", "hybrid")  # trained feature-level drafts (a checkpoint directory)
TREES = ("auto", "fixed")


@dataclass(frozen=True)
class DecoderSpec:
    """What to decode with.

    ``method``: none (vanilla), prompt-lookup, model (a small LM with the target's tokenizer:
    ``draft`` = its directory or .gguf, or ``draft_layers`` = the target's first N layers), jakiro
    or eagle2 (``draft`` = a checkpoint directory, default the shipped one; ``candidate_mode``
    overrides a Jakiro draft's), hybrid (prompt lookup with a trained draft, ``draft`` as for
    jakiro, default the shipped Jakiro draft; ``hybrid_mode`` merge, the default: the n-gram branch
    merged into the draft's tree, or choose: per step the n-gram tree or the draft's, whichever is
    expected to accept more). ``tree``: auto (sized for this machine from measured costs and the
    draft's acceptance; for hybrid merge, of the merged trees; for choose, of the draft's own),
    fixed (the proposer's default tree or ``total_tokens`` / ``depth`` / ``top_k``), or None: auto
    for model / jakiro / eagle2 / hybrid unless a size is given, else fixed. Sizes: ``total_tokens``
    proposed nodes, the root not counted; ``depth`` levels below the root (hybrid: the draft's tree;
    a merge adds up to 10 n-gram nodes). ``adaptive``: per step, speculate or take a plain
    one-token step, whichever is measured faster on the text being written (``SpeculationGate``).
    ``retime``: with an automatic tree, time the target and the draft again instead of trusting the
    cached timings (which are checked against a fresh one-token step on every use anyway).
    ``sampling``: the sampling the decoder will be used with, for ``--tree auto`` (None: greedy;
    sampling accepts fewer draft tokens, so its tree is sized from statistics recorded sampling).
    """

    method: str = "none"
    draft: str | None = None
    draft_layers: int | None = None
    candidate_mode: str | None = None
    tree: str | None = None
    total_tokens: int | None = None
    depth: int | None = None
    top_k: int | None = None
    hybrid_mode: str | None = None
    adaptive: bool = False
    retime: bool = False
    sampling: SamplingParams | None = None

    @property
    def manual_tree(self) -> bool:
        return any(v is not None for v in (self.total_tokens, self.depth, self.top_k))

    @property
    def auto_tree(self) -> bool:
        if self.tree is not None:
            return self.tree == "auto"
        return self.method not in ("none", "prompt-lookup") and not self.manual_tree

    def check(self) -> DecoderSpec:
        """Raise :class:`ParameterError` for a spec that cannot be built; return it otherwise."""
        if self.method not in METHODS:
            raise ParameterError(f"{{}} must be one of {', '.join(METHODS)}, got {self.method!r}", "method")
        if self.tree not in (None, *TREES):
            raise ParameterError(f"{{}} must be auto or fixed, got {self.tree!r}", "tree")
        for name in ("total_tokens", "depth", "top_k", "draft_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ParameterError(f"{{}} must be >= 1, got {value}", name)
        if self.method == "none" and self.manual_tree:
            raise ParameterError("{} / {} / {} need a {} other than none", "total_tokens", "depth", "top_k", "method")
        if self.tree == "auto" and self.method == "prompt-lookup":
            raise ParameterError("{} auto sizes a draft model's tree; {} prompt-lookup takes a fixed one", "tree", "method")
        if self.tree == "auto" and self.manual_tree:
            raise ParameterError("{} auto chooses {} / {} / {} itself; give one or the other", "tree",
                                 "total_tokens", "depth", "top_k")
        if self.method == "model":
            if not self.draft and not self.draft_layers:
                raise ParameterError("{} model needs {} (a small LM with the target's tokenizer) or {} (the "
                                     "target's first N layers)", "method", "draft", "draft_layers")
            if self.draft and self.draft_layers:
                raise ParameterError("give {} or {}, not both", "draft", "draft_layers")
        elif self.draft_layers is not None:
            raise ParameterError("{} is only used with {} model", "draft_layers", "method")
        if self.retime and not self.auto_tree:
            raise ParameterError("{} is only used with {} auto (a draft's tree sized for this machine)", "retime", "tree")
        if self.method == "none" and self.adaptive:
            raise ParameterError("{} needs a speculative {}", "adaptive", "method")
        if self.method in ("none", "prompt-lookup") and self.draft:
            raise ParameterError("{} is not used with {} " + self.method, "draft", "method")
        if self.candidate_mode is not None and self.method not in DRAFT_METHODS:
            raise ParameterError("{} is only used with {} jakiro, eagle2 or hybrid", "candidate_mode", "method")
        if self.hybrid_mode is not None:
            from .proposers.hybrid import MODES

            if self.method != "hybrid":
                raise ParameterError("{} is only used with {} hybrid", "hybrid_mode", "method")
            if self.hybrid_mode not in MODES:
                raise ParameterError(f"{{}} must be one of {', '.join(MODES)}, got {self.hybrid_mode!r}", "hybrid_mode")
        return self


def build_decoder(model, tokenizer, spec: DecoderSpec, *, log: Callable[[str], None] | None = None,
                  grid: SizingGrid | None = None):
    """The decoder ``spec`` describes, for ``model`` (already loaded, fast kernels applied or not).

    With an automatic tree the costs are measured once per machine and cached; ``log`` receives
    progress lines while that happens, and ``decoder.tree_choice.explain()`` says what was chosen;
    ``grid`` (default: the full one) is what it chooses among.
    """
    spec.check()
    if spec.method == "none":
        return VanillaDecoder(model, tokenizer)
    proposer, draft_id, acceptance = _proposer(model, tokenizer, spec)
    d = proposer.default_tree
    tree = TreeConfig(
        total_tokens=d.total_tokens if spec.total_tokens is None else spec.total_tokens,
        depth=d.depth if spec.depth is None else spec.depth,
        top_k=d.top_k if spec.top_k is None else spec.top_k,
    )
    decoder = SpeculativeGenerator(model, tokenizer, proposer, tree, adaptive=spec.adaptive)
    if spec.auto_tree:
        decoder.tree_choice = auto_tree(decoder, acceptance=acceptance, draft_id=draft_id, log=log,
                                        grid=grid or SizingGrid(), retime=spec.retime, sampling=spec.sampling)
    return decoder


def tree_cache_key(model, tokenizer, spec: DecoderSpec, grid: SizingGrid | None = None) -> str:
    """The ``--tree auto`` cache key ``build_decoder`` uses for ``spec`` (machine, target, proposer
    and the draft's content): equal specs share measurements, a retrained draft never does."""
    proposer, draft_id, _ = _proposer(model, tokenizer, spec.check())
    return timing_key(model, proposer, draft_id + (grid or SizingGrid()).key())


def _proposer(model, tokenizer, spec: DecoderSpec):
    """``(proposer, draft_id, acceptance)``: ``draft_id`` names the draft's content for the timing
    cache; ``acceptance``: the statistics stored with a draft checkpoint, if they apply (else None)."""
    from .proposers import ModelProposer, PromptLookupProposer

    if spec.method == "prompt-lookup":
        return PromptLookupProposer(), "prompt-lookup", None
    if spec.method in DRAFT_METHODS:
        from ..core.io import file_sha256
        from .draft.model import ARCH_NAMES, load_draft, shipped_draft
        from .proposers.jakiro import JakiroProposer

        path = Path(spec.draft or shipped_draft("jakiro" if spec.method == "hybrid" else spec.method)).resolve()
        overrides = {"candidate_mode": spec.candidate_mode} if spec.candidate_mode else {}
        draft = load_draft(path, model, overrides=overrides)
        if spec.method != "hybrid" and draft.config.arch != spec.method:  # hybrid takes either kind
            have, where = draft.config.arch, literal(path)
            raise ParameterError(f"the draft {where} is of kind {have} ({ARCH_NAMES[have]}), not {spec.method}: "
                                 f"use {{}} {have}", "method")
        draft_id = f"{spec.method}:{file_sha256(path / 'model.safetensors')[:16]}:{spec.candidate_mode}"
        proposer = JakiroProposer(draft, model)
        if spec.method == "hybrid":
            from .proposers.hybrid import HybridProposer

            proposer = HybridProposer(proposer, mode=spec.hybrid_mode or "merge")
            draft_id = f"{draft_id}:{proposer.mode}"
        return proposer, draft_id, stored_acceptance(path, overrides)
    if spec.draft_layers:
        from .proposers.small_model import truncated_draft

        return ModelProposer(truncated_draft(model, spec.draft_layers), tokenizer), f"layers:{spec.draft_layers}", None
    from ..core.kernels import optimize_like
    from ..core.models import load_target, model_identity

    draft, draft_tokenizer = load_target(spec.draft, dtype=model.dtype, device=model.device)
    optimize_like(draft, model)  # the draft runs few-row forwards too: its own kernel table
    ident = model_identity(draft)
    draft_id = f"model:{ident['embedding_sha256']}:{ident['num_hidden_layers']}"
    return ModelProposer(draft, draft_tokenizer), draft_id, None

