"""What several sub-commands share: the model / sampling flags, loading the model they name, and
turning a library error's parameter names into this command's flags."""

from __future__ import annotations

import argparse
import sys

from ..core.errors import ParameterError, TurboLMError

MODEL_HELP = "local HF model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)"


def add_model_args(p: argparse.ArgumentParser, *, flag: str = "--model", fast_cpu: bool = True) -> None:
    """``--model`` (or ``flag``), ``--dtype``, ``--device`` and, for decoding commands, ``--fast-cpu``."""
    p.add_argument(flag, dest="model", default=None, help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 | int8 | int4 (int8 / int4: weight-only "
                   "quantised linear layers, bfloat16 activations; int4 as llama.cpp's Q4_1; default: float32)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    if fast_cpu:
        p.add_argument("--fast-cpu", choices=["auto", "on", "off"], default="auto",
                       help="kernels for few-token forwards (decoding, tree verification, drafting) on the CPU: "
                            "auto (default): per row count, the fastest of F.linear and oneDNN with pre-packed "
                            "weights, measured once on this machine and model and cached; on: oneDNN at every "
                            "row count where it applies; off: plain PyTorch. A fast kernel costs up to one extra copy "
                            "of the weights in memory. Vanilla runs the same way.")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0 = off)")
    p.add_argument("--sampling-top-k", type=int, default=0, help="sample among the k most likely tokens (default: 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable); not included in the output")


def load_model(args):
    """The model and tokenizer ``--model`` / ``--dtype`` / ``--device`` name, with ``--fast-cpu``
    where the command has that flag."""
    from ..core.kernels import apply_fast_cpu
    from ..core.models import load_target

    model, tokenizer = load_target(args.model, dtype=args.dtype, device=args.device)
    apply_fast_cpu(model, getattr(args, "fast_cpu", "off"))
    return model, tokenizer


def sampling(args):
    """SamplingParams from the sampling flags (validated before any model is loaded)."""
    from ..core.generation import SamplingParams

    try:
        return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.sampling_top_k, seed=args.seed)
    except ParameterError as e:
        raise TurboLMError(e.rename(lambda p: {"top_k": "--sampling-top-k"}.get(p, flag(p)))) from None


def utf8_text(text: str, param: str) -> str:
    """``text`` from the command line, refused if it is not valid UTF-8 (undecodable bytes in argv
    arrive as lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ParameterError(f"{{}} is not valid UTF-8 text (an undecodable byte at character {e.start})",
                             param) from None
    return text


def read_prompt(text: str, param: str = "prompt") -> str:
    """``--prompt`` (``-``: standard input), which must be valid UTF-8 text."""
    if text != "-":
        return utf8_text(text, param)
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParameterError(f"{{}} -: standard input is not valid UTF-8 text (byte 0x{data[e.start]:02x} at "
                             f"offset {e.start})", param) from None


def write_out(text: str) -> None:
    """Stream text to standard output as it comes."""
    sys.stdout.write(text)
    sys.stdout.flush()


def flag(param: str) -> str:
    """The command-line spelling of a library parameter: ``max_new_tokens`` -> ``--max-new-tokens``."""
    return "--" + param.replace("_", "-")


def error_message(error: TurboLMError, flags: dict[str, str] | None = None) -> str:
    """The one line the command line prints for ``error``: parameter names become this command's
    flags (``flags`` maps the ones not spelled as :func:`flag` spells them)."""
    if isinstance(error, ParameterError):
        flags = flags or {}
        return error.rename(lambda p: flags.get(p, flag(p)))
    return str(error)
