"""``turbolm info``: versions, machine, threads, cache and the model's details."""

from __future__ import annotations

import json

from .common import add_model_args, load_model


def register(sub) -> None:
    i = sub.add_parser("info", help="versions, machine, threads, and the model's details")
    add_model_args(i)
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(run=run)


def run(args) -> int:
    from ..core.generation import context_length
    from ..core.machine import describe_machine
    from ..core.models import cache_root

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
        "dtype": str(model.dtype).replace("torch.", ""),
        "device": str(model.device),
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            if isinstance(v, dict):
                print(f"{k}:")
                for k2, v2 in v.items():
                    print(f"  {k2:<15} {v2}")
            else:
                print(f"{k:<17} {v}")
    return 0
