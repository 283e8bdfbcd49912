"""Generation policy and the generation API: sampling, stopping, streaming, chat, errors."""

import pytest
import torch
from transformers.generation import logits_process as hf

import qwen3gen
from qwen3gen.engine.sampler import Sampled
from qwen3gen.llm import ReasoningSplitter
from qwen3gen.sampling import SamplingParams, apply_penalties, draw, filter_logits, seeded_uniform

PROMPT = "Explain large language models."


PARAMS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.0, top_k=20),
    SamplingParams(temperature=0.6, top_p=0.9),
    SamplingParams(temperature=1.3, min_p=0.05),
    SamplingParams(temperature=0.6, top_k=50, top_p=0.95, min_p=0.01),
]


def warped(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    warpers = [hf.TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        warpers.append(hf.TopKLogitsWarper(params.top_k))
    if params.top_p < 1:
        warpers.append(hf.TopPLogitsWarper(params.top_p))
    if params.min_p:
        warpers.append(hf.MinPLogitsWarper(params.min_p))
    for warper in warpers:
        logits = warper(None, logits.clone())
    return logits


def test_filters_equal_transformers_warpers_row_by_row():
    """One batch whose rows each have their own parameters: every row equals transformers' warpers with its own."""
    torch.manual_seed(0)
    logits = torch.randn(len(PARAMS), 1000) * 3
    values = lambda name, dtype=torch.float32: torch.tensor([getattr(p, name) for p in PARAMS], dtype=dtype)  # noqa: E731
    ours = filter_logits(logits, values("temperature"), values("top_k", torch.long), values("top_p"), values("min_p"))
    for row, params in enumerate(PARAMS):
        expected = warped(logits[row : row + 1], params)[0]
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected)), params
        torch.testing.assert_close(ours[row], expected)


def test_penalties_equal_transformers_and_openai():
    torch.manual_seed(0)
    logits, prompt, output = torch.randn(2, 100), torch.randint(0, 100, (2, 30)), torch.randint(0, 100, (2, 12))
    counts = torch.zeros(2, 100, dtype=torch.int32).scatter_add_(1, output, torch.ones_like(output, dtype=torch.int32))
    prompt_seen = torch.zeros(2, 100, dtype=torch.bool).scatter_(1, prompt, True)
    ones, zeros = torch.ones(2), torch.zeros(2)
    expected = hf.RepetitionPenaltyLogitsProcessor(1.3)(torch.cat([prompt, output], 1), logits.clone())
    torch.testing.assert_close(apply_penalties(logits, counts, prompt_seen, torch.full((2,), 1.3), zeros, zeros), expected)
    presence, frequency = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 1.5])
    openai = logits - frequency[:, None] * counts - presence[:, None] * (counts > 0)  # OpenAI's own definition
    torch.testing.assert_close(apply_penalties(logits, counts, prompt_seen, ones, presence, frequency), openai)


def test_draws_follow_the_distribution_and_their_seeds():
    probs = torch.tensor([[0.0, 0.6, 0.3, 0.1]]).repeat(4000, 1)
    tokens = draw(probs, torch.arange(4000), torch.zeros(4000, dtype=torch.long))
    frequencies = torch.bincount(tokens, minlength=4).float() / 4000
    torch.testing.assert_close(frequencies, probs[0], atol=0.03, rtol=0)
    seeds, steps = torch.tensor([7, 7, 8]), torch.tensor([3, 3, 3])
    noise = seeded_uniform(seeds, steps, 1000)
    assert torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert not torch.equal(noise[0], seeded_uniform(seeds[:1], steps[:1] + 1, 1000)[0])
    assert 0 < noise.min() and noise.max() < 1 and abs(noise.mean().item() - 0.5) < 0.02


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=2.0), "min_p"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_parameters_are_refused(tiny_llm, kwargs, message):
    with pytest.raises(qwen3gen.InvalidParameterError, match=message):
        tiny_llm.generate(PROMPT, **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts_are_refused(tiny_llm):
    with pytest.raises(qwen3gen.InvalidParameterError, match="empty"):
        tiny_llm.generate("")
    with pytest.raises(qwen3gen.InvalidParameterError, match="outside the vocabulary"):
        tiny_llm.generate([1, 2, 10**7])
    with pytest.raises(qwen3gen.ContextLengthError, match="context of 512 tokens"):
        tiny_llm.generate(PROMPT, max_new_tokens=510)


def test_same_seed_same_text(tiny_llm):
    runs = [tiny_llm.generate(PROMPT, max_new_tokens=24, temperature=1.0, top_k=50, seed=s).token_ids for s in (7, 7, 8)]
    assert runs[0] == runs[1] != runs[2]


def test_defaults_come_from_generation_config(tiny_llm):
    assert tiny_llm.default_sampling() == SamplingParams(temperature=0.6, top_k=20, top_p=0.95)
    assert tiny_llm.eos_token_ids == {151643, 151645}
    assert tiny_llm.sampling_params(temperature=0.0, top_k=None).greedy


def test_stops_at_any_eos_id(tiny_llm):
    reference = tiny_llm.generate(PROMPT, max_new_tokens=20, temperature=0.0)
    eos = reference.token_ids[6]
    first = reference.token_ids.index(eos)
    saved = tiny_llm.eos_token_ids
    tiny_llm.eos_token_ids = frozenset({123, eos})
    try:
        out = tiny_llm.generate(PROMPT, max_new_tokens=20, temperature=0.0)
    finally:
        tiny_llm.eos_token_ids = saved
    assert out.finish_reason == "stop"
    assert out.token_ids == reference.token_ids[:first]
    assert out.text == tiny_llm.tokenizer.decode(out.token_ids)


def test_stop_string_is_cut_from_the_text(tiny_llm):
    reference = tiny_llm.generate(PROMPT, max_new_tokens=30, temperature=0.0)
    stop = reference.text[len(reference.text) // 2 : len(reference.text) // 2 + 3]
    out = tiny_llm.generate(PROMPT, max_new_tokens=30, temperature=0.0, stop=["never appears", stop])
    assert out.finish_reason == "stop"
    assert out.text == reference.text[: reference.text.index(stop)]
    assert reference.token_ids[: len(out.token_ids)] == out.token_ids


def test_stream_pieces_join_to_the_text(tiny_llm):
    reference = tiny_llm.generate(PROMPT, max_new_tokens=30, temperature=0.0)
    stream = tiny_llm.stream(PROMPT, max_new_tokens=30, temperature=0.0)
    pieces = list(stream)
    assert len(pieces) > 5 and "".join(pieces) == reference.text == stream.result.text
    assert stream.result.token_ids == reference.token_ids
    stop = reference.text[10:14]
    assert "".join(tiny_llm.stream(PROMPT, max_new_tokens=30, temperature=0.0, stop=stop)) == reference.text[: reference.text.index(stop)]


def test_stats_are_filled(tiny_llm):
    stats = tiny_llm.generate(PROMPT, max_new_tokens=8, temperature=0.0).stats
    assert stats.prompt_tokens == 6 and stats.new_tokens == 8
    assert 0 < stats.time_to_first_token_s <= stats.total_s
    assert stats.decode_tokens_per_s > 0 and stats.peak_memory_bytes > 2**20 and stats.memory_kind == "cpu-rss"
    assert "tok/s" in stats.summary()


def test_batch_greedy_equals_one_at_a_time(tiny_llm):
    prompts = [PROMPT, "Hi", "Write a poem about the sea, in the style of a sailor's log."]
    batch = tiny_llm.generate(prompts, max_new_tokens=24, temperature=0.0)
    assert [b.token_ids for b in batch] == [tiny_llm.generate(p, max_new_tokens=24, temperature=0.0).token_ids for p in prompts]


@pytest.mark.parametrize(
    "pieces, thinking, reasoning, answer",
    [
        (["<think>\nHmm", " let me", " think.\n</th", "ink>\n\nThe answer."], False, "\nHmm let me think.\n", "The answer."),
        (["Just an", " answer"], False, "", "Just an answer"),
        (["<thi", "nk>ok</think>done"], False, "ok", "done"),
        (["still thinking", " </think>\n\nyes"], True, "still thinking ", "yes"),
        (["<think>\nnever closed"], False, "\nnever closed", ""),
    ],
)
def test_reasoning_splitter(pieces, thinking, reasoning, answer):
    splitter = ReasoningSplitter(thinking)
    parts = [p for piece in pieces for p in splitter.feed(piece)] + splitter.flush()
    assert "".join(t for k, t in parts if k == "reasoning") == reasoning
    assert "".join(t for k, t in parts if k == "answer") == answer


def test_chat_uses_the_template_and_splits_reasoning(tiny_llm):
    messages = [{"role": "user", "content": "What is 2+2?"}]
    result = tiny_llm.chat(messages, enable_thinking=False, max_new_tokens=12, temperature=0.0)
    prompt = tiny_llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False)
    direct = tiny_llm.generate(prompt, max_new_tokens=12, temperature=0.0)
    assert result.generation.token_ids == direct.token_ids
    assert result.reasoning == "" and result.answer == direct.text.strip()


def scripted(token_ids):
    """Replace the sampler's choice by a fixed reply, to test the chat path on a known output."""
    reply = iter(token_ids)

    def sample(requests, logits, greedy=None):  # noqa: ANN001, ANN202
        return Sampled.of(torch.tensor([next(reply) for _ in requests]), [], [], [])

    return sample


def test_chat_with_thinking_returns_reasoning_and_answer(tiny_llm, monkeypatch):
    tok = tiny_llm.tokenizer
    reply = tok.encode("<think>\nTwo plus two is four.\n</think>\n\nIt is 4.") + [151645]
    monkeypatch.setattr(tiny_llm.engine.sampler, "sample", scripted(reply))
    result = tiny_llm.chat([{"role": "user", "content": "What is 2+2?"}], enable_thinking=True, max_new_tokens=50)
    assert result.reasoning == "Two plus two is four."
    assert result.answer == "It is 4."
    assert result.generation.finish_reason == "stop" and result.generation.token_ids == reply[:-1]


def test_n_samples_per_prompt(tiny_llm):
    samples = tiny_llm.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=3, n=3)
    assert len(samples) == 3 and len({tuple(s.token_ids) for s in samples}) == 3
    assert [s.token_ids for s in samples] == [s.token_ids for s in tiny_llm.generate(PROMPT, max_new_tokens=12, temperature=1.0, seed=3, n=3)]
    grouped = tiny_llm.generate([PROMPT, "Hi"], max_new_tokens=6, temperature=0.0, n=2)
    assert [len(g) for g in grouped] == [2, 2] and grouped[1][0].token_ids == grouped[1][1].token_ids
    with pytest.raises(qwen3gen.InvalidParameterError, match="n must be an integer >= 1"):
        tiny_llm.generate(PROMPT, n=0)


def test_batch_rows_finish_on_their_own(tiny_llm):
    prompts = [PROMPT, "Hi"]
    free = tiny_llm.generate(prompts, max_new_tokens=16, temperature=0.0)
    eos = next(t for t in free[1].token_ids[2:] if t not in free[0].token_ids)
    saved = tiny_llm.eos_token_ids
    tiny_llm.eos_token_ids = frozenset({eos})
    try:
        rows = tiny_llm.generate(prompts, max_new_tokens=16, temperature=0.0)
    finally:
        tiny_llm.eos_token_ids = saved
    assert (rows[0].finish_reason, rows[1].finish_reason) == ("length", "stop")
    assert rows[0].token_ids == free[0].token_ids
    assert rows[1].token_ids == free[1].token_ids[: free[1].token_ids.index(eos)]


def test_an_interrupted_generation_frees_its_blocks(tiny_llm, monkeypatch):
    """Ctrl-C during a step: the interrupt reaches the caller, and the engine holds nothing of the request."""
    free = tiny_llm.engine.stats()["kv_blocks_free"]
    calls = []
    run = tiny_llm.engine.runner.run

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run(*args)

    monkeypatch.setattr(tiny_llm.engine.runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_llm.generate([PROMPT, "Hi"], max_new_tokens=20, temperature=0.0)
    stream = tiny_llm.stream(PROMPT, max_new_tokens=20, temperature=0.0)
    next(iter(stream))
    del stream  # a stream dropped half-way
    import gc

    gc.collect()
    assert not tiny_llm.engine.has_unfinished() and tiny_llm.engine.stats()["kv_blocks_free"] == free


def test_peak_memory_restarts_on_cpu():
    """On Linux a CPU's peak (resident memory) restarts from the current size, so that each bench row, and the CLI's
    generation stats, show their own peak and not the load's."""
    from qwen3gen.results import peak_memory, reset_peak_memory

    cpu = torch.device("cpu")
    spike = torch.ones(64 * 2**20, dtype=torch.int32)  # 256 MiB, touched
    del spike
    high = peak_memory(cpu)[0]
    assert reset_peak_memory(cpu)
    assert peak_memory(cpu)[0] < high - 128 * 2**20
