"""An OpenAI-compatible HTTP server on one lean-runtime engine, standard library only.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (the
tokenizer's chat template), each with ``stream: true`` as Server-Sent Events in OpenAI's chunk
format ending ``data: [DONE]``, and ``GET /health``.

One engine runs one request at a time. Each connection has its own thread
(:class:`~http.server.ThreadingHTTPServer`) that checks the request, tokenizes it and puts a job
in a bounded queue; a single worker thread owns the engine and sends text back through the job.
A full queue is answered at once with 503 and ``Retry-After``; bad requests get OpenAI-style 4xx
errors and never reach the worker. :meth:`ModelServer.close` stops accepting connections, refuses
the waiting requests, lets the one in flight finish (or cancels it) and waits for its reply to be
written.
"""

from __future__ import annotations

import json
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from nmkit.errors import UserError
from nmkit.runtime.generate import Sampling
from nmkit.runtime.textgen import GenerationStats, TextModel

MAX_BODY_BYTES = 4 << 20
MAX_STOP_STRINGS = 4
# OpenAI's defaults: 16 new tokens for /v1/completions (chat: the rest of the context), temperature 1.
COMPLETION_DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
CHAT_ROLES = ("system", "developer", "user", "assistant")
_CANCEL_GRACE_S = 10.0  # a cancelled generation stops at its next token; its reply is a few writes


class ApiError(Exception):
    """An error answered as OpenAI's ``{"error": {...}}`` body with an HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request parsing: JSON body -> checked request ----------------------------------------------------------

@dataclass
class Request:
    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _int(body: dict, name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(f"'{name}' must be an integer >= {low}, got {json.dumps(value)}", name)
    return value


def _float(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value <= high
    if not ok or (value <= low if low_open else value < low):
        bound = f"{'>' if low_open else '>='} {low} and <= {high}"
        raise _bad(f"'{name}' must be a number {bound}, got {json.dumps(value)}", name)
    return float(value)


def _stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    return tuple(s for s in stops if s)


def _unsupported(body: dict) -> None:
    if body.get("n", 1) != 1:
        raise _bad("only n=1 is supported: send one request per completion", "n")
    # Refused rather than ignored, so a client never silently gets something other than it asked for.
    for name in ("logprobs", "top_logprobs", "echo", "tools", "suffix", "logit_bias", "presence_penalty",
                 "frequency_penalty"):
        if body.get(name):
            raise _bad(f"'{name}' is not supported by this server", name)
    fmt = body.get("response_format")
    if fmt and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad("only response_format {\"type\": \"text\"} is supported", "response_format")


def _text_content(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{index}].content must be a string or a list of text parts", "messages")


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' is required: a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise _bad(f"messages[{i}] needs a role, one of {', '.join(CHAT_ROLES)}", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _text_content(m.get("content"), i)})
    return out


def _prompt(body: dict) -> str | list[int]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt  # token ids
    if prompt is None:
        raise _bad("'prompt' is required: a string", "prompt")
    raise _bad("'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")


# ---- the server ---------------------------------------------------------------------------------------------

@dataclass
class _Job:
    request: Request
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # ("text"|"done"|"error", payload)
    cancel: threading.Event = field(default_factory=threading.Event)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: ModelServer) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that left is one log line, not a traceback; anything else keeps the traceback."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)
        elif self.app.log is not None:
            self.app.log(f"{client_address[0]} connection lost: {type(exc).__name__}")


class ModelServer:
    """Serve ``model`` under ``model_name`` on ``host:port`` (port 0: any free port, see :attr:`port`).
    ``queue_size`` requests may wait while one runs. Use as a context manager, or :meth:`start` and
    :meth:`close`."""

    def __init__(self, model: TextModel, host: str = "127.0.0.1", port: int = 8000, *, queue_size: int = 16,
                 model_name: str | None = None, log: Callable[[str], None] | None = None) -> None:
        if queue_size < 1:
            raise UserError(f"the queue must hold at least 1 request, got {queue_size}")
        self.model = model
        self.model_name = model_name or model.name
        self.log = log
        self.created = int(time.time())
        self._jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # the closing flag, submissions, the count of open replies
        self._replies_done = threading.Condition(self._lock)
        self._open_replies = 0
        self._closing = False
        self._tokenizer_lock = threading.Lock()  # the worker decodes while request threads encode
        self._current: _Job | None = None
        self._threads: list[threading.Thread] = []
        self._httpd = _HTTPServer((host, port), self)

    @property
    def host(self) -> str:
        return self._httpd.server_address[0]

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    @property
    def waiting(self) -> int:
        """Requests in the queue (not counting the one running)."""
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        """Whether a request is being generated."""
        return self._current is not None

    def start(self) -> ModelServer:
        for target, name in ((self._work, "nmkit-serve-worker"), (self._httpd.serve_forever, "nmkit-serve-http")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close(cancel=True)

    def cancel_current(self) -> None:
        """Stop the request in flight at its next token (its client gets an error)."""
        job = self._current
        if job is not None:
            job.cancel.set()

    def close(self, cancel: bool = False, timeout: float = 60.0) -> None:
        """Stop accepting, refuse waiting requests with 503, let the one in flight finish (``cancel``:
        stop it; it is also stopped when it runs past ``timeout`` seconds), wait for the replies to be
        written, close the socket."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._threads:
            self._httpd.shutdown()  # returns once the accept loop has stopped
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.events.put(("error", ApiError(503, "the server is shutting down", "server_error")))
        if cancel:
            self.cancel_current()
        self._jobs.put(None)  # the worker's signal to stop; nothing else enters the queue now
        for thread in self._threads:
            thread.join(timeout)
            if thread.is_alive():  # the request in flight ran past the grace period
                self.cancel_current()
                thread.join(_CANCEL_GRACE_S)
        with self._lock:
            self._replies_done.wait_for(lambda: self._open_replies == 0, _CANCEL_GRACE_S)
        self._httpd.server_close()

    # -- request side (connection threads) --

    def parse(self, body: Any, chat: bool) -> Request:
        """Check a request body and tokenize its prompt; raises :class:`ApiError`."""
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad("'model' is required", "model")
        if model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server has {self.model_name!r}",
                           code="model_not_found", param="model")
        _unsupported(body)
        stream = body.get("stream", False)
        options = body.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(options, dict):
            raise _bad("'stream' must be true or false and 'stream_options' an object", "stream")
        max_tokens = _int(body, "max_completion_tokens", 1) if chat else None
        max_tokens = _int(body, "max_tokens", 1) if max_tokens is None else max_tokens
        try:
            sampling = Sampling(temperature=_float(body, "temperature", DEFAULT_TEMPERATURE, 0, 2),
                                top_p=_float(body, "top_p", 1.0, 0, 1, low_open=True), seed=_int(body, "seed", 0))
        except UserError as exc:
            raise _bad(str(exc)) from None
        stop = _stops(body)
        with self._tokenizer_lock:
            try:
                if chat:
                    ids = self.model.encode_chat(_messages(body))
                else:
                    prompt = _prompt(body)
                    ids = list(prompt) if isinstance(prompt, list) else self.model.encode(prompt)
            except UserError as exc:
                raise _bad(str(exc), "messages" if chat else "prompt") from None
        return Request(chat, ids, self._max_tokens(ids, max_tokens, chat), sampling, stop, stream,
                       bool(options.get("include_usage")))

    def _max_tokens(self, ids: list[int], asked: int | None, chat: bool) -> int:
        limit = self.model.max_seq
        vocab = self.model.engine.vocab
        if not ids:
            raise _bad("the prompt is empty", "messages" if chat else "prompt")
        if any(t < 0 or t >= vocab for t in ids):
            raise _bad(f"token ids must be in [0, {vocab})", "prompt")
        room = limit - len(ids)
        max_tokens = asked if asked is not None else (room if chat else COMPLETION_DEFAULT_MAX_TOKENS)
        if max_tokens > room:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} "
                                f"tokens and {max_tokens} more were asked for. Shorten the prompt or lower "
                                "max_tokens", code="context_length_exceeded",
                           param="messages" if chat else "prompt")
        return max_tokens

    def submit(self, request: Request) -> _Job:
        """Queue a request; 503 when the queue is full or the server is closing. The caller must call
        :meth:`done` once the reply is written."""
        job = _Job(request)
        with self._lock:
            if self._closing:
                raise ApiError(503, "the server is shutting down", "server_error")
            try:
                self._jobs.put_nowait(job)
            except queue.Full:
                raise ApiError(503, f"the server is busy: {self._jobs.maxsize} requests are waiting; retry later",
                               "server_error", code="server_busy") from None
            self._open_replies += 1
        return job

    def done(self, job: _Job) -> None:
        job.cancel.set()  # stops the generation if the reply ended early (client gone)
        with self._lock:
            self._open_replies -= 1
            self._replies_done.notify_all()

    # -- the worker: the only thread that touches the engine --

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.cancel.is_set():
                job.events.put(("error", ApiError(503, "the request was cancelled", "server_error")))
                continue
            self._current = job
            try:
                run = self.model.generation(job.request.prompt_ids, job.request.max_tokens,
                                            sampling=job.request.sampling, stop=job.request.stop,
                                            cancelled=job.cancel.is_set, lock=self._tokenizer_lock)
                for piece in run:
                    job.events.put(("text", piece))
                job.events.put(("done", run.stats))
            except UserError as exc:
                job.events.put(("error", _bad(str(exc))))
            except Exception as exc:  # noqa: BLE001 - the server outlives a failed request
                job.events.put(("error", ApiError(500, f"generation failed: {type(exc).__name__}: {exc}",
                                                  "server_error")))
            finally:
                self._current = None


# ---- HTTP ---------------------------------------------------------------------------------------------------

def _usage(stats: GenerationStats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


class _Handler(BaseHTTPRequestHandler):
    server_version = "nmkit"
    timeout = 120  # seconds a silent client may hold its connection thread
    server: _HTTPServer

    @property
    def app(self) -> ModelServer:
        return self.server.app

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.app.log is not None:
            self.app.log(f"{self.address_string()} {format % args}")

    def _json(self, status: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: ApiError) -> None:
        self._json(err.status, err.body(), {"Retry-After": "1"} if err.status == 503 else None)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.app.model_name, "object": "model",
                                                         "created": self.app.created, "owned_by": "nmkit"}]})
        elif path == f"/v1/models/{self.app.model_name}":
            self._json(200, {"id": self.app.model_name, "object": "model", "created": self.app.created,
                             "owned_by": "nmkit"})
        elif path == "/health":
            self._json(200, {"status": "ok", "busy": self.app.busy, "waiting": self.app.waiting})
        else:
            self._error(ApiError(404, f"no such endpoint: GET {path}", code="not_found"))

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(ApiError(404, f"no such endpoint: POST {path}", code="not_found"))
            return
        try:
            request = self.app.parse(self._body(), chat=path == "/v1/chat/completions")
            job = self.app.submit(request)
        except ApiError as err:
            self._error(err)
            return
        try:
            if request.stream:
                self._stream(job)
            else:
                self._reply(job)
        except (ConnectionError, TimeoutError):
            pass  # the client went away; done() cancels the generation
        finally:
            self.app.done(job)

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _bad(f"the request body is not valid JSON: {exc}") from None

    def _envelope(self, chat: bool, rid: str, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.app.model_name}

    @staticmethod
    def _finish(stats: GenerationStats) -> str:
        if stats.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled: the server is shutting down", "server_error")
        return stats.finish_reason or "stop"

    def _reply(self, job: _Job) -> None:
        chat = job.request.chat
        pieces = []
        while True:
            kind, payload = job.events.get()
            if kind == "text":
                pieces.append(payload)
                continue
            if kind == "error":
                self._error(payload)
                return
            try:
                finish = self._finish(payload)
            except ApiError as err:
                self._error(err)
                return
            text = "".join(pieces)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                      else {"index": 0, "text": text})
            choice |= {"logprobs": None, "finish_reason": finish}
            body = self._envelope(chat, _new_id(chat), stream=False)
            self._json(200, body | {"choices": [choice], "usage": _usage(payload)})
            return

    def _stream(self, job: _Job) -> None:
        chat = job.request.chat
        base = self._envelope(chat, _new_id(chat), stream=True)
        usage_field = {"usage": None} if job.request.include_usage else {}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({} if text is None
                                                                                    else {"content": text})
                choice = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": text or ""}
            return base | {"choices": [choice | {"logprobs": None, "finish_reason": finish}]} | usage_field

        first = job.events.get()
        if first[0] == "error":  # refused before any text: a plain HTTP error is still possible
            self._error(first[1])
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        if chat:
            self._event(chunk(None, None, first=True))
        kind, payload = first
        while True:
            if kind == "text":
                self._event(chunk(payload, None))
            elif kind == "error":
                self._event(payload.body())
                break
            else:
                try:
                    finish = self._finish(payload)
                except ApiError as err:
                    self._event(err.body())
                    break
                self._event(chunk(None if chat else "", finish))
                if job.request.include_usage:
                    self._event(base | {"choices": [], "usage": _usage(payload)})
                break
            kind, payload = job.events.get()
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, obj: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def _new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
