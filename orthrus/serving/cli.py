"""`orthrus serve`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import os
import signal
import sys

from ..cli import add_model_args, load_from_args
from ..errors import OrthrusError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    add_model_args(p)
    p.add_argument("--mode", choices=["orthrus", "ar"], default="orthrus", help="orthrus (draft + verify) or plain AR decoding")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1); anything else exposes the server")
    p.add_argument("--port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together, the batch rows (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before new ones get 503 (default 64)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens (default: min(2048, the model's))")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all (default 600)")
    p.add_argument("--max-request-bytes", type=int, default=4 * 2**20, help="larger request bodies get 413 (default 4 MiB)")
    p.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="on SIGTERM/SIGINT, seconds running requests may finish before their streams are ended (default 10)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> None:
    import uvicorn

    from .server import ServerConfig, create_app

    if not 0 <= args.port <= 65535:
        raise OrthrusError(f"--port must be in [0, 65535], got {args.port}")
    config = ServerConfig(max_batch=args.max_batch, max_queue=args.max_queue, max_model_len=args.max_model_len,
                          request_timeout=args.request_timeout, api_key=args.api_key,
                          model_name=args.served_model_name, mode=args.mode, draft_confidence=args.draft_confidence,
                          max_request_bytes=args.max_request_bytes)
    app = create_app(load_from_args(args), config)
    engine_loop = app.state.server.engine_loop
    # the engine loop dying ends the process (exit 1 below), so a supervisor restarts it
    engine_loop.on_death = lambda: os.kill(os.getpid(), signal.SIGTERM)
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(f"orthrus: warning: serving on {args.host} without --api-key: anyone who can reach it can use it", file=sys.stderr)
    server = app.state.server

    class Draining(uvicorn.Server):
        """On the first SIGTERM/SIGINT, stop admitting and give running requests the grace period."""

        def handle_exit(self, sig, frame):
            if not server.draining:
                server.drain(args.shutdown_grace)
            super().handle_exit(sig, frame)

    # uvicorn raises the stop signal again once it has shut down, which would end the process by the
    # signal; after a drain that is a clean stop: exit 0 (or 1 below when the engine died)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Draining(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                timeout_graceful_shutdown=args.shutdown_grace + 5)).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if engine_loop.dead:
        raise SystemExit("orthrus: error: the engine loop died (see the log above); exiting with status 1")
