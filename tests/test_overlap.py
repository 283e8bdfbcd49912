"""Overlapped steps (each step launched before the one before it is read back, the default on CUDA) run here on CPU
tensors, where every operation runs as it is called: the same outputs as the synchronous engine, request by request,
whatever the requests ask for, and no block or request left behind."""

import pytest
import torch
from test_engine import LENGTHS, NEW_TOKENS, engine_for, greedy, random_prompts, staggered

from qwen3gen import SamplingParams
from qwen3gen.engine.kv_pool import bytes_per_block


def collect(engine, arrivals, max_steps=3000) -> list[dict]:
    """Every output field of every request, in the order added (arrivals as in test_engine.run)."""
    ids, results = [], {}
    for step in range(max_steps):
        for prompt, params in arrivals.get(step, []):
            ids.append(engine.add_request(prompt, params))
            results[ids[-1]] = {"tokens": [], "logprobs": [], "text": "", "reason": None, "prompt": None}
        if step > max(arrivals) and not engine.has_unfinished():
            break
        for out in engine.step():
            result = results[out.request_id]
            result["tokens"] += out.new_token_ids
            result["logprobs"] += out.logprobs or []
            result["text"] += out.text
            result["prompt"] = out.prompt_logprobs or result["prompt"]
            assert result["reason"] is None, "an output after the request finished"
            result["reason"] = out.finish_reason if out.finished else None
    else:
        raise AssertionError("the engine did not finish in time")
    assert not engine.requests and engine.stats()["kv_blocks_used"] == 0 and engine.in_flight is None
    return [results[i] for i in ids]


def both(llm, arrivals, **options) -> tuple[list[dict], list[dict]]:
    return collect(engine_for(llm, overlap=False, **options), arrivals), collect(engine_for(llm, overlap=True, **options), arrivals)


def assert_same(sync: list[dict], overlapped: list[dict]) -> None:
    for a, b in zip(sync, overlapped, strict=True):
        assert a["tokens"] == b["tokens"] and a["reason"] == b["reason"] and a["text"] == b["text"]
        assert len(a["logprobs"]) == len(b["logprobs"])
        for (token_a, lp_a, top_a), (token_b, lp_b, top_b) in zip(a["logprobs"], b["logprobs"]):
            assert token_a == token_b and lp_a == pytest.approx(lp_b, abs=1e-5)
            assert [t for t, _ in top_a] == [t for t, _ in top_b]
        assert (a["prompt"] is None) == (b["prompt"] is None)
        if a["prompt"] is not None:
            assert len(a["prompt"]) == len(b["prompt"]) and a["prompt"][0] is None is b["prompt"][0]
            assert [p[0] for p in a["prompt"][1:]] == [p[0] for p in b["prompt"][1:]]
            assert [p[1] for p in a["prompt"][1:]] == pytest.approx([p[1] for p in b["prompt"][1:]], abs=1e-5)


@pytest.mark.parametrize("options", [{}, {"max_batched_tokens": 24}], ids=["whole-prompts", "chunked"])
def test_overlapped_greedy_requests_equal_the_synchronous_engine(tiny_llm, options):
    prompts, params = random_prompts(LENGTHS), [greedy(n) for n in NEW_TOKENS]
    assert_same(*both(tiny_llm, staggered(prompts, params), **options))


def test_overlapped_sampling_penalties_logprobs_and_stops_equal_the_synchronous_engine(tiny_llm):
    prompts = random_prompts([12, 30, 5, 44, 9, 20], seed=21)
    free = collect(engine_for(tiny_llm, overlap=False), {0: [(prompts[0], greedy(12))]})[0]
    stop_text = tiny_llm.tokenizer.decode(free["tokens"][3:5])
    eos = frozenset({free["tokens"][6]})
    params = [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=7, max_new_tokens=14, repetition_penalty=1.3,
                       presence_penalty=0.5, frequency_penalty=0.2, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=9, logprobs=0, prompt_logprobs=2, ignore_eos=True),
        SamplingParams(temperature=1.1, min_p=0.05, seed=99, max_new_tokens=1, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=12, stop=[stop_text], ignore_eos=True),
        SamplingParams(temperature=0.7, seed=3, max_new_tokens=10, prompt_logprobs=0, ignore_eos=True),
        SamplingParams(temperature=0.0, max_new_tokens=12),  # ends at its EOS
    ]  # fmt: skip
    arrivals = {0: [(prompts[0], params[0]), (prompts[1], params[1])], 2: [(prompts[2], params[2])],
                3: [(prompts[0], params[3]), (prompts[4], params[4])], 6: [(prompts[0], params[5])]}  # fmt: skip
    saved = tiny_llm.eos_token_ids
    tiny_llm.eos_token_ids = eos
    try:
        sync, overlapped = both(tiny_llm, arrivals, max_batched_tokens=32)
    finally:
        tiny_llm.eos_token_ids = saved
    assert_same(sync, overlapped)
    assert sync[3]["reason"] == "stop" and sync[5]["reason"] == "stop" and len(sync[5]["tokens"]) == 6
    assert sync[1]["prompt"] is not None and len(sync[1]["prompt"]) == len(prompts[1])


def test_overlapped_token_masks_see_every_token_before_them(tiny_llm):
    """A mask computed from the output so far: the engine reads each step before launching the next."""
    vocab = tiny_llm.model.config.vocab_size
    seen = []

    def alternate(output: list[int]) -> torch.Tensor:
        seen.append(list(output))
        allowed = torch.zeros(vocab, dtype=torch.bool)
        allowed[[11, 22] if len(output) % 2 == 0 else [33, 44]] = True
        return allowed

    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True, token_mask=alternate)
    prompt = random_prompts([7], seed=22)[0]
    sync, overlapped = both(tiny_llm, {0: [(prompt, params), (random_prompts([9], seed=23)[0], greedy(8))]})
    assert_same(sync, overlapped)
    tokens = overlapped[0]["tokens"]
    assert all(t in ((11, 22) if i % 2 == 0 else (33, 44)) for i, t in enumerate(tokens))
    assert seen[-8:] == [tokens[:i] for i in range(8)]


def test_overlapped_preemption_under_a_tiny_pool_gives_the_same_tokens(tiny_llm):
    per_block = bytes_per_block(tiny_llm.model.config, 16, torch.float32)
    prompts, params = random_prompts(LENGTHS), [greedy(n) for n in NEW_TOKENS]
    engine = engine_for(tiny_llm, kv_memory=per_block * 12, overlap=True)  # 11 blocks of 16 slots for 14 requests
    overlapped = collect(engine, {0: list(zip(prompts, params))})
    assert engine.stats()["preemptions"] > 0
    assert_same(collect(engine_for(tiny_llm, overlap=False), {0: list(zip(prompts, params))}), overlapped)


def test_overlapped_abort_frees_blocks_and_ends_the_outputs(tiny_llm):
    engine = engine_for(tiny_llm, overlap=True)
    free = engine.stats()["kv_blocks_free"]
    ids = [engine.add_request(p, greedy(40)) for p in random_prompts([30, 70, 5], seed=24)]
    for _ in range(4):
        engine.step()
    assert engine.in_flight is not None and all(engine.requests[i].pending for i in ids)
    engine.abort(ids[1])  # its token in flight is dropped when read
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert ids[1] not in {o.request_id for o in outputs}
    assert engine.stats()["kv_blocks_free"] == free and not engine.requests


def test_overlap_computes_at_most_one_token_past_an_eos(tiny_llm):
    prompt = random_prompts([6], seed=25)[0]
    free = collect(engine_for(tiny_llm, overlap=False), {0: [(prompt, greedy(20))]})[0]["tokens"]
    eos = free[5]
    engine = engine_for(tiny_llm, overlap=True)
    engine.eos_ids = frozenset({eos})
    out = collect(engine, {0: [(prompt, SamplingParams(temperature=0.0, max_new_tokens=20))]})[0]
    assert out["tokens"] == free[: free.index(eos)] and out["reason"] == "stop"
    assert engine.steps == free.index(eos) + 2  # the prefill, the decodes up to the EOS, and one more
    engine.eos_ids = frozenset()
    collect(engine, {0: [(prompt, greedy(5))]})
    assert engine.steps == free.index(eos) + 2 + 5  # max_new_tokens is known ahead: no step past it
