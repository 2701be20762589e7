"""``turbolm info``: versions, machine, threads, cache, the model's details, the CPU kernel table
and how close vanilla decoding runs to the machine's memory-bandwidth limit."""

from __future__ import annotations

import json

from .common import add_model_args, load_model


def register(sub) -> None:
    i = sub.add_parser("info", help="versions, machine, threads, the model's details, kernels and bandwidth")
    add_model_args(i)
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.add_argument("--probe-mb", type=int, default=None, metavar="MB",
                   help="size of the memory-bandwidth probe (default: 256)")
    i.add_argument("--decode-tokens", type=int, default=32, metavar="N",
                   help="greedy tokens timed for the decoding speed (default: 32; 0: skip)")
    i.set_defaults(run=run)


def run(args) -> int:
    from ..core.errors import ParameterError
    from ..core.generation import context_length
    from ..core.io import cache_root
    from ..core.kernels import kernel_table, table_of
    from ..core.machine import PROBE_MB, decoding_bound, describe_machine, memory_bandwidth, time_greedy_decode
    from ..core.models import describe_model

    probe_mb = PROBE_MB if args.probe_mb is None else args.probe_mb
    if probe_mb < 1:
        raise ParameterError(f"{{}} must be >= 1, got {probe_mb}", "probe_mb")
    if args.decode_tokens < 0:
        raise ParameterError(f"{{}} must be >= 0, got {args.decode_tokens}", "decode_tokens")
    info = describe_machine()
    info["cache"] = str(cache_root())
    model, tokenizer = load_model(args)
    src = model.turbolm_source
    info["model"] = {
        "name": src.name,
        "source": f"{src.kind}: {src.path}",
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": getattr(model.config, "num_hidden_layers", None),
        "vocab_size": getattr(model.config, "vocab_size", None),
        "context_length": context_length(model, tokenizer),
        "dtype": describe_model(model)["dtype"],
        "device": str(model.device),
    }
    table = table_of(model)  # the table --fast-cpu applied; with off, the one auto would apply
    info["kernels"] = {"fast_cpu": getattr(args, "fast_cpu", "off"),
                       **(table if table is not None else kernel_table(model)).to_dict()}
    bandwidth = memory_bandwidth(probe_mb, device=str(model.device))
    speed = None
    if args.decode_tokens:
        speed = time_greedy_decode(model, tokenizer.encode("The capital of France is"), args.decode_tokens)
    info["bandwidth"] = {**bandwidth, **decoding_bound(model, bandwidth["gb_per_s"], speed)}
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    for k, v in info.items():
        if k == "kernels":
            print(_kernel_lines(v))
        elif isinstance(v, dict):
            print(f"{k}:")
            for k2, v2 in v.items():
                print(f"  {k2:<18} {v2}")
        else:
            print(f"{k:<17} {v}")
    return 0


def _kernel_lines(k: dict) -> str:
    """The kernel table as rows (layer groups) by row counts."""
    from ..core.kernels import KERNELS

    head = f"kernels:          {k['dtype']}, {k['source']} (--fast-cpu {k['fast_cpu']})"
    width = 24
    lines = [head, "  " + "rows".ljust(width) + "".join(f"{r:>11}" for r in k["rows"])]
    for group, row in k["kernels"].items():
        lines.append("  " + f"{group}: chosen".ljust(width) + "".join(f"{name:>11}" for name in row))
    if any(k.get("joins") or ()):  # sibling layers (q/k/v, gate/up) as one product
        lines.append("  " + "siblings: joined".ljust(width) + "".join(f"{'yes' if j else 'no':>11}" for j in k["joins"]))
    for group, per in k["timings_ms"].items():
        for kernel in KERNELS:
            cells = [per.get(str(r), {}).get(kernel) for r in k["rows"]]
            if any(c is not None for c in cells):
                label = f"{group}: {kernel}, ms".ljust(width)
                lines.append("  " + label + "".join(f"{c:>11.2f}" if c is not None else f"{'':>11}" for c in cells))
    for how in ("apart", "joined"):
        cells = [k.get("joins_ms", {}).get(str(r), {}).get(how) for r in k["rows"]]
        if any(c is not None for c in cells):
            label = f"siblings: {how}, ms".ljust(width)
            lines.append("  " + label + "".join(f"{c:>11.2f}" if c is not None else f"{'':>11}" for c in cells))
    return "\n".join(lines)
