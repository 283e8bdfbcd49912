"""`qwen3gen serve` through the official openai client and raw HTTP, on a server started on a free loopback port for
these tests (the tiny random-weight checkpoint with the real tokenizer): the same tokens as the Python API, streamed
or not, many clients at once, reasoning split, and an OpenAI error object for every bad input."""

import concurrent.futures
import functools
import json
import socket
import time

import httpx
import openai
import pytest
from scripted import ScriptedLLM

import qwen3gen
from qwen3gen.server import EngineProcess, create_app
from qwen3gen.server.thread import ServerThread as Server

MODEL = "tiny-qwen3"
PROMPT = "The capital of France is"


def engine_process(checkpoint, kv_memory: str = "64MiB", max_queue: int | None = None) -> EngineProcess:
    """The tiny checkpoint in an engine process of its own, as `qwen3gen serve` runs it."""
    build = functools.partial(qwen3gen.load, checkpoint, device="cpu", dtype="float32", kv_memory=kv_memory)
    return EngineProcess(build, max_queue=max_queue)


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    engine = engine_process(tiny_checkpoint)
    server = Server(create_app(engine, MODEL))
    yield engine, server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_for_idle(engine: EngineProcess, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while (stats := engine.stats())["running"] or stats["waiting"] or stats["kv_blocks_used"]:
        assert time.monotonic() < deadline, "the engine still holds requests or blocks"
        time.sleep(0.01)


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(served[1].url + "/health").json() == {"status": "ok"}


def test_completion_equals_the_python_api_streamed_or_not(tiny_llm, served, client):
    engine = served[0]
    expected = tiny_llm.generate(PROMPT, max_new_tokens=12, temperature=0.0, ignore_eos=True)
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].text == expected.text and out.choices[0].finish_reason == "length"
    prompt_tokens = len(engine.model.tokenizer.encode(PROMPT))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (prompt_tokens, 12)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == 12 and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    ids = engine.model.tokenizer.encode(PROMPT)
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0, echo=True, extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == engine.model.tokenizer.decode(ids) + expected.text


def test_chat_equals_the_python_api(tiny_llm, served, client):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    expected = tiny_llm.chat(messages, enable_thinking=False, max_new_tokens=10, temperature=0.0)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    assert out.choices[0].message.content == expected.answer and out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0, stream=True,
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices).strip() == expected.answer


def test_n_seeds_stops_and_logprobs(tiny_llm, served, client):
    engine = served[0]
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=1.0, seed=11, n=3, extra_body={"ignore_eos": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)] and len(set(texts)) == 3
    assert texts == [g.text for g in tiny_llm.generate(PROMPT, max_new_tokens=10, temperature=1.0, seed=11, n=3, ignore_eos=True)]
    assert first.usage.prompt_tokens == len(engine.model.tokenizer.encode(PROMPT)) and first.usage.completion_tokens == 30
    free = tiny_llm.generate(PROMPT, max_new_tokens=12, temperature=0.0, ignore_eos=True).text
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    stopped = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == free[: free.index(stop)] and stopped.choices[0].finish_reason == "stop"
    scored = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=4,
                                            temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    content = scored.choices[0].logprobs.content
    assert 1 <= len(content) <= 4 and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)
    text_lp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    assert len(text_lp.choices[0].logprobs.token_logprobs) == 4 and all(len(t) <= 2 for t in text_lp.choices[0].logprobs.top_logprobs)


def test_reasoning_is_returned_apart_in_both_fields(tiny_checkpoint):
    reply = "<think>\nTwo plus two is four.\n</think>\n\nIt is 4."
    server = Server(create_app(EngineProcess(ScriptedLLM(tiny_checkpoint, [reply, reply])), MODEL))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "2+2?"}]
    try:
        out = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=50)
        message = out.choices[0].message
        assert message.content == "It is 4." and out.choices[0].finish_reason == "stop"
        assert message.model_extra["reasoning_content"] == message.model_extra["reasoning"] == "Two plus two is four."
        chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True)
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        thinking = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
        assert thinking == "".join(d.model_extra.get("reasoning") or "" for d in deltas)
        assert thinking.strip() == "Two plus two is four." and "".join(d.content or "" for d in deltas).strip() == "It is 4."
    finally:
        server.stop()


def test_thirty_two_concurrent_streams_equal_their_offline_outputs(tiny_llm, served, client):
    engine = served[0]
    prompts = [f"Story number {i}:" for i in range(32)]
    expected = [g.text for g in tiny_llm.generate(prompts, max_new_tokens=8, temperature=0.0, ignore_eos=True)]

    def one(prompt: str) -> str:
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True})
        return "".join(c.choices[0].text for c in stream if c.choices)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        assert list(pool.map(one, prompts)) == expected
    wait_for_idle(engine)


def test_a_client_gone_mid_stream_frees_its_blocks(served):
    engine, server = served
    free = engine.stats()["kv_blocks_free"]
    body = {"model": MODEL, "prompt": PROMPT * 20, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert engine.stats()["kv_blocks_free"] < free
    wait_for_idle(engine)
    assert engine.stats()["kv_blocks_free"] == free


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "gpt-9", "prompt": PROMPT}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "temperature": -1}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "top_p": 0}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [999999999]}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 100000}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": 0}, 400, "n"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"content": "no role"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ("/v1/completions", b"x" * (5 << 20), 413, None),
]  # fmt: skip


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(served, client, path, body, status, param):
    url = served[1].url + path
    if isinstance(body, bytes):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        response = httpx.post(url, json=body, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"].endswith(".")
    assert param is None or error["param"] == param
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None
    wait_for_idle(served[0])


def test_api_key_and_queue_limit(tiny_checkpoint):
    server = Server(create_app(engine_process(tiny_checkpoint, "16MiB", max_queue=0), MODEL, api_key="secret"))
    try:
        body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            response = httpx.post(server.url + "/v1/completions", json=body, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/health").status_code == 200
        refused = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer secret"})
        assert refused.status_code == 429 and json.loads(refused.text)["error"]["code"] == "queue_full"
        models = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer secret"})
        assert models.status_code == 200
    finally:
        server.stop()


def test_tokenize_detokenize_and_several_prompts(tiny_llm, served, client):
    engine, server = served
    ids = httpx.post(server.url + "/tokenize", json={"prompt": PROMPT}).json()
    assert ids["tokens"] == engine.model.tokenizer.encode(PROMPT) and ids["count"] == len(ids["tokens"]) and ids["max_model_len"] == 512
    assert httpx.post(server.url + "/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": PROMPT}
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    assert chat == engine.model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    out = client.completions.create(model=MODEL, prompt=[PROMPT, "Hi"], max_tokens=3, temperature=0, n=2, extra_body={"ignore_eos": True})
    texts = {c.index: c.text for c in out.choices}
    expected = tiny_llm.generate([PROMPT, "Hi"], max_new_tokens=3, temperature=0.0, ignore_eos=True)
    assert [texts[i] for i in range(4)] == [expected[0].text] * 2 + [expected[1].text] * 2


def group_alive(group: int) -> bool:
    import os

    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["sigterm", "ctrl-c"])
def test_serve_command_answers_and_stops_on_sigterm_or_ctrl_c(tiny_checkpoint, ctrl_c):
    """SIGTERM to the server alone, or SIGINT to its whole process group (a terminal's Ctrl-C, which reaches the
    engine process too): a clean shutdown either way, with the engine process gone."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "qwen3gen.cli", "serve", "--model", str(tiny_checkpoint), "--device", "cpu",
               "--port", str(port), "--served-model-name", MODEL, "--kv-memory", "16MiB"]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 3}, timeout=30)
        assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] >= 1
        if ctrl_c:
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=30) == 0  # uvicorn's own end after a Ctrl-C
        else:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == -signal.SIGTERM  # after the shutdown, uvicorn raises the signal again
        stderr = proc.stderr.read()
        assert "qwen3gen: server stopped" in stderr and "Traceback" not in stderr
        deadline = time.monotonic() + 10  # nothing of the server is left in its group: the engine process has ended
        while group_alive(proc.pid):  # (multiprocessing's resource tracker lingers a moment, a zombie, until reaped)
            assert time.monotonic() < deadline, "a process of the server's group outlived it"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_metrics_parse_and_move(served, client):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict:
        text = httpx.get(served[1].url + "/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}

    before = scrape()
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, stream=True, extra_body={"ignore_eos": True}))
    after = scrape()
    moved = lambda name, labels=(): after.get((name, labels), 0) - before.get((name, labels), 0)  # noqa: E731
    assert moved("qwen3gen_requests_total", (("finish_reason", "length"),)) >= 1
    assert moved("qwen3gen_generation_tokens_total") >= 5 and moved("qwen3gen_prompt_tokens_total") >= len(served[0].model.tokenizer.encode(PROMPT))
    assert moved("qwen3gen_time_to_first_token_seconds_count") >= 1 and moved("qwen3gen_inter_token_latency_seconds_count") >= 4
    for gauge in ("requests_running", "requests_waiting", "kv_cache_usage_ratio", "prefix_cache_hit_ratio"):
        assert (f"qwen3gen_{gauge}", ()) in after
    assert 0 <= after[("qwen3gen_prefix_cache_hit_ratio", ())] <= 1 and 0 <= after[("qwen3gen_kv_cache_usage_ratio", ())] <= 1


def aborted_requests(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(httpx.get(url + "/metrics").text) for s in f.samples]
    return sum(s.value for s in samples if s.name == "qwen3gen_requests_total" and s.labels.get("finish_reason") == "abort")


def test_a_client_gone_before_a_whole_answer_frees_its_blocks(served):
    engine, server = served
    free, before = engine.stats()["kv_blocks_free"], aborted_requests(server.url)
    body = {"model": MODEL, "prompt": PROMPT * 20, "max_tokens": 380, "n": 4, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # about 2.5 s of work here
        httpx.post(server.url + "/v1/completions", json=body, timeout=0.3)
    wait_for_idle(engine)
    assert engine.stats()["kv_blocks_free"] == free and aborted_requests(server.url) - before == 4


def test_outputs_queued_up_for_a_busy_handler_come_as_one():
    from qwen3gen.engine import RequestOutput
    from qwen3gen.server.app import coalesced
    from qwen3gen.server.engine_process import EngineFailure

    a1 = RequestOutput("a", [1], False, None, logprobs=[(1, -0.1, [])], text="x", prompt_logprobs=[None])
    b1 = RequestOutput("b", [5], False, None, text="q")
    a2 = RequestOutput("a", [2, 3], True, "length", logprobs=[(2, -0.2, []), (3, -0.3, [])], text="yz", num_cached_tokens=4)
    a = RequestOutput("a", [1, 2, 3], True, "length", logprobs=[(1, -0.1, []), (2, -0.2, []), (3, -0.3, [])], text="xyz",
                      prompt_logprobs=[None], num_cached_tokens=4)  # fmt: skip
    assert coalesced([a1, b1, a2]) == [a, b1]
    failure = EngineFailure("gone")
    assert coalesced([a1, failure, b1]) == [a1, failure]


def test_a_model_the_engine_process_cannot_load_raises_its_own_error(tmp_path):
    with pytest.raises(qwen3gen.ModelNotFoundError):
        EngineProcess(functools.partial(qwen3gen.load, str(tmp_path / "missing"), device="cpu"))


def test_an_engine_process_gone_is_a_503_and_its_stream_ends_with_an_error(tiny_checkpoint):
    import os
    import signal

    engine = engine_process(tiny_checkpoint, "16MiB")
    server = Server(create_app(engine, MODEL))
    try:
        body = {"model": MODEL, "prompt": PROMPT * 20, "max_tokens": 400, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            os.kill(engine.pid, signal.SIGKILL)
            last = [line for line in lines if line.startswith("data:")][-1]
        assert json.loads(last[6:])["error"]["message"] == "the engine process has stopped."
        refused = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["message"] == "the engine process has stopped."
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.stop()
