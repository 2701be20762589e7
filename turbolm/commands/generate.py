"""``turbolm generate``: one answer, streamed to the terminal (or one JSON object)."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import replace

from ..core.errors import ParameterError, TurboLMError
from .common import add_model_args, add_sampling_args, load_model, read_prompt, sampling, utf8_text, write_out

SPECULATIVE = ["none", "prompt-lookup", "model", "jakiro", "eagle2", "hybrid"]
#: DecoderSpec parameters spelled otherwise on this command line
FLAGS = {"method": "--speculative", "hybrid_mode": "--hybrid"}


def add_speculative_args(p) -> None:
    s = p.add_argument_group("speculative decoding (lossless: the output is the target's own)")
    s.add_argument("--speculative", choices=SPECULATIVE, default="none",
                   help="none: vanilla decoding (default); prompt-lookup: n-gram matches in the context; "
                        "model: a small draft LM with the same tokenizer (--draft-model); "
                        "jakiro / eagle2: a trained feature-level draft (--draft, default: the shipped one); "
                        "hybrid: prompt lookup together with a trained draft (--draft, default: the shipped Jakiro; "
                        "--hybrid)")
    s.add_argument("--draft", default=None,
                   help="draft checkpoint directory for --speculative jakiro / eagle2 / hybrid (a Jakiro or EAGLE-2 draft)")
    s.add_argument("--hybrid", dest="hybrid_mode", choices=["merge", "choose"], default=None,
                   help="for --speculative hybrid: merge (default): the n-gram continuation is merged into the draft's "
                        "tree as extra branches (up to 10 more nodes); choose: each step the n-gram tree or the "
                        "draft's, whichever is expected to accept more")
    s.add_argument("--adaptive", action="store_true",
                   help="per step, speculate or take a plain one-token step, whichever is measured faster on the text "
                        "being written (for text no draft predicts, e.g. long prompts; the output is the same)")
    s.add_argument("--candidate-mode", choices=["mixture", "decoupled"], default=None,
                   help="override a Jakiro draft's candidate mode")
    s.add_argument("--draft-model", default=None, help="draft model directory or .gguf for --speculative model")
    s.add_argument("--draft-layers", type=int, default=None,
                   help="for --speculative model without --draft-model: draft with the target's own first N layers")
    s.add_argument("--tree", choices=["auto", "fixed"], default=None,
                   help="auto (default for jakiro / eagle2 / hybrid / model): the tree size that maximises expected tokens/s on "
                        "this machine, from measured target/draft costs and the draft's acceptance (measured once, "
                        "cached); fixed: the proposer's default or --total-tokens/--depth/--top-k")
    s.add_argument("--retime", action="store_true",
                   help="with --tree auto: time the target and the draft again instead of using the cached timings "
                        "(they are also timed again when a quick check finds they no longer fit the machine)")
    s.add_argument("--total-tokens", type=int, default=None, help="most nodes in a draft tree, the root (the last committed token) not counted")
    s.add_argument("--depth", type=int, default=None, help="most levels in a draft tree, below the root")
    s.add_argument("--top-k", type=int, default=None, help="branches per tree node")


def decoder_spec(args):
    """The DecoderSpec the speculative flags describe (``--draft-model`` is the spec's ``draft`` for
    ``--speculative model``)."""
    from ..speculative import DecoderSpec

    if args.speculative == "model":  # the spec's draft is --draft-model here
        args.flags = {**FLAGS, "draft": "--draft-model"}
    if args.speculative != "model" and args.draft_model:
        raise TurboLMError("--draft-model is only used with --speculative model")
    if args.speculative == "model" and args.draft:
        raise TurboLMError("--draft is for jakiro / eagle2 / hybrid; --speculative model takes --draft-model")
    return DecoderSpec(args.speculative, draft=args.draft_model if args.speculative == "model" else args.draft,
                       draft_layers=args.draft_layers, candidate_mode=args.candidate_mode, tree=args.tree,
                       total_tokens=args.total_tokens, depth=args.depth, top_k=args.top_k,
                       hybrid_mode=args.hybrid_mode, adaptive=args.adaptive, retime=args.retime).check()


def build(model, tokenizer, spec):
    """The decoder for ``spec``; what ``--tree auto`` chose (and its progress) goes to stderr."""
    from ..speculative import build_decoder

    decoder = build_decoder(model, tokenizer, spec, log=lambda m: print(m, file=sys.stderr))
    if decoder.tree_choice is not None:
        print(decoder.tree_choice.explain(), file=sys.stderr)
    return decoder


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate an answer to a prompt, streamed to the terminal")
    g.add_argument("--prompt", required=True, help="the user prompt ('-' reads it from standard input)")
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object (text, token ids, statistics) instead of streaming")
    add_model_args(g)
    add_sampling_args(g)
    add_speculative_args(g)
    add_pruner_arg(g)
    g.set_defaults(run=run, flags=FLAGS)


def add_pruner_arg(parser) -> None:
    """``--pruner``: FTP prefill before any decoding method (``generate``, ``serve``)."""
    parser.add_argument("--pruner", default=None,
                        help="FTP pruner checkpoint (e.g. turbolm/checkpoints/ftp-smollm2-135m-s30): each prompt is "
                             "prefilled with token skipping, then the answer is decoded by the dense model with "
                             "--speculative's method; the output is exactly what vanilla decoding writes after the same "
                             "pruned prefill (not the unpruned model's)")


def prefill_pruner(model, tokenizer, checkpoint: str):
    """The ``--pruner`` checkpoint as a prefill_only pruned model (not attached)."""
    from ..pruning import PrunerSpec, build_pruned

    return build_pruned(model, tokenizer, PrunerSpec(checkpoint=checkpoint, prefill_only=True))


def run(args) -> int:
    from ..core.chat import encode_prompt

    prompt = read_prompt(args.prompt)
    utf8_text(args.system or "", "system")
    for text in args.stop:
        utf8_text(text, "stop")
    params = sampling(args)
    if not prompt.strip():
        raise ParameterError("empty prompt: give some text with {}", "prompt")
    spec = replace(decoder_spec(args), sampling=params)  # --tree auto sizes the tree for this sampling
    model, tokenizer = load_model(args)
    ids = encode_prompt(tokenizer, prompt, system=args.system, chat=not args.raw)
    decoder = build(model, tokenizer, spec)  # before the pruner: --tree auto times the dense target
    pruned = prefill_pruner(model, tokenizer, args.pruner) if args.pruner else None
    with pruned or nullcontext():
        result = decoder.generate(ids, max_new_tokens=args.max_new_tokens, sampling=params, stop=args.stop,
                                  on_text=None if args.json else write_out)
    if args.json:
        d = result.to_dict()
        d.update(model=str(model.turbolm_source.name), method=args.speculative)
        if pruned is not None:
            d.update(pruner=args.pruner, prefill_sparsity=round(pruned.stats.prefill_sparsity, 4))
        print(json.dumps(d))
    else:
        print()
        line = f"[{result.new_tokens} tokens in {result.seconds:.2f} s, {result.tokens_per_second:.1f} tokens/s"
        if args.speculative != "none":
            line += f", tau {result.tau:.2f}"
        if pruned is not None:
            line += f", prompt token sparsity {pruned.stats.prefill_sparsity:.1%}"
        print(f"{line}, finish: {result.finish_reason}]", file=sys.stderr)
    return 0
