"""`nmkit serve MODEL --host 127.0.0.1 --port P`: an OpenAI-compatible HTTP server on the lean runtime.

The first SIGINT or SIGTERM shuts down gracefully (waiting requests get 503, the one in flight
finishes); a second one cancels the request in flight. Exit code 0 either way.
"""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
import threading

from nmkit.commands.generate import _number, add_engine_arguments, engine_options, quiet_loading
from nmkit.errors import UserError
from nmkit.runtime.serve import ModelServer
from nmkit.runtime.textgen import load_text_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the "
                             "server, which has no authentication, to the network)")
    parser.add_argument("--port", default="8000", metavar="P", help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--queue", default="16", metavar="K", help="requests that may wait while one runs; "
                        "more are answered 503 (default 16)")
    parser.add_argument("--model-name", default=None, metavar="NAME",
                        help="the model id clients send and /v1/models lists (default: MODEL as given)")
    parser.add_argument("--quiet", action="store_true", help="no log line per request")


def _check_can_listen(host: str, port: int) -> None:
    """Fail before the model loads when the address is unusable."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        hint = "choose another --port" if exc.errno == errno.EADDRINUSE else "check --host"
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; {hint}") from None


def _log(message: str) -> None:
    print(f"nmkit serve: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    port = _number(args.port, "--port", int, 0, 65535)
    queue_size = _number(args.queue, "--queue", int, 1)
    options = engine_options(args)
    _check_can_listen(args.host, port)
    quiet_loading()
    model = load_text_model(args.model, name=args.model_name or args.model, **options)
    try:
        server = ModelServer(model, args.host, port, queue_size=queue_size, log=None if args.quiet else _log)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{port}: {exc.strerror or exc}") from None

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        if stop.is_set():
            _log("cancelling the request in flight")
            server.cancel_current()
        else:
            _log(f"{signal.Signals(signum).name}: shutting down (again to cancel the request in flight)")
            stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        info = model.engine.info
        _log(f"{server.model_name} on {server.url} ({info.weights} weights, {info.head} head, {info.isa}, "
             f"{info.threads} thread{'s' if info.threads != 1 else ''}, context {model.max_seq}, queue {queue_size})")
        while not stop.wait(0.5):
            pass
        server.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _log("stopped")
    return 0
