"""The OpenAI-compatible server, live on localhost, driven by the real `openai` client (httpx for
raw and malformed requests): answers equal `Orthrus.generate`, concurrent requests share forward
passes and get what they get alone, bad requests get OpenAI-style errors, disconnects and
timeouts free their rows, and /metrics counts all of it."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

import orthrus
from orthrus import cli
from orthrus.api import TextStream
from orthrus.serving.server import ServerConfig, create_app

from .conftest import PROMPTS

API_KEY = "test-key"
BLOCK = 4


class LiveServer:
    """uvicorn on a free localhost port, in a thread of this process."""

    def __init__(self, app):
        self.app, self.state = app, app.state.server
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.01)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)

    def close(self):
        self.http.close()
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)

    def metric(self, name: str, **labels) -> float:
        """The value of one sample of /metrics (labels: a subset of the sample's)."""
        total = None
        for line in self.http.get("/metrics").text.splitlines():
            match = re.fullmatch(r"([^{\s]+)(?:\{(.*)\})? (\S+)", line)
            if line.startswith("#") or not match or match[1] != name:
                continue
            sample = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
            if all(sample.get(k) == str(v) for k, v in labels.items()):
                total = (total or 0) + float(match[3])
        assert total is not None, f"no sample {name} {labels} in /metrics"
        return total

    def metric_or_zero(self, name: str, **labels) -> float:
        """A counter sample that appears only once it has counted something."""
        try:
            return self.metric(name, **labels)
        except AssertionError:
            return 0.0

    def wait_idle(self, seconds: float = 10) -> None:
        deadline = time.monotonic() + seconds
        while self.metric("orthrus:num_requests_running") or self.metric("orthrus:num_requests_waiting"):
            assert time.monotonic() < deadline, "requests still running or waiting"
            time.sleep(0.05)

    def assert_healthy(self) -> None:
        assert self.http.get("/health").json() == {"status": "ok"}
        reply = self.client.completions.create(model=self.state.name, prompt="Hello", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1


@pytest.fixture(scope="module")
def qwen3(qwen3_folder):
    """The tiny random Qwen3 with short draft blocks, so that a cycle is cheap on a busy CPU."""
    return orthrus.load(str(qwen3_folder), drafter="none", dtype="float32", device="cpu", block_size=BLOCK)


@pytest.fixture(scope="module")
def server(qwen3):
    live = LiveServer(create_app(qwen3, ServerConfig(api_key=API_KEY, max_batch=8, max_queue=16, max_model_len=512)))
    yield live
    live.close()


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def streamed_text(stream, chat: bool) -> tuple[str, list]:
    chunks = list(stream)
    pieces = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in chunks if c.choices]
    return "".join(pieces), chunks


def test_chat_and_completions_equal_generate(server, qwen3):
    client, model = server.client, server.state.name
    prompt = PROMPTS[0]
    expected = qwen3.generate(chat(prompt), max_new_tokens=24)
    before = {name: server.metric(name) for name in (
        "orthrus:spec_decode_num_drafts_total", "orthrus:spec_decode_num_draft_tokens_total",
        "orthrus:spec_decode_num_accepted_tokens_total", "orthrus:generation_tokens_total",
        "orthrus:time_to_first_token_seconds_count", "orthrus:e2e_request_latency_seconds_count",
        "orthrus:request_queue_time_seconds_count")}
    accepted_at_before = [server.metric_or_zero("orthrus:spec_decode_num_accepted_tokens_per_pos", position=p)
                          for p in range(BLOCK)]

    reply = client.chat.completions.create(model=model, messages=chat(prompt), max_tokens=24, temperature=0)
    assert reply.object == "chat.completion" and reply.model == model
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == len(expected.token_ids)
    spec = reply.model_extra["speculative_decoding"]
    assert spec["drafts"] == sum(d > 0 for d in expected.stats.drafted) and spec["draft_tokens"] == sum(expected.stats.drafted)
    assert spec["accepted_tokens"] == sum(expected.stats.accepted)
    assert spec["mean_acceptance_length"] == pytest.approx(expected.stats.tokens_per_cycle, abs=1e-3)
    # the metrics moved by exactly this request
    assert server.metric("orthrus:spec_decode_num_drafts_total") - before["orthrus:spec_decode_num_drafts_total"] == spec["drafts"]
    assert (server.metric("orthrus:spec_decode_num_draft_tokens_total")
            - before["orthrus:spec_decode_num_draft_tokens_total"]) == spec["draft_tokens"]
    assert (server.metric("orthrus:spec_decode_num_accepted_tokens_total")
            - before["orthrus:spec_decode_num_accepted_tokens_total"]) == spec["accepted_tokens"]
    assert (server.metric("orthrus:generation_tokens_total")
            - before["orthrus:generation_tokens_total"]) == reply.usage.completion_tokens
    for name in ("time_to_first_token_seconds_count", "e2e_request_latency_seconds_count", "request_queue_time_seconds_count"):
        assert server.metric("orthrus:" + name) - before["orthrus:" + name] == 1, name
    # accepted tokens by draft position: position p counts the cycles that accepted more than p drafts
    accepted_at = [server.metric_or_zero("orthrus:spec_decode_num_accepted_tokens_per_pos", position=p) - accepted_at_before[p]
                   for p in range(BLOCK)]
    assert accepted_at == [sum(a > p for a in expected.stats.accepted) for p in range(BLOCK)]

    stream = client.chat.completions.create(model=model, messages=chat(prompt), max_tokens=24, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    text, chunks = streamed_text(stream, chat=True)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [expected.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)

    raw = "The history of the printing press"
    expected = qwen3.generate(raw, max_new_tokens=20)
    reply = client.completions.create(model=model, prompt=raw, max_tokens=20, temperature=0)
    assert reply.object == "text_completion" and reply.choices[0].text == expected.text
    assert reply.usage.completion_tokens == len(expected.token_ids)
    text, _ = streamed_text(client.completions.create(model=model, prompt=raw, max_tokens=20, temperature=0, stream=True), chat=False)
    assert text == expected.text
    ids = qwen3.encode(raw)
    assert client.completions.create(model=model, prompt=ids, max_tokens=20, temperature=0).choices[0].text == expected.text

    assert [m.id for m in client.models.list().data] == [model]


def test_stop_strings_and_seeded_sampling_per_request(server, qwen3):
    client, model = server.client, server.state.name
    full = qwen3.generate(chat(PROMPTS[1]), max_new_tokens=32).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = qwen3.generate(chat(PROMPTS[1]), max_new_tokens=32, stop=[stop])
    assert expected.finish_reason == "stop" and len(expected.text) < len(full)
    sampled = qwen3.generate(chat(PROMPTS[2]), max_new_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=11)

    with ThreadPoolExecutor(2) as pool:  # different sampling parameters in one batch
        stopped = pool.submit(client.chat.completions.create, model=model, messages=chat(PROMPTS[1]), max_tokens=32,
                              temperature=0, stop=stop)
        seeded = pool.submit(client.chat.completions.create, model=model, messages=chat(PROMPTS[2]), max_tokens=24,
                             temperature=0.9, top_p=0.95, seed=11, extra_body={"top_k": 40})
    assert stopped.result().choices[0].message.content == expected.text
    assert stopped.result().choices[0].finish_reason == "stop"
    # usage counts tokens up to the one that completed the stop string, not those decoded past it
    ids = qwen3.generate(chat(PROMPTS[1]), max_new_tokens=32, mode="ar").token_ids
    through_stop = next(n for n in range(1, len(ids) + 1)
                        if stop in qwen3.tokenizer.decode(ids[:n], skip_special_tokens=True))
    assert stopped.result().usage.completion_tokens == through_stop
    text = TextStream(qwen3.tokenizer, [stop])  # a whole accepted block past the stop, pushed at once
    text.push(ids, final=True)
    assert text.stopped and text.tokens == through_stop < len(ids)
    assert seeded.result().choices[0].message.content == sampled.text


def test_sixteen_concurrent_greedy_clients_get_what_they_get_alone(server, qwen3):
    prompts = PROMPTS[:16]
    budgets = [4 + 2 * i for i in range(16)]  # different lengths: rows leave and new requests join mid-batch
    alone = [qwen3.generate(chat(p), max_new_tokens=n) for p, n in zip(prompts, budgets)]

    def ask(i: int) -> str:
        kwargs = dict(model=server.state.name, messages=chat(prompts[i]), max_tokens=budgets[i], temperature=0)
        if i % 2:
            return streamed_text(server.client.chat.completions.create(stream=True, **kwargs), chat=True)[0]
        return server.client.chat.completions.create(**kwargs).choices[0].message.content

    forwards = server.state.engine.forwards
    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(ask, range(16)))
    assert texts == [a.text for a in alone]
    # they shared forward passes: far fewer than the sum of each one's own
    assert server.state.engine.forwards - forwards < 0.5 * sum(a.stats.forwards for a in alone)
    server.wait_idle()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


BAD_REQUESTS = [  # (name, endpoint, body, status, param, code)
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]},
     404, "model", "model_not_found"),
    ("oversized prompt", "/v1/completions", {"prompt": "word " * 600, "max_tokens": 4}, 400, "prompt", "context_length_exceeded"),
    ("negative max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens", None),
    ("zero max_tokens", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
     400, "max_tokens", None),
    ("huge max_tokens", "/v1/completions", {"prompt": "hi", "max_tokens": 10**12}, 400, "max_tokens", "context_length_exceeded"),
    ("negative temperature", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature", None),
    ("temperature not a number", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature", None),
    ("top_p zero", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p", None),
    ("top_p above one", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages", None),
    ("message without role", "/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages.0.role", None),
    ("token id out of range", "/v1/completions", {"prompt": [1, 10**7], "max_tokens": 2}, 400, "prompt", None),
    ("several prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt", None),
    ("n > 1", "/v1/completions", {"prompt": "hi", "n": 2}, 400, "n", None),
    ("no prompt", "/v1/completions", {"max_tokens": 3}, 400, "prompt", None),
    # a seed the generator cannot take once killed the engine thread; now it is refused at the edge
    ("seed past 2**64", "/v1/completions", {"prompt": "hi", "temperature": 1, "seed": 2**64}, 400, "seed", None),
    ("top_k below -1", "/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k", None),
    ("tools", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                       "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", None),
    ("response_format json", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "response_format": {"type": "json_object"}}, 400, "response_format", None),
    ("logprobs", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs", None),
    ("presence penalty", "/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", None),
    ("too many stop strings", "/v1/completions", {"prompt": "hi", "stop": ["x"] * 17}, 400, "stop", None),
]


@pytest.mark.parametrize("name,endpoint,body,status,param,code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_openai_errors_and_the_server_stays_healthy(server, name, endpoint, body, status, param, code):
    rejected = server.metric("orthrus:requests_total", outcome="rejected")
    error = error_of(server.http.post(endpoint, json=body), status)
    assert (error["param"], error["code"]) == (param, code)
    assert server.metric("orthrus:requests_total", outcome="rejected") == rejected + 1
    server.assert_healthy()


def test_extreme_but_valid_values_and_nulls_are_served(server, qwen3):
    server.wait_idle()
    greedy = qwen3.generate(chat(PROMPTS[1]), max_new_tokens=8, mode="ar").text
    body = {"model": server.state.name, "messages": chat(PROMPTS[1]), "max_tokens": 8}
    # a positive temperature too small to divide by is greedy (it once underflowed into garbage)
    tiny = server.http.post("/v1/chat/completions", json={**body, "temperature": 1e-300})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["message"]["content"] == greedy
    # top_k past int64 once aborted the whole batch; any k beyond the vocabulary means no limit, like -1
    with ThreadPoolExecutor(2) as pool:
        other = pool.submit(server.client.chat.completions.create, model=server.state.name, messages=chat(PROMPTS[1]),
                            max_tokens=8, temperature=0)
        for top_k in (2**70, -1):
            huge = server.http.post("/v1/chat/completions", json={**body, "temperature": 0.8, "seed": 3, "top_k": top_k})
            assert huge.status_code == 200, huge.text
        assert other.result().choices[0].message.content == greedy
    # null wherever the OpenAI API allows it means the default
    nulls = {k: None for k in ("temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", "presence_penalty",
                               "frequency_penalty", "logit_bias", "stream_options", "user", "tools", "response_format")}
    reply = server.http.post("/v1/chat/completions", json={**body, **nulls, "temperature": 0})
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == greedy
    assert server.http.post("/v1/chat/completions", json={**body, **nulls, "max_tokens": 2}).status_code == 200
    server.assert_healthy()


def test_request_bodies_over_the_limit_get_413(server):
    limit = server.state.config.max_request_bytes
    big = {"prompt": "word " * (limit // 5 + 10), "max_tokens": 2}
    assert error_of(server.http.post("/v1/completions", json=big), 413)["code"] == "request_too_large"
    chunks = (b'{"prompt": "' + b"x" * 4096 for _ in range(limit // 4096 + 2))  # no Content-Length: counted as it arrives
    streamed = server.http.post("/v1/completions", content=chunks, headers={"Content-Type": "application/json"})
    assert error_of(streamed, 413)["code"] == "request_too_large"
    server.assert_healthy()


def test_a_huge_prompt_is_tokenised_off_the_event_loop(server):
    """A prompt just under the body limit takes the tokenizer a while; /health answers meanwhile."""
    big = {"prompt": "many different words here " * (server.state.config.max_request_bytes // 27), "max_tokens": 2}
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        answer = pool.submit(server.http.post, "/v1/completions", json=big)
        health = []
        while not answer.done():
            t = time.perf_counter()
            assert server.http.get("/health").status_code == 200
            health.append(time.perf_counter() - t)
        took = time.perf_counter() - started
    assert error_of(answer.result(), 400)["param"] == "prompt"  # far longer than the context
    assert len(health) >= 3 and max(health) < took / 3, (max(health), took)
    server.assert_healthy()


def test_engine_loop_death_fails_fast(qwen3):
    """If the engine loop itself dies, every request gets 503 at once and /health fails: no live server that hangs."""
    app = create_app(qwen3, ServerConfig(max_model_len=256))
    loop = app.state.server.engine_loop
    died = threading.Event()
    loop.on_death = died.set

    def broken(*_):
        raise RuntimeError("injected failure in the engine loop")

    loop._apply_inbox = broken
    live = LiveServer(app)
    try:
        assert died.wait(10) and loop.dead
        assert live.http.get("/health").status_code == 503
        started = time.monotonic()
        error = error_of(live.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}), 503)
        assert error["code"] == "engine_dead" and time.monotonic() - started < 5
    finally:
        live.close()


def test_malformed_json_and_auth_errors(server):
    error = error_of(server.http.post("/v1/chat/completions", content=b'{"messages": [', headers={"Content-Type": "application/json"}), 400)
    assert "not valid JSON" in error["message"] and error["type"] == "invalid_request_error"
    server.assert_healthy()
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        response = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
        assert error_of(response, 401)["code"] == "invalid_api_key"
        server.assert_healthy()
    assert httpx.get(server.url + "/health").status_code == 200  # no key needed for health and metrics
    assert httpx.get(server.url + "/metrics").status_code == 200
    # the real client maps the statuses to its exception classes
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as info:
        server.client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        server.client.chat.completions.create(model=server.state.name, messages=chat("hi"), temperature=101)
    assert info.value.param == "temperature"
    assert error_of(server.http.get("/v1/nothing"), 404)["type"] == "not_found_error"


def test_disconnects_free_their_rows(server):
    server.wait_idle()
    gone = server.metric("orthrus:requests_total", outcome="disconnect")
    body = {"prompt": PROMPTS[3], "max_tokens": 480, "temperature": 0, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()  # kept: dropping it would close the stream, a disconnect of its own
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
        deadline = time.monotonic() + 10  # the gauge is set after each cycle: the row holds its prompt and more
        slots = server.state.config.max_batch * server.state.engine.max_len
        while (usage := server.metric("orthrus:kv_cache_usage_perc")) * slots < len(PROMPTS[3].split()):
            assert time.monotonic() < deadline, f"the KV cache usage never counted the running request ({usage})"
            time.sleep(0.01)
    # streaming: the response is cancelled; not streaming: the handler notices while it waits (480
    # tokens of this small model take ~0.5 s: the client leaves well before)
    with pytest.raises(httpx.ReadTimeout):
        server.http.post("/v1/completions", json={**body, "stream": False}, timeout=0.15)
    server.wait_idle()
    assert server.metric("orthrus:requests_total", outcome="disconnect") == gone + 2
    assert server.metric("orthrus:kv_cache_usage_perc") == 0
    assert sorted(server.state.engine.free_rows) == list(range(8))
    server.assert_healthy()


def test_queue_limit_and_timeout(qwen3):
    live = LiveServer(create_app(qwen3, ServerConfig(api_key=API_KEY, max_batch=1, max_queue=1, max_model_len=2048,
                                                     request_timeout=1.5)))
    try:
        long = {"prompt": PROMPTS[4], "max_tokens": 2000, "temperature": 0}
        with live.http.stream("POST", "/v1/completions", json={**long, "stream": True}) as running:
            events = (line[6:] for line in running.iter_lines() if line.startswith("data: "))
            next(events)  # decoding: the only row is taken
            with ThreadPoolExecutor(1) as pool:
                queued = pool.submit(live.http.post, "/v1/completions", json=long)
                while live.metric("orthrus:num_requests_waiting") < 1:
                    time.sleep(0.01)
                full = live.http.post("/v1/completions", json=long)
                assert error_of(full, 503)["type"] == "server_overloaded" and full.headers["Retry-After"] == "1"
                last = [json.loads(e) for e in events if e != "[DONE]"][-1]
                assert last["error"]["type"] == "timeout_error"
                assert error_of(queued.result(), 408)["type"] == "timeout_error"
        live.wait_idle()
        assert live.metric("orthrus:requests_total", outcome="timeout") == 2
        live.assert_healthy()
    finally:
        live.close()


def test_orthrus_serve_command(qwen3_folder, qwen3, monkeypatch):
    """`orthrus serve` builds the app from its options and hands it to uvicorn on localhost; the
    first SIGTERM starts the drain."""
    launched = {}

    def run(self, sockets=None):
        launched.update(app=self.config.app, host=self.config.host, port=self.config.port, uvicorn=self)

    with monkeypatch.context() as patch:  # only `orthrus serve`'s own uvicorn: the live server below runs for real
        patch.setattr(uvicorn.Server, "run", run)
        assert cli.main(["serve", "--model", str(qwen3_folder), "--drafter", "none", "--dtype", "float32", "--device",
                         "cpu", "--block-size", str(BLOCK), "--port", "8123", "--api-key", API_KEY, "--served-model-name",
                         "tiny", "--max-batch", "2", "--max-queue", "3", "--max-model-len", "256", "--request-timeout",
                         "9", "--draft-confidence", "0.5"]) == 0
    assert (launched["host"], launched["port"]) == ("127.0.0.1", 8123)
    state = launched["app"].state.server
    assert (state.name, state.context, state.config.max_batch, state.config.max_queue) == ("tiny", 256, 2, 3)
    assert state.config.request_timeout == 9 and state.engine.block_size == BLOCK and state.engine.draft_confidence == 0.5
    live = LiveServer(launched["app"])
    try:
        reply = live.client.chat.completions.create(model="tiny", messages=chat(PROMPTS[5]), max_tokens=12, temperature=0)
        assert reply.choices[0].message.content == qwen3.generate(chat(PROMPTS[5]), max_new_tokens=12).text
        launched["uvicorn"].handle_exit(signal.SIGTERM, None)
        assert state.draining and launched["uvicorn"].should_exit
    finally:
        live.close()


def test_orthrus_serve_refuses_bad_options(qwen3_folder, capsys):
    base = ["serve", "--model", str(qwen3_folder), "--drafter", "none", "--dtype", "float32", "--device", "cpu"]
    for extra, message in ((["--max-batch", "0"], "max batch must be >= 1"),
                           (["--max-model-len", "99999"], "exceeds the model's 2048 positions"),
                           (["--port", "70000"], "--port must be in"),
                           (["--draft-confidence", "1.5"], "draft confidence must be in [0, 1]")):
        assert cli.main(base + extra) == 2
        assert message in capsys.readouterr().err


def test_shutdown_drains_then_ends_open_streams_cleanly(qwen3):
    """On shutdown: new requests get 503; running ones may finish during the grace period; then each
    open stream gets a final chunk with a finish_reason and [DONE] (not a cut connection)."""
    live = LiveServer(create_app(qwen3, ServerConfig(max_model_len=512)))
    try:
        body = {"prompt": PROMPTS[3], "max_tokens": 480, "temperature": 0, "stream": True}
        with live.http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "text_completion"
            live.state.drain(grace=0.0)  # no grace: this tiny model would finish 480 tokens in a fraction of a second
            assert error_of(live.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}), 503)["code"] == "shutting_down"
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        final = json.loads(events[-2])
        assert final["choices"][0]["finish_reason"] == "abort" and final["speculative_decoding"]["drafts"] >= 1
    finally:
        live.close()


def test_chat_template_kwargs_reach_the_template(server, qwen3):
    """As vLLM accepts: {"enable_thinking": false} makes Qwen3's template close an empty thinking block."""
    messages = chat(PROMPTS[1])
    plain, no_thinking = qwen3.encode(messages), qwen3.encode(messages, {"enable_thinking": False})
    assert no_thinking != plain and "<think>" in qwen3.tokenizer.decode(no_thinking[len(plain) - 3 :])
    r = server.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, "temperature": 0,
                                                       "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(no_thinking)
    for bad in ({"chat_template": "{{ 7 * 7 }}"}, {"tokenize": False}, {"k": [1, 2]}, "x"):
        r = server.http.post("/v1/chat/completions", json={"messages": messages, "chat_template_kwargs": bad})
        assert r.status_code == 400 and "chat_template" in r.text, bad
    assert server.http.get("/health").status_code == 200


def test_fuzzed_requests_get_no_5xx_and_no_hang(qwen3):
    """A bounded fuzz run (hypothesis, localhost): bodies mixing every request field with values of
    the right type, the wrong type, extremes and nonsense. Every answer is 2xx/4xx within the
    client timeout (no 5xx, no hang), and the server is healthy and serves a plain request after."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    live = LiveServer(create_app(qwen3, ServerConfig(api_key=API_KEY, max_batch=4, max_queue=16, max_model_len=96)))
    numbers = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([0, 1, -1, 1e-300, 2**63, 2**64, 0.5]))
    scalars = st.one_of(numbers, st.text(max_size=40))
    anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                            max_leaves=12)
    text = st.text(max_size=60)
    valid_messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                     "content": text}), min_size=1, max_size=3)
    messages = st.one_of(valid_messages, valid_messages, st.lists(st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "tool", ""]), "content": st.one_of(st.none(), anything)}), max_size=3), anything)
    prompts = st.one_of(text, text, st.lists(st.integers(-5, 2**40), max_size=8), anything)

    def field(valid):  # mostly a value the server must serve, sometimes anything at all
        return st.one_of(st.none(), valid, valid, numbers, anything)

    fields = {"max_tokens": field(st.integers(1, 8)), "temperature": field(st.floats(0, 2)), "top_p": field(st.floats(0, 1)),
              "top_k": field(st.integers(-1, 50)), "seed": field(st.integers(0, 2**63 - 1)),
              "stop": field(st.lists(st.text(min_size=1, max_size=5), max_size=4)), "stream": field(st.booleans()),
              "stream_options": field(st.fixed_dictionaries({"include_usage": st.booleans()})), "n": field(st.just(1)),
              "logprobs": field(st.just(False)), "presence_penalty": field(st.just(0)), "logit_bias": field(st.just({})),
              "response_format": field(st.just({"type": "text"})), "tools": field(st.just(None)),
              "chat_template_kwargs": field(st.dictionaries(st.sampled_from(["enable_thinking", "x"]), st.booleans())),
              "echo": field(st.booleans()), "suffix": field(st.just(None)), "max_completion_tokens": field(st.integers(1, 8)),
              "model": st.one_of(st.just(live.state.name), st.text(max_size=10)), "unknown_field": anything}
    chat_bodies = st.fixed_dictionaries({"messages": messages}, optional=fields)
    text_bodies = st.fixed_dictionaries({"prompt": prompts}, optional=fields)
    bodies = st.one_of(st.tuples(st.just("/v1/chat/completions"), chat_bodies), st.tuples(st.just("/v1/completions"), text_bodies),
                       st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), anything))
    statuses = []

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(bodies)
    def one_request(case):
        path, body = case
        try:
            response = live.http.post(path, content=json.dumps(body), timeout=30,
                                      headers={"Content-Type": "application/json"})
        except httpx.TimeoutException:
            pytest.fail(f"no answer within 30 s to {path} {body!r}")
        statuses.append(response.status_code)
        assert response.status_code < 500, f"{response.status_code} for {path} {body!r}: {response.text[:300]}"
        if response.status_code >= 400:
            assert "message" in response.json()["error"]

    try:
        one_request()
        live.wait_idle()
        live.assert_healthy()
        assert len(statuses) >= 150 and any(s == 200 for s in statuses) and any(400 <= s < 500 for s in statuses)
    finally:
        live.close()


def test_the_openapi_document_says_what_the_server_answers(server):
    doc = server.http.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = doc["paths"][path]["post"]["responses"]
        assert "422" not in responses  # validation errors are 400 here
        assert {"200", "400", "401", "404", "408", "413", "500", "503"} <= set(responses)
        assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "503" in doc["paths"]["/health"]["get"]["responses"]
    # and the server does answer so: a body that fails validation is a 400 (not the 422 FastAPI documents by default)
    assert server.http.post("/v1/completions", json={"prompt": "hi", "max_tokens": "many"}).status_code == 400
    assert server.http.get("/metrics").headers["content-type"].startswith("text/plain")
    with server.http.stream("POST", "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        r.read()


def test_sigterm_to_orthrus_serve_ends_open_streams_and_exits_cleanly(qwen3_folder):
    """The real process and the real signal: after SIGTERM an open stream still gets its final chunk
    and [DONE], and the process exits 0 once the grace period is over (refusing new requests while
    draining is tested in-process, in test_shutdown_drains_then_ends_open_streams_cleanly)."""
    import os
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "orthrus", "serve", "--model", str(qwen3_folder), "--drafter", "none",
                             "--dtype", "float32", "--device", "cpu", "--block-size", str(BLOCK), "--port", str(port),
                             "--max-model-len", "512", "--shutdown-grace", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        body = {"prompt": PROMPTS[3], "max_tokens": 480, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "text_completion"
            proc.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("abort", "length", "stop")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
