"""``turbolm serve``: a real uvicorn server on a free port, spoken to with the real ``openai`` client
(tiny random models), and the scheduler on its own. Outputs are compared with vanilla decoding
(``generate``), the reference every decoding path must reproduce."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import uvicorn

from conftest import make_model_dir
from turbolm import load_target
from turbolm.core.chat import encode_chat
from turbolm.core.generation import SamplingParams, generate
from turbolm.serving import Job, Scheduler, create_app
from turbolm.serving.metrics import Metrics
from turbolm.serving.scheduler import Failed, Finished, Text

KEY = "test-key"
# a raw prompt the tiny long-context model continues for thousands of tokens without an EOS
ENDLESS = "The capital of"


@contextmanager
def serving(app):
    """Run ``app`` under uvicorn in a thread on a free port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "the server did not stop"


def client(url: str, key: str | None = KEY, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key or "none", max_retries=0, timeout=kw.pop("timeout", 120), **kw)


def metric(url: str, name: str, **labels) -> float:
    """One sample of the /metrics page (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            got = ",".join(sorted(line[len(name) + 1:line.index("}")].split(",")))
            got = ",".join(p for p in got.split(",") if not p.startswith("model_name="))
            if got == want:
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def wait_for(condition, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def chat_reference(model, tok, content: str, max_tokens: int, stop=()):
    return generate(model, tok, encode_chat(tok, [{"role": "user", "content": content}]), max_tokens, stop=stop)


@pytest.fixture(scope="module")
def url(tiny):
    model, tok = tiny
    with serving(create_app(model, tok, api_key=KEY, max_batch=16, max_queue=64)) as u:
        yield u


@pytest.fixture(scope="module")
def endless(tmp_path_factory):
    """A tiny Llama with a 4096-token context: ENDLESS runs thousands of tokens (until cancelled)."""
    return load_target(make_model_dir(tmp_path_factory.mktemp("endless"), "llama", max_position_embeddings=4096))


# -- the API --------------------------------------------------------------------------------


def test_chat_plain_and_streamed(url, tiny):
    model, tok = tiny
    ref = chat_reference(model, tok, "Hello world", 20)
    c = client(url)
    name = c.models.list().data[0].id
    r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello world"}], temperature=0,
                                  max_tokens=20)
    assert r.object == "chat.completion" and r.model == name and len(r.choices) == 1
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == {"length": "length", "eos": "stop"}[ref.finish_reason]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.new_tokens)
    assert r.usage.total_tokens == ref.prompt_tokens + ref.new_tokens

    chunks = list(c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello world"}],
                                            temperature=0, max_completion_tokens=20, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == ref.text
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == ref.new_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completions_plain_and_streamed(url, tiny):
    model, tok = tiny
    ref = generate(model, tok, tok("def add(a, b):")["input_ids"], 16)
    c = client(url)
    r = c.completions.create(model=c.models.list().data[0].id, prompt="def add(a, b):", temperature=0, max_tokens=16)
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (ref.prompt_tokens, ref.new_tokens)
    chunks = list(c.completions.create(prompt="def add(a, b):", model=r.model, temperature=0, max_tokens=16,
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    ids = tok("def add(a, b):")["input_ids"]  # a prompt as token ids
    assert c.completions.create(model=r.model, prompt=ids, temperature=0, max_tokens=16).choices[0].text == ref.text


def test_stop_strings(url, tiny):
    model, tok = tiny
    full = chat_reference(model, tok, "Write a short poem", 30).text
    stop = full[8:11]
    cut = full[: full.index(stop)]
    c = client(url)
    name = c.models.list().data[0].id
    for given in (stop, ["never-appears", stop]):
        r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Write a short poem"}],
                                      temperature=0, max_tokens=30, stop=given)
        assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
        streamed = c.chat.completions.create(model=name, messages=[{"role": "user", "content": "Write a short poem"}],
                                             temperature=0, max_tokens=30, stop=given, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == cut


def test_sixteen_concurrent_clients_match_their_single_runs(url):
    """Greedy outputs of 16 concurrent clients (streaming and not, different prompts, lengths and
    stop strings: requests join and leave the batch at different steps) equal their outputs alone."""
    c = client(url)
    name = c.models.list().data[0].id
    asks = [dict(content=("tell me " * (i % 5)) + f"story number {i}", max_tokens=6 + i % 7,
                 stop=["Ro"] if i % 4 == 0 else None, stream=i % 2 == 1) for i in range(16)]

    def ask(a):
        kw = dict(model=name, messages=[{"role": "user", "content": a["content"]}], temperature=0,
                  max_tokens=a["max_tokens"], stop=a["stop"])
        if not a["stream"]:
            return c.chat.completions.create(**kw).choices[0].message.content
        return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(stream=True, **kw))

    alone = [ask(a) for a in asks]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, asks))
    assert together == alone


def test_models_health_version_metrics(url):
    models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert models["data"][0]["max_model_len"] == 512
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    from turbolm import __version__

    assert httpx.get(url + "/version").json()["version"] == __version__
    page = httpx.get(url + "/metrics")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/plain")
    for name in ("turbolm:num_requests_running", "turbolm:num_requests_waiting", "turbolm:time_to_first_token_seconds",
                 "turbolm:inter_token_latency_seconds", "turbolm:e2e_request_latency_seconds",
                 "turbolm:prompt_tokens_total", "turbolm:generation_tokens_total", "turbolm:request_success_total",
                 "turbolm:spec_decode_num_drafts_total", "turbolm:spec_decode_num_accepted_tokens_total"):
        assert name in page.text, name


def test_metrics_count_what_was_served(tiny):
    model, tok = tiny
    with serving(create_app(model, tok)) as u:
        c = client(u, key=None)
        name = c.models.list().data[0].id
        usage = [c.completions.create(model=name, prompt=p, temperature=0, max_tokens=n).usage
                 for p, n in (("Hello", 5), ("Numbers: 0 1 2", 7))]
        assert metric(u, "turbolm:prompt_tokens_total") == sum(x.prompt_tokens for x in usage)
        assert metric(u, "turbolm:generation_tokens_total") == sum(x.completion_tokens for x in usage) == 12
        assert metric(u, "turbolm:request_success_total", finish_reason="length") == 2
        assert metric(u, "turbolm:time_to_first_token_seconds_count") == 2
        assert metric(u, "turbolm:e2e_request_latency_seconds_count") == 2
        assert metric(u, "turbolm:inter_token_latency_seconds_count") == 12 - 2
        assert metric(u, "turbolm:num_requests_running") == 0


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    ({"messages": "hi"}, 400, "messages", "non-empty list"),
    ({"messages": []}, 400, "messages", "non-empty list"),
    ({"messages": [{"content": "hi"}]}, 400, "messages[0]", "string role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages[0]", "only text parts"),
    ({"temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"temperature": -1}, 400, "temperature", ">= 0"),
    ({"top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"max_tokens": "10"}, 400, "max_tokens", "must be an integer"),
    ({"max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"max_tokens": True}, 400, "max_tokens", "must be an integer"),
    ({"stop": 5}, 400, "stop", "string or a list of strings"),
    ({"stream": "yes"}, 400, "stream", "boolean"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed with stream"),
    ({"model": "gpt-4"}, 400, "model", "does not exist"),
    ({"n": 2}, 400, "n", "n must be 1"),
    ({"logprobs": True}, 400, "logprobs", "not supported"),
    ({"presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"messages": [{"role": "user", "content": "word " * 700}]}, 400, "messages", "context is 512 tokens"),
])
def test_bad_requests_answer_400(url, body, status, param, words):
    if isinstance(body, dict):
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], **body}).encode()
    r = httpx.post(url + "/v1/chat/completions", content=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and words in error["message"], error


def test_bad_completion_prompts(url):
    c = client(url)
    for prompt, words in ((["a", "b"], "one prompt per request"), ("", "prompt is empty"), ([10**9], "vocabulary")):
        with pytest.raises(openai.BadRequestError, match=words):
            c.completions.create(model=c.models.list().data[0].id, prompt=prompt, max_tokens=4)


def test_unknown_route_is_an_openai_error(url):
    r = httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_api_key(url):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])
    assert client(url).models.list().data  # the right key
    assert httpx.get(url + "/health").status_code == 200  # health and metrics need no key


def test_speculative_decoder_serves_a_lone_request(tiny):
    """With a speculative decoder, a request that runs alone is decoded speculatively, concurrent
    ones in the batch: every output is vanilla's."""
    from turbolm.speculative import DecoderSpec, build_decoder

    model, tok = tiny
    prompts = ["Hello world! Hello world! Hello", "The capital of France is Paris. The capital of", "def add(a, b):"]
    refs = [generate(model, tok, tok(p)["input_ids"], 24).text for p in prompts]
    decoder = build_decoder(model, tok, DecoderSpec("prompt-lookup"))
    with serving(create_app(model, tok, decoder)) as u:
        c = client(u, key=None)
        name = c.models.list().data[0].id
        assert c.completions.create(model=name, prompt=prompts[0], temperature=0, max_tokens=24).choices[0].text == refs[0]
        assert metric(u, "turbolm:spec_decode_requests_total") == 1
        assert metric(u, "turbolm:spec_decode_num_drafts_total") >= 1
        assert metric(u, "turbolm:inter_token_latency_seconds_count") == 24 - 1
        accepted = metric(u, "turbolm:spec_decode_num_accepted_tokens_total")
        assert accepted == sum(metric(u, "turbolm:spec_decode_num_accepted_tokens_per_pos_total", position=str(d))
                               for d in range(1, 25))
        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(lambda p: c.completions.create(model=name, prompt=p, temperature=0,
                                                               max_tokens=24).choices[0].text, prompts))
        assert got == refs


# -- robustness -----------------------------------------------------------------------------


def test_disconnect_cancels_and_frees_the_slot(endless):
    model, tok = endless
    with serving(create_app(model, tok, max_batch=1)) as u:
        c = client(u, key=None)
        name = c.models.list().data[0].id
        stream = c.completions.create(model=name, prompt=ENDLESS, temperature=0, stream=True)
        next(iter(stream)), next(iter(stream))
        stream.close()  # mid-stream: thousands of tokens to go
        wait_for(lambda: metric(u, "turbolm:request_success_total", finish_reason="cancelled") == 1, "the cancel")
        with client(u, key=None, timeout=1.0) as impatient, pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=name, prompt=ENDLESS, temperature=0)  # gives up, hangs up
        wait_for(lambda: metric(u, "turbolm:request_success_total", finish_reason="cancelled") == 2, "the cancel")
        assert metric(u, "turbolm:num_requests_running") == 0
        r = c.completions.create(model=name, prompt="Hello", temperature=0, max_tokens=3)  # the slot is free
        assert r.usage.completion_tokens == 3
        assert metric(u, "turbolm:request_success_total", finish_reason="length") == 1


def test_full_queue_answers_429_and_timeouts_408(endless):
    model, tok = endless
    with serving(create_app(model, tok, max_batch=1, max_queue=1, request_timeout=600)) as u:
        c = client(u, key=None)
        name = c.models.list().data[0].id
        running = c.completions.create(model=name, prompt=ENDLESS, temperature=0, stream=True)
        next(iter(running))  # admitted and decoding
        waiting = c.completions.create(model=name, prompt=ENDLESS, temperature=0, stream=True)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=name, prompt="Hello", max_tokens=3)
        assert e.value.response.json()["error"]["code"] == "queue_full"
        assert e.value.response.headers["retry-after"] == "1"
        assert metric(u, "turbolm:request_rejected_total", reason="queue_full") == 1
        running.close()
        waiting.close()
    with serving(create_app(model, tok, request_timeout=0.5)) as u:
        c = client(u, key=None)
        with pytest.raises(openai.APIStatusError) as e:
            c.completions.create(model=c.models.list().data[0].id, prompt=ENDLESS, temperature=0)
        assert e.value.status_code == 408 and e.value.response.json()["error"]["code"] == "timeout"
        assert metric(u, "turbolm:request_success_total", finish_reason="timeout") == 1


def test_sigterm_drains_requests_in_flight(tiny_dir):
    env = {**os.environ, "TURBOLM_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "turbolm", "serve", "--model", str(tiny_dir), "--port", "0",
                             "--fast-cpu", "off"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        while "turbolm serve:" not in line:
            assert line, "the server ended before it started"
            line = proc.stderr.readline()
        u = re.search(r"http://\S+:\d+", line).group(0)
        wait_for(lambda: _up(u), "the server")
        c = client(u)
        stream = iter(c.completions.create(model=c.models.list().data[0].id, prompt="Hello", temperature=0,
                                           max_tokens=40, stream=True))
        first = next(stream)
        proc.send_signal(signal.SIGTERM)
        rest = list(stream)
        assert rest[-1].choices[0].finish_reason == "length"  # the stream in flight finished
        assert len(first.choices[0].text + "".join(ch.choices[0].text for ch in rest)) > 0
        assert proc.wait(60) == 130
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(u: str) -> bool:
    try:
        return httpx.get(u + "/health").status_code == 200
    except httpx.TransportError:
        return False


def test_serve_flag_errors(capsys, tiny_dir):
    from turbolm.cli import main

    for args, words in ((["--max-batch", "0"], "--max-batch must be >= 1"),
                        (["--request-timeout", "0"], "--request-timeout must be > 0"),
                        (["--speculative", "prompt-lookup", "--draft", "x"], "--draft is not used"),
                        (["--pruner", str(tiny_dir / "no-such-pruner"), "--port", "0"], "no-such-pruner")):
        assert main(["serve", "--model", str(tiny_dir), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("turbolm: error:") and words in err, err


# -- the scheduler --------------------------------------------------------------------------


def run_jobs(model, tok, jobs: list[Job], max_batch: int = 16, metrics=None) -> list[list]:
    """Submit ``jobs`` before the scheduler starts (they join one batch together); their events."""
    events = [[] for _ in jobs]
    done = threading.Semaphore(0)

    def sink(i):
        def emit(event):
            events[i].append(event)
            if isinstance(event, (Finished, Failed)):
                done.release()
        return emit

    scheduler = Scheduler(model, tok, max_batch=max_batch, metrics=metrics)
    for i, job in enumerate(jobs):
        job.emit = sink(i)
        scheduler.submit(job)
    scheduler.start()
    for _ in jobs:
        assert done.acquire(timeout=120)
    scheduler.stop()
    return events


def test_batched_rows_decode_as_alone(tiny):
    """Rows of different lengths, joining together and leaving at different steps, give exactly the
    tokens of vanilla decoding, greedy and seeded sampling alike; the batch really held them all."""
    model, tok = tiny
    prompts = [tok(p)["input_ids"] for p in ("Hello", "The capital of France is Paris. The capital of Italy is",
                                             "def add(a, b):", "Numbers: 0 1 2 3", "Write a short poem about the sea")]
    cases = [(p, n, SamplingParams() if k % 2 else SamplingParams(temperature=0.9, top_p=0.9, seed=k))
             for k, (p, n) in enumerate(zip(prompts * 2, (3, 12, 7, 20, 9, 15, 4, 11, 18, 6)))]
    metrics = Metrics("tiny", lambda: 0, lambda: 0)
    events = run_jobs(model, tok, [Job(p, n, s) for p, n, s in cases], metrics=metrics)
    lengths = []
    for (p, n, s), got in zip(cases, events):
        ref = generate(model, tok, p, n, s)
        assert got[-1] == Finished(ref.text, len(p), ref.new_tokens, "length" if ref.finish_reason == "length" else "stop")
        assert "".join(e.text for e in got if isinstance(e, Text)) == ref.text
        lengths.append(ref.new_tokens)
    rows, steps = (metrics.registry.get_sample_value(f"turbolm:batch_size_{s}", {"model_name": "tiny"})
                   for s in ("sum", "count"))
    # every row took its tokens after the first (the prefill's) in batched steps, all in the same steps
    assert rows == sum(n - 1 for n in lengths) and steps == max(lengths) - 1


def test_a_failing_request_fails_alone(tiny):
    model, tok = tiny
    good = tok("Hello")["input_ids"]
    events = run_jobs(model, tok, [Job(good, 5), Job([10**7], 5), Job(good, 5)])
    assert isinstance(events[1][-1], Failed) and events[1][-1].status == 500
    ref = generate(model, tok, good, 5).text
    assert events[0][-1].text == events[2][-1].text == ref


@pytest.mark.slow
def test_default_model_chat_and_stream(default_model):
    """The real model: a chat answer and a stream, decoded speculatively (alone) and in a batch of
    four, all equal to vanilla decoding's."""
    from turbolm.speculative import DecoderSpec, build_decoder

    model, tok = default_model
    questions = ["What is the capital of France?", "Name three colours.", "Count from one to five.", "Say hello."]
    refs = [chat_reference(model, tok, q, 24).text for q in questions]
    with serving(create_app(model, tok, build_decoder(model, tok, DecoderSpec("prompt-lookup")))) as u:
        c = client(u, key=None)
        name = c.models.list().data[0].id
        kw = dict(model=name, temperature=0, max_tokens=24)
        r = c.chat.completions.create(messages=[{"role": "user", "content": questions[0]}], **kw)
        assert r.choices[0].message.content == refs[0] and "Paris" in refs[0]
        stream = c.chat.completions.create(messages=[{"role": "user", "content": questions[1]}], stream=True, **kw)
        assert "".join(ch.choices[0].delta.content or "" for ch in stream) == refs[1]
        assert metric(u, "turbolm:spec_decode_requests_total") == 2
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda q: c.chat.completions.create(messages=[{"role": "user", "content": q}],
                                                                    **kw).choices[0].message.content, questions))
        assert got == refs


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_batching_other_architectures(tiny_dirs, arch):
    model, tok = load_target(tiny_dirs[arch])
    # Mistral's sliding-window cache layers cannot be padded into a batch: one request at a time
    assert Scheduler(model, tok, max_batch=8).max_batch == (1 if arch == "mistral" else 8)
    prompts = [tok(p)["input_ids"] for p in ("Hello", "The capital of France is Paris.", "def add(a, b):")]
    events = run_jobs(model, tok, [Job(p, 6 + 3 * i) for i, p in enumerate(prompts)])
    assert [e[-1].text for e in events] == [generate(model, tok, p, 6 + 3 * i).text for i, p in enumerate(prompts)]


def test_pruned_prefill_rows_decode_as_alone(tiny):
    """With a prefill_only token pruner attached (``serve --pruner``), every request - one alone,
    several joining and leaving one batch - decodes exactly what vanilla decoding gives after the
    same pruned prefill: each row's cache keeps its own placeholder masks."""
    from turbolm.pruning import StaticRouter, TokenPruner

    model, tok = tiny
    n = model.config.num_hidden_layers
    texts = ("The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is",
             "def add(a, b):\n    return a + b\n\ndef sub(a, b):", "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12",
             "Write a short poem about the sea, the sky and the long road home")
    prompts = [tok(t)["input_ids"] for t in texts]
    lengths = (14, 6, 20, 11)
    dense = [generate(model, tok, p, k).token_ids for p, k in zip(prompts, lengths)]
    with TokenPruner(model, StaticRouter(), [0.4] * n, prefill_only=True) as pruner:
        refs = [generate(model, tok, p, k) for p, k in zip(prompts, lengths)]
        assert pruner.stats.prefill_sparsity > 0.3
        assert [r.token_ids for r in refs] != dense  # the pruned prefill changes the answers
        metrics = Metrics("tiny", lambda: 0, lambda: 0)
        events = run_jobs(model, tok, [Job(p, k) for p, k in zip(prompts * 2, lengths * 2)], metrics=metrics)
        alone = run_jobs(model, tok, [Job(prompts[0], lengths[0])], max_batch=1)
    assert [e[-1].text for e in events] == [r.text for r in refs] * 2
    assert alone[0][-1].text == refs[0].text
    assert metrics.registry.get_sample_value("turbolm:batch_size_sum", {"model_name": "tiny"}) > \
        metrics.registry.get_sample_value("turbolm:batch_size_count", {"model_name": "tiny"})  # rows shared steps


# -- turbolm bench serve ----------------------------------------------------------------------


def _questions(path):
    rows = [{"question_id": i, "category": cat, "turns": [text]} for i, (cat, text) in enumerate([
        ("writing", "Write a haiku about the sea."), ("math", "What is 12 times 7?"),
        ("coding", "def add(a, b):"), ("qa", "Name a colour."),
        ("summarization", "The river rose all night and by morning the town square was under water. " * 6),
        ("rag", "Paris is the capital of France. It lies on the Seine and has two million people. " * 6)])]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bench_serve_prompts_and_report(tiny, tmp_path):
    """The prompts (short ones spread over categories, long ones joined to the asked length) and the
    report from measured levels (no server: the table, the ratios and the lossless count)."""
    from turbolm.bench.serve import ServeBenchConfig, _lossless, markdown, prompts
    from turbolm.core.errors import ParameterError

    _, tok = tiny
    config = ServeBenchConfig(str(_questions(tmp_path / "q.jsonl")), clients=(1, 2), requests=2, long_requests=2,
                              long_prompt_tokens=300, max_prompt_tokens=40)
    short, long = prompts(config, tok)
    assert len(short) == 4 and len(set(short)) == 4 and all(len(tok(s)["input_ids"]) < 40 for s in short)
    assert len(long) == 2 and all(abs(len(encode_chat(tok, [{"role": "user", "content": t}])) - 300) <= 2 for t in long)
    assert long[0] != long[1]
    with pytest.raises(ParameterError, match="configs"):
        ServeBenchConfig("q", configs=["fast"]).check()
    with pytest.raises(ParameterError, match="clients"):
        ServeBenchConfig("q", clients=[0]).check()
    from turbolm.cli import main

    assert main(["bench", "serve", "--questions", "q.jsonl", "--clients", "1,many"]) == 2
    assert main(["bench", "serve", "--questions", "q.jsonl", "--configs", "batched,turbo"]) == 2

    def result(tps, answers):
        return {"flags": ["--max-batch", "1"], "levels": [
            {"clients": c, "tokens_per_second": t, "ttft_s_p50": 0.1, "ttft_s_p99": 0.2, "itl_ms_p50": 50.0,
             "itl_ms_p99": 90.0, "peak_mb": 900} for c, t in zip((1, 2), tps)],
            "answers": answers, "answers_changed_across_levels": 0}

    results = {"vanilla": result((10.0, 10.0), {"0": "a", "1": "b"}),
               "batched": result((10.0, 18.0), {"0": "a", "1": "b"}),
               "speculative": result((15.0, 17.0), {"0": "a", "1": "c"}),
               "ftp": result((10.0, 18.0), {"0": "x", "1": "y"})}
    long = {"configs": list(results), "ttft_s": {"vanilla": [3.0, 3.2], "batched": [3.0, 3.0], "speculative": [3.1, 3.0],
                                                 "ftp": [2.0, 2.0]}}
    lossless = _lossless(results)
    assert lossless == {"batched": {"compared": 2, "differing": 0}, "speculative": {"compared": 2, "differing": 1}}
    machine = {"cpu": "test CPU", "cpu_count": 2, "gpu": None, "torch_threads": 2, "torch": "t", "transformers": "x",
               "turbolm": None}
    text = markdown({"config": {**vars(config), "model": None}, "machine": machine, "long_prompt_tokens": [300, 310],
                     "results": results, "long": long, "lossless": lossless}, ["serve.png"])
    assert "| batched | 2 | 18.0 | 1.80x |" in text
    assert "| ftp | 2.00 | 2.00, 2.00 | 1.50x lower |" in text and "| batched | 3.00 | 3.00, 3.00 | - |" in text
    assert "speculative: 1 of 2 prompts" in text and "test CPU" in text


@pytest.mark.slow
def test_bench_serve_end_to_end(tiny_dir, tmp_path, capsys):
    """`turbolm bench serve` on the tiny model: four real servers, two levels, the long prompts; the
    report holds every configuration; greedy answers of batched and speculative equal vanilla's;
    a re-run keeps what was measured."""
    from turbolm.cli import main
    from turbolm.pruning import StaticRouter
    from turbolm.pruning.checkpoint import pruner_config, save_pruner

    model, _ = load_target(tiny_dir)
    save_pruner(tmp_path / "p", pruner_config(model, StaticRouter(), [0.5, 0.5], target_sparsity=0.5), StaticRouter())
    argv = ["bench", "serve", "--model", str(tiny_dir), "--questions", str(_questions(tmp_path / "q.jsonl")),
            "--clients", "1,3", "--requests", "2", "--max-tokens", "8", "--max-prompt-tokens", "40",
            "--long-prompt-tokens", "200", "--long-requests", "1", "--speculative", "prompt-lookup",
            "--pruner", str(tmp_path / "p"), "--out", str(tmp_path / "out"), "--threads", "1"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(report["results"]) == ["vanilla", "batched", "speculative", "ftp"]
    for r in report["results"].values():
        assert [lv["clients"] for lv in r["levels"]] == [1, 3] and r["answers_changed_across_levels"] == 0
        assert all(lv["tokens"] > 0 and lv["requests"] == 2 * lv["clients"] for lv in r["levels"])
    long = report["long"]["ttft_s"]
    assert list(long) == list(report["results"]) and all(len(ts) == 1 and ts[0] > 0 for ts in long.values())
    assert "--pruner" in report["results"]["ftp"]["flags"] and "--max-batch" in report["results"]["vanilla"]["flags"]
    assert report["lossless"]["batched"]["differing"] == report["lossless"]["speculative"]["differing"] == 0
    assert (tmp_path / "out" / "serve.png").is_file() and "| ftp |" in capsys.readouterr().out
    assert main(argv[:-2] + ["--threads", "1", "--configs", "batched"]) == 0  # kept, not measured again
    err = capsys.readouterr().err
    assert "batched: kept" in err and "TTFT" not in err and "turbolm serve:" not in err
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert list(again["results"]) == list(report["results"]) and again["long"] == report["long"]


def test_in_passing_thread():
    """The set-up helper of `turbolm serve`: the result, or the exception, from a thread that has ended."""
    from turbolm.core.errors import TurboLMError
    from turbolm.core.machine import in_passing_thread

    seen = []
    assert in_passing_thread(lambda a, b=0: seen.append(threading.current_thread()) or a + b, 2, b=3) == 5
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail():
        raise TurboLMError("no model here")

    with pytest.raises(TurboLMError, match="no model here"):
        in_passing_thread(fail)
