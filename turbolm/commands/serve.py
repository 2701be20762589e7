"""``turbolm serve``: the OpenAI-compatible server (``turbolm.serving``) on one model, with the
speculative flags of ``generate`` for requests that run alone."""

from __future__ import annotations

import os
import socket
import sys
from contextlib import nullcontext

from ..core.errors import TurboLMError
from ..core.machine import in_passing_thread
from .common import add_model_args, load_model
from .generate import FLAGS, add_pruner_arg, add_speculative_args, build, decoder_spec, prefill_pruner

API_KEY_ENV = "TURBOLM_API_KEY"


def register(sub) -> None:
    s = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API (streaming, batched "
                                     "concurrent requests, speculative decoding at low load)")
    add_model_args(s)
    add_speculative_args(s)
    add_pruner_arg(s)
    n = s.add_argument_group("server")
    n.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; "
                                                       "0.0.0.0: every interface)")
    n.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: a free one, printed at start)")
    n.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on the /v1 routes (default: ${API_KEY_ENV} if set, "
                        "else no key; the variable keeps the key out of the process list)")
    n.add_argument("--served-model-name", dest="model_name", default=None,
                   help="the model id clients send (default: the model's directory or file name)")
    n.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default: 8)")
    n.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a place in the batch; more answer 429 (default: 64)")
    n.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="a request still running this long after it arrived fails with 408 (default: no limit)")
    s.set_defaults(run=run, flags={**FLAGS, "model_name": "--served-model-name"})


def run(args) -> int:
    try:
        import uvicorn

        from ..serving import create_app
        from ..serving.scheduler import check_limits
    except ImportError as e:
        raise TurboLMError(f"turbolm serve needs the serve extra ({e.name} is missing): "
                           "pip install 'turbolm[serve]'") from None
    from ..core.interrupts import sigterm_as_interrupt

    check_limits(args.max_batch, args.max_queue, args.request_timeout)
    spec = decoder_spec(args)
    listener = listen(args.host, args.port)  # before the model loads: a port in use fails at once

    def setup():
        model, tokenizer = load_model(args)
        decoder = build(model, tokenizer, spec) if spec.method != "none" else None  # --tree auto times the dense model
        pruned = prefill_pruner(model, tokenizer, args.pruner) if args.pruner else None
        return model, tokenizer, decoder, pruned

    # the scheduler's thread runs the model: set it up in a thread that ends (core.machine, threads)
    model, tokenizer, decoder, pruned = in_passing_thread(setup)
    app = create_app(model, tokenizer, decoder, model_name=args.model_name,
                     api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, max_batch=args.max_batch,
                     max_queue=args.max_queue, request_timeout=args.request_timeout)
    host, port = listener.getsockname()[:2]
    pruning = f", FTP prefill: {pruned.name}" if pruned is not None else ""
    print(f"turbolm serve: {app.state.model_name} at http://{args.host if ':' not in host else f'[{host}]'}:{port}/v1 "
          f"(speculative: {spec.method}{pruning}, batch {app.state.scheduler.max_batch}, queue {args.max_queue}); "
          "Ctrl-C or SIGTERM stops it after the requests in flight", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=args.request_timeout)
    with sigterm_as_interrupt(), pruned or nullcontext():  # uvicorn drains, then raises the signal: exit as on Ctrl-C
        uvicorn.Server(config).run(sockets=[listener])
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port``, or a TurboLMError that says why not."""
    if not 0 <= port <= 65535:
        raise TurboLMError(f"--port must be in 0 .. 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise TurboLMError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock
