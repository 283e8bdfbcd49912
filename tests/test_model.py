"""The model against transformers' Qwen3ForCausalLM: logits, the KV cache, greedy decoding, compile."""

import pytest
import torch
from checkpoints import QWEN3_0_6B, hf_model, write_checkpoint

import qwen3gen
from qwen3gen import generate
from qwen3gen.checkpoint import Checkpoint, load_model
from qwen3gen.model import attention_mask, grouped_query_attention
from qwen3gen.sampling import SamplingParams

PROMPT = "Explain large language models."


def full_forward_greedy(model: qwen3gen.Qwen3, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence through the model every step, no cache."""
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(ids):]


def test_logits_match_transformers(tiny_llm, tiny_hf):
    ids = torch.tensor([tiny_llm.tokenizer.encode(PROMPT + " And why do they work?")])
    with torch.inference_mode():
        ours, ref = tiny_llm.model(ids), tiny_hf(ids).logits
    assert ours.shape == (1, ids.shape[1], 151936)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    last = tiny_llm.model(ids, last_only=True)
    torch.testing.assert_close(last, ref[:, -1:], atol=1e-4, rtol=0)


def test_untied_head_and_v4_config(tmp_path, tokenizer_dir):
    hf = hf_model(seed=1, tie_word_embeddings=False, num_key_value_heads=4)
    llm = qwen3gen.load(write_checkpoint(tmp_path, tokenizer_dir, hf, layout="v4"), device="cpu")
    assert llm.model.lm_head is not None and not llm.model.config.tie_word_embeddings
    ids = torch.randint(0, 151669, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(llm.model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_cached_decoding_equals_full_forward(tiny_llm):
    model = tiny_llm.model
    ids = torch.randint(0, 151669, (2, 12))
    with torch.inference_mode():
        full = model(ids)
        model.setup_cache(2, 20)
        pieces = [model(ids[:, :5], input_pos=torch.arange(5))]
        for t in range(5, 12):
            pieces.append(model(ids[:, t : t + 1], input_pos=torch.tensor([t])))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-4, rtol=0)


def test_left_padded_rows_equal_unpadded(tiny_llm):
    """A row's left padding changes nothing: positions restart at its first real token."""
    model = tiny_llm.model
    short, long = torch.randint(0, 151669, (1, 4)), torch.randint(0, 151669, (1, 9))
    batch = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1), long])
    with torch.inference_mode():
        model.setup_cache(2, 12)
        padded = model(batch, input_pos=torch.arange(9), pad=torch.tensor([5, 0]))
        step = model(torch.tensor([[7], [8]]), input_pos=torch.tensor([9]), pad=torch.tensor([5, 0]))
        alone_short = model(torch.cat([short, torch.tensor([[7]])], dim=1))
        alone_long = model(torch.cat([long, torch.tensor([[8]])], dim=1))
    torch.testing.assert_close(padded[0, 5:], alone_short[0, :4], atol=1e-4, rtol=0)
    torch.testing.assert_close(padded[1], alone_long[0, :9], atol=1e-4, rtol=0)
    torch.testing.assert_close(step[0, 0], alone_short[0, -1], atol=1e-4, rtol=0)
    torch.testing.assert_close(step[1, 0], alone_long[0, -1], atol=1e-4, rtol=0)


def test_greedy_tokens_equal_transformers_with_and_without_cache(tiny_llm, tiny_hf):
    ids = tiny_llm.tokenizer.encode(PROMPT)
    out = tiny_llm.generate(ids, max_new_tokens=40, temperature=0.0)
    with torch.inference_mode():
        ref = tiny_hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None)[0, len(ids):]
    assert out.finish_reason == "length"
    assert out.token_ids == ref.tolist()
    assert full_forward_greedy(tiny_llm.model, ids, 40) == out.token_ids
    assert out.text == tiny_llm.tokenizer.decode(out.token_ids)


@pytest.mark.slow
def test_compiled_greedy_equals_eager_without_recompiles(tiny_checkpoint, tiny_llm):
    """After warm-up (decode step + prefill buckets 16 and 32), 20 prompt lengths compile nothing new, and neither
    do the attention lengths decoding passes through (64 and 128 slots here)."""
    compiled = qwen3gen.load(tiny_checkpoint, device="cpu", compile=True)
    compiled.engine.warmup(batch_size=1, prompt_tokens=32, max_new_tokens=40)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for words in range(1, 21):
        prompt = " ".join(["token"] * words) + "."
        eager = tiny_llm.generate(prompt, max_new_tokens=40, temperature=0.0)
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert compiled.generate(prompt, max_new_tokens=40, temperature=0.0).token_ids == eager.token_ids
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("tokens", [1, 5])
def test_folded_and_enable_gqa_attention_agree(tokens):
    """The CPU layout (query groups folded into the query axis) and the GPU one (SDPA's enable_gqa), on CPU tensors.

    Both read only the slots the mask covers: the cache's later slots hold NaN, which would poison the output.
    """
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, tokens, 64), torch.randn(2, 8, 12, 64), torch.randn(2, 8, 12, 64)
    mask = attention_mask(torch.arange(7 - tokens, 7), 12, torch.tensor([0, 3]), torch.float32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    unused = torch.full((2, 8, 4, 64), float("nan"))
    k, v = torch.cat([k, unused], dim=2), torch.cat([v, unused], dim=2)
    for fold in (True, False):
        torch.testing.assert_close(grouped_query_attention(q, k, v, mask, fold=fold), expected)


def test_step_inputs_compiled_as_on_a_gpu(tiny_llm):
    """A CUDA engine compiles the mask and rotary angles into one graph for all shapes; the same function on CPU
    tensors gives the same values as eager, and a new length does not recompile."""
    model = tiny_llm.model
    compiled = torch.compile(model.step_inputs, fullgraph=True, dynamic=True)
    pad, graphs = torch.tensor([0, 3]), []
    for input_pos, key_length in ((torch.arange(16), 64), (torch.tensor([70]), 128), (torch.tensor([200]), 256)):
        (mask, (cos, sin)), (expected_mask, (expected_cos, expected_sin)) = (
            fn(input_pos, pad, key_length, torch.bfloat16) for fn in (compiled, model.step_inputs)
        )
        assert torch.equal(mask, expected_mask) and mask.shape == (2, 1, len(input_pos), key_length)
        torch.testing.assert_close(cos, expected_cos, rtol=0, atol=2**-7)  # one bf16 step: compiled cos/sin may round differently
        torch.testing.assert_close(sin, expected_sin, rtol=0, atol=2**-7)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    assert graphs[2] == graphs[1]  # a third length and position: the second call's graph again


class ReplayOnCPU:
    """Stands in for CapturedStep off the GPU: the same input buffers and output, the step re-run on each replay."""

    recorded = 0

    def __init__(self, step, *inputs):
        ReplayOnCPU.recorded += 1
        self.step, self.inputs = step, [x.clone() for x in inputs]

    def __call__(self, *inputs):
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x)
        return self.step(*self.inputs)


def test_graph_bookkeeping_records_once_per_shape_and_cache(tiny_llm, monkeypatch):
    """The CUDA-graph path's logic on CPU: prefill and decode reuse their recordings (one per attention length),
    a new cache records again."""
    monkeypatch.setattr(generate, "CapturedStep", ReplayOnCPU)
    engine = generate.Engine(tiny_llm.model)
    monkeypatch.setattr(engine, "compiled", True)  # bucketed prompts and a kept cache; the model itself stays eager
    monkeypatch.setattr(engine, "cuda_graphs", True)
    prompts = [tiny_llm.tokenizer.encode(p) for p in (PROMPT, "Hi", "A third, somewhat longer prompt than the others.")]
    expected = [tiny_llm.generate(p, max_new_tokens=56, temperature=0.0, ignore_eos=True).token_ids for p in prompts]
    for prompt, tokens in zip(prompts, expected):
        out = torch.cat(list(engine.tokens([prompt], 56, SamplingParams(), pad_id=0)), dim=1)[0].tolist()
        assert out == tokens
    # (batch, tokens, key length): prompts fill bucket 16, decoding reaches position 71, past 64 slots.
    assert sorted(engine.graphs) == [(1, 1, 64), (1, 1, 128), (1, 16, 64)] and ReplayOnCPU.recorded == 3
    assert tiny_llm.model.cache_shape == (1, 128 + generate.CACHE_ROUNDING)  # 16 + 56 slots, rounded, and a spare block
    tiny_llm.model.setup_cache(1, 64)  # what another engine on the same model may do
    torch.cat(list(engine.tokens([prompts[0]], 12, SamplingParams(), pad_id=0)), dim=1)
    assert ReplayOnCPU.recorded == 5


@pytest.mark.slow
def test_eager_engine_stays_eager_on_a_compiled_model(tiny_checkpoint):
    """Compiling blocks in place must not turn another engine on the same model into a compiled one."""
    llm = qwen3gen.load(tiny_checkpoint, device="cpu", compile=True)
    llm.generate(PROMPT, max_new_tokens=4, temperature=0.0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager = generate.Engine(llm.model)
    ids = llm.tokenizer.encode("A prompt of a length no bucket has.")
    assert len(list(eager.tokens([ids], 4, SamplingParams(), pad_id=0))) == 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_preset_parameter_counts():
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in qwen3gen.Qwen3(cfg).parameters()) for name, cfg in qwen3gen.PRESETS.items()}
    assert counts["0.6B"] == 596_049_920
    assert set(counts) == {"0.6B", "1.7B", "4B", "8B", "14B", "32B"}
    assert 1.6e9 < counts["1.7B"] < 1.8e9 and 7.9e9 < counts["8B"] < 8.3e9 and 32e9 < counts["32B"] < 33e9


@pytest.mark.slow
def test_full_0_6b_shape_matches_transformers(tmp_path, tokenizer_dir):
    hf = hf_model(**QWEN3_0_6B, initializer_range=0.02)
    checkpoint = Checkpoint.open(write_checkpoint(tmp_path, tokenizer_dir, hf))
    assert checkpoint.config == qwen3gen.preset("0.6B").replace(torch_dtype="float32")
    model = load_model(checkpoint, torch.device("cpu"), torch.float32)
    ids = torch.tensor([[840, 20772, 3460, 4128, 4119, 13, 151645, 198]])
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
