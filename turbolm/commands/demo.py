"""``turbolm demo``: Jakiro (or EAGLE-2) answers to three built-in prompts, streamed, then compared
with vanilla decoding on the same prompts: tokens/s, speed-up, tau, identical outputs."""

from __future__ import annotations

from .common import add_model_args, load_model, write_out

PROMPTS = [
    "What is the capital of France? Answer in one sentence.",
    "Write a short poem about the sea.",
    "Explain in three sentences why the sky is blue.",
]


def register(sub) -> None:
    d = sub.add_parser("demo", help="stream speculative answers (prompt lookup + the Jakiro draft) to three built-in prompts, then compare with "
                                    "vanilla decoding: tokens/s, speedup, tau, identical outputs")
    add_model_args(d)
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--draft", default=None, help="draft checkpoint (default: the shipped one for the default model)")
    d.add_argument("--speculative", choices=["hybrid", "jakiro", "eagle2", "none"], default="hybrid",
                   help="the method to compare with vanilla (default: hybrid, prompt lookup merged into the Jakiro "
                        "draft's tree: the fastest on Spec-Bench on the 2-core CPUs); none: vanilla only")
    d.add_argument("--retime", action="store_true",
                   help="time the target and the draft again for the tree size instead of using the cached timings")
    d.set_defaults(run=run, flags={"method": "--speculative"})


def run(args) -> int:
    from ..core.chat import encode_prompt
    from ..core.generation import generate
    from ..speculative import DecoderSpec
    from .generate import build

    model, tokenizer = load_model(args)
    dtype = str(model.dtype).replace("torch.", "")
    print(f"turbolm demo: {model.turbolm_source.name} ({dtype}, {model.device}), greedy, up to {args.max_new_tokens} "
          f"new tokens per answer", flush=True)
    decoder = None
    if args.speculative != "none":
        decoder = build(model, tokenizer, DecoderSpec(args.speculative, draft=args.draft, tree="auto", retime=args.retime))
    generate(model, tokenizer, encode_prompt(tokenizer, "Hello"), max_new_tokens=4)  # warm-up
    rows = []
    for prompt in PROMPTS:
        ids = encode_prompt(tokenizer, prompt)
        print(f"\n>>> {prompt}")
        if decoder is None:
            van = generate(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, on_text=write_out)
            print(f"\n[{van.new_tokens} tokens, {van.tokens_per_second:.1f} tokens/s]")
            rows.append((prompt, van, None))
            continue
        spec = decoder.generate(ids, max_new_tokens=args.max_new_tokens, on_text=write_out)
        van = generate(model, tokenizer, ids, max_new_tokens=args.max_new_tokens)  # the same prompt, right after
        print(f"\n[{spec.new_tokens} tokens at {spec.tokens_per_second:.1f} tokens/s with {args.speculative} "
              f"(tau {spec.tau:.2f}); vanilla {van.tokens_per_second:.1f} tokens/s]")
        rows.append((prompt, van, spec))
    print()
    print(table(rows, args.speculative))
    return 0


def table(rows, name: str) -> str:
    """Markdown table: per prompt and overall, vanilla vs the speculative method."""
    from ..core.generation import tau_of

    def line(label, vans, specs):
        v_tps = sum(r.new_tokens for r in vans) / sum(r.seconds for r in vans)
        if specs[0] is None:
            return f"| {label} | {sum(r.new_tokens for r in vans)} | {v_tps:.1f} |"
        s_tps = sum(r.new_tokens for r in specs) / sum(r.seconds for r in specs)
        same = all(s.token_ids == v.token_ids for s, v in zip(specs, vans))
        return (f"| {label} | {sum(r.new_tokens for r in vans)} | {v_tps:.1f} | {s_tps:.1f} | {s_tps / v_tps:.2f}x | "
                f"{tau_of(specs):.2f} | {'yes' if same else 'NO'} |")

    if rows[0][2] is None:
        head = "| prompt | tokens | vanilla tok/s |\n|---|---|---|"
    else:
        head = (f"| prompt | tokens | vanilla tok/s | {name} tok/s | speedup | tau | identical |\n"
                "|---|---|---|---|---|---|---|")
    body = [line(p[:40] + ("..." if len(p) > 40 else ""), [v], [s]) for p, v, s in rows]
    body.append(line("**all**", [v for _, v, _ in rows], [s for _, _, s in rows]))
    return "\n".join([head, *body])
