"""The engine on a real (tiny, float32) checkpoint written by transformers, against transformers and against itself:
continuous batching, chunked prefill, prefix caching, preemption, abort, seeded sampling, n samples, logprobs."""

import pytest
import torch
from checkpoints import QWEN3_0_6B, hf_model, write_checkpoint

import qwen3gen
from qwen3gen import Engine, SamplingParams
from qwen3gen.engine.kv_pool import bytes_per_block


def hf_greedy(hf, prompt: list[int], new_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return out[0, len(prompt) :].tolist()


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151643, (n,), generator=generator).tolist() for n in lengths]


def engine_for(llm, **options) -> Engine:
    options.setdefault("kv_memory", "32MiB")
    return Engine(llm.model, llm.tokenizer, llm.eos_token_ids, **options)


def run(engine: Engine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]], max_steps: int = 2000) -> list[list[int]]:
    """Add requests at the steps `arrivals` names, step until all are done: each request's tokens, in order added."""
    ids, tokens = [], {}
    for step in range(max_steps):
        for prompt, params in arrivals.get(step, []):
            ids.append(engine.add_request(prompt, params))
            tokens[ids[-1]] = []
        if step > max(arrivals) and not engine.has_unfinished():
            break
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    else:
        raise AssertionError("the engine did not finish in time")
    return [tokens[i] for i in ids]


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


LENGTHS = [3, 40, 7, 100, 16, 1, 65, 23, 9, 31, 50, 12, 18, 77]
NEW_TOKENS = [5, 12, 30, 3, 17, 9, 1, 22, 8, 14, 6, 19, 11, 4]


@pytest.fixture(scope="module")
def expected(tiny_hf):
    return [hf_greedy(tiny_hf, p, n) for p, n in zip(random_prompts(LENGTHS), NEW_TOKENS)]


def staggered(prompts, params):
    """Requests arriving two at a time, every third step."""
    arrivals = {}
    for i, pair in enumerate(zip(prompts, params)):
        arrivals.setdefault(3 * (i // 2), []).append(pair)
    return arrivals


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
def test_requests_added_at_different_steps_equal_transformers_and_alone(tiny_llm, expected, kernels):
    engine = engine_for(tiny_llm, kernels=kernels)
    prompts, params = random_prompts(LENGTHS), [greedy(n) for n in NEW_TOKENS]
    together = run(engine, staggered(prompts, params))
    assert together == expected
    assert [run(engine, {0: [(p, q)]})[0] for p, q in zip(prompts[:4], params[:4])] == expected[:4]
    assert engine.stats()["kv_blocks_used"] == 0


def test_chunked_prefill_equals_transformers_and_keeps_decodes_going(tiny_llm, expected):
    engine = engine_for(tiny_llm, max_batched_tokens=24)  # the 100-token prompt takes five steps
    prompts, params = random_prompts(LENGTHS), [greedy(n) for n in NEW_TOKENS]
    assert run(engine, staggered(prompts, params)) == expected
    # A long prompt arriving while another request decodes: the decode gets a token in every step of the prefill.
    short, long = random_prompts([4, 200], seed=5)
    decoding = engine.add_request(short, greedy(20))
    engine.step()
    engine.add_request(long, greedy(2))
    steps = [engine.step() for _ in range(8)]
    assert all(any(o.new_token_ids for o in outputs if o.request_id == decoding) for outputs in steps)


def test_prefix_cache_hits_give_the_same_tokens(tiny_llm, tiny_hf):
    engine = engine_for(tiny_llm)
    system = random_prompts([48], seed=1)[0]  # three full blocks
    prompts = [system + tail for tail in random_prompts([5, 9, 17, 2], seed=2)]
    first = run(engine, {0: [(prompts[0], greedy(6))]})
    before = engine.stats()
    rest = run(engine, {0: [(p, greedy(6)) for p in prompts[1:]]})
    after = engine.stats()
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 3 * 48
    assert after["computed_prompt_tokens"] - before["computed_prompt_tokens"] == sum(len(p) - 48 for p in prompts[1:])
    assert first + rest == [hf_greedy(tiny_hf, p, 6) for p in prompts]
    # A conversation resent with one more turn reuses all of its full blocks but computes the rest.
    turn = prompts[0] + first[0] + random_prompts([10], seed=3)[0]
    outputs = run(engine, {0: [(turn, greedy(4))]})
    assert engine.stats()["prefix_cache_hit_tokens"] - after["prefix_cache_hit_tokens"] == (len(prompts[0]) + 6) // 16 * 16
    assert outputs == [hf_greedy(tiny_hf, turn, 4)]


def test_preemption_under_a_tiny_pool_gives_the_same_tokens(tiny_llm, expected):
    per_block = bytes_per_block(tiny_llm.model.config, 16, torch.float32)
    engine = engine_for(tiny_llm, kv_memory=per_block * 12)  # 11 blocks of 16 slots for 14 requests
    prompts, params = random_prompts(LENGTHS), [greedy(n) for n in NEW_TOKENS]
    assert run(engine, {0: list(zip(prompts, params))}) == expected
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["kv_blocks_free"] == 11


def test_abort_and_finished_requests_free_their_blocks(tiny_llm):
    engine = engine_for(tiny_llm)
    free = engine.stats()["kv_blocks_free"]
    ids = [engine.add_request(p, greedy(50)) for p in random_prompts([30, 70, 5])]
    for _ in range(3):
        engine.step()
    assert engine.stats()["kv_blocks_free"] < free and engine.stats()["running"] == 3
    engine.abort(ids[1])
    waiting = engine.add_request(random_prompts([20], seed=9)[0], greedy(5))
    engine.abort(waiting)  # before it ever ran
    assert engine.stats()["running"] == 2 and engine.stats()["waiting"] == 0
    while engine.has_unfinished():
        engine.step()
    assert engine.stats()["kv_blocks_free"] == free and not engine.requests
    with pytest.raises(qwen3gen.EngineError):
        engine.abort(ids[1])


def test_a_seeded_request_draws_the_same_tokens_alone_and_in_a_mixed_batch(tiny_llm):
    engine = engine_for(tiny_llm)
    prompt = random_prompts([12], seed=4)[0]
    sampled = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234, max_new_tokens=24, ignore_eos=True)
    alone = run(engine, {0: [(prompt, sampled)]})[0]
    others = [(p, SamplingParams(temperature=0.7, seed=i, max_new_tokens=30, repetition_penalty=1.2, ignore_eos=True))
              for i, p in enumerate(random_prompts([5, 33, 8], seed=6))]  # fmt: skip
    mixed = run(engine, {0: others[:2], 2: [(prompt, sampled)], 5: others[2:] + [(prompt, greedy(8))]})
    assert mixed[2] == alone
    assert run(engine, {0: [(prompt, sampled)]})[0] == alone
    assert run(engine, {0: [(prompt, SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=99, max_new_tokens=24))]})[0] != alone


def test_n_samples_share_the_prompt_blocks(tiny_llm):
    prompt = random_prompts([40], seed=7)[0]
    before = tiny_llm.engine.stats()
    samples = tiny_llm.generate(prompt, max_new_tokens=8, temperature=1.0, seed=5, n=4, ignore_eos=True)
    after = tiny_llm.engine.stats()
    assert len({tuple(s.token_ids) for s in samples}) == 4
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] >= 3 * 32  # two full blocks each
    assert after["computed_prompt_tokens"] - before["computed_prompt_tokens"] == 40 + 3 * 8


def test_logprobs_equal_transformers_log_softmax(tiny_llm, tiny_hf):
    prompt = random_prompts([9], seed=8)[0]
    out = tiny_llm.generate(prompt, params=SamplingParams(max_new_tokens=6, logprobs=5, prompt_logprobs=3, ignore_eos=True))
    ids = torch.tensor([prompt + out.token_ids])
    with torch.inference_mode():
        reference = torch.log_softmax(tiny_hf(ids).logits[0].float(), dim=-1)
    assert len(out.logprobs) == 6
    for i, (token, logprob, top) in enumerate(out.logprobs):
        row = reference[len(prompt) - 1 + i]
        assert token == out.token_ids[i] == int(row.argmax())
        assert logprob == pytest.approx(float(row[token]), abs=1e-4)
        values, alternatives = row.topk(5)
        assert [t for t, _ in top] == alternatives.tolist()
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i, (token, logprob, top) in enumerate(out.prompt_logprobs[1:], start=1):
        assert token == prompt[i] and logprob == pytest.approx(float(reference[i - 1, token]), abs=1e-4)
        assert [t for t, _ in top] == reference[i - 1].topk(3).indices.tolist()


def test_prompt_logprobs_through_chunks_equal_a_full_forward(tiny_llm):
    """Chunked prefill over the pool against the plain causal pass, position by position."""
    engine = engine_for(tiny_llm, max_batched_tokens=16)
    prompt = random_prompts([70], seed=10)[0]
    engine.add_request(prompt, SamplingParams(max_new_tokens=1, prompt_logprobs=0))
    outputs = [o for _ in range(8) for o in engine.step()]
    scored = next(o.prompt_logprobs for o in outputs if o.prompt_logprobs)
    with torch.inference_mode():
        reference = torch.log_softmax(tiny_llm.model(torch.tensor([prompt]))[0], dim=-1)
    ours = torch.tensor([lp for _, lp, _ in scored[1:]])
    torch.testing.assert_close(ours, reference[torch.arange(69), torch.tensor(prompt[1:])], atol=1e-4, rtol=0)


def test_eos_ends_a_request_at_once(tiny_llm):
    prompt = random_prompts([6], seed=11)[0]
    free = tiny_llm.generate(prompt, max_new_tokens=20, temperature=0.0, ignore_eos=True).token_ids
    saved = tiny_llm.eos_token_ids
    tiny_llm.eos_token_ids = frozenset({free[4]})
    try:
        steps = tiny_llm.engine.steps
        out = tiny_llm.generate(prompt, max_new_tokens=20, temperature=0.0)
    finally:
        tiny_llm.eos_token_ids = saved
    assert out.token_ids == free[: free.index(free[4])] and out.finish_reason == "stop"
    assert tiny_llm.engine.steps - steps == free.index(free[4]) + 1  # no step past the EOS


def test_token_mask_hook_restricts_the_next_token(tiny_llm):
    allowed = torch.zeros(tiny_llm.model.config.vocab_size, dtype=torch.bool)
    allowed[[11, 22, 33]] = True
    params = SamplingParams(max_new_tokens=6, ignore_eos=True, token_mask=lambda output: allowed)
    out = tiny_llm.generate(random_prompts([5], seed=12)[0], params=params)
    assert set(out.token_ids) <= {11, 22, 33}


def test_requests_that_can_never_run_are_refused_at_once(tiny_llm):
    engine = engine_for(tiny_llm, kv_memory=bytes_per_block(tiny_llm.model.config, 16, torch.float32) * 3)
    with pytest.raises(qwen3gen.OutOfMemoryError, match="KV pool holds 32"):
        engine.add_request(list(range(30)), greedy(10))
    with pytest.raises(qwen3gen.ContextLengthError):
        engine.add_request(list(range(500)), greedy(100))
    with pytest.raises(qwen3gen.InvalidParameterError, match="kv_memory"):
        engine_for(tiny_llm, kv_memory="lots")
    assert not engine.has_unfinished()


def test_engine_calls_from_another_thread(tiny_llm):
    """A server thread adds and aborts while this one steps."""
    import threading

    engine = engine_for(tiny_llm)
    ids = []

    def client():
        for p in random_prompts([8, 12, 20], seed=13):
            ids.append(engine.add_request(p, greedy(40)))
        engine.abort(ids[1])

    worker = threading.Thread(target=client)
    worker.start()
    for _ in range(200):
        engine.step()
        if not worker.is_alive() and not engine.has_unfinished():
            break
    worker.join(timeout=10)
    assert len(ids) == 3 and engine.stats()["kv_blocks_used"] == 0


@pytest.mark.slow
def test_0_6b_shape_engine_equals_transformers(tmp_path, tokenizer_dir):
    hf = hf_model(**QWEN3_0_6B, initializer_range=0.02)
    llm = qwen3gen.load(write_checkpoint(tmp_path, tokenizer_dir, hf), device="cpu", dtype="float32", kv_memory="256MiB")
    prompts = random_prompts([20, 7, 33], seed=14)
    outs = llm.generate(prompts, max_new_tokens=4, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in outs] == [hf_greedy(hf, p, 4) for p in prompts]


def test_a_step_that_fails_leaves_no_request_or_cached_block_behind(tiny_llm, monkeypatch):
    engine = engine_for(tiny_llm)
    free = engine.stats()["kv_blocks_free"]
    prompt = random_prompts([40], seed=15)[0]
    engine.add_request(prompt, greedy(4))

    def interrupted(requests, num_tokens, pending):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(engine.runner, "run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            engine.step()
    assert not engine.has_unfinished() and not engine.requests and engine.stats()["kv_blocks_free"] == free
    assert run(engine, {0: [(prompt, greedy(4))]}) == run(engine_for(tiny_llm), {0: [(prompt, greedy(4))]})
    assert engine.stats()["prefix_cache_hit_tokens"] == 0  # the failed step's blocks were never offered as hits
