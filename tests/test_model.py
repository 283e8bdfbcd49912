"""The model against transformers' Qwen3ForCausalLM: logits, greedy decoding; attention layouts; the decode graphs."""

import pytest
import torch
from checkpoints import QWEN3_0_6B, hf_model, write_checkpoint

import qwen3gen
from qwen3gen import Engine
from qwen3gen.attention import sdpa
from qwen3gen.loaders.checkpoint import Checkpoint, load_model
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


def test_untied_head_and_v4_config(tmp_path, tokenizer_dir):
    hf = hf_model(seed=1, tie_word_embeddings=False, num_key_value_heads=4)
    llm = qwen3gen.load(write_checkpoint(tmp_path, tokenizer_dir, hf, layout="v4"), device="cpu")
    assert llm.model.lm_head is not None and not llm.model.config.tie_word_embeddings
    ids = torch.randint(0, 151669, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(llm.model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_greedy_tokens_equal_transformers_with_and_without_cache(tiny_llm, tiny_hf):
    ids = tiny_llm.tokenizer.encode(PROMPT)
    out = tiny_llm.generate(ids, max_new_tokens=40, temperature=0.0)
    with torch.inference_mode():
        ref = tiny_hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None)[0, len(ids):]
    assert out.finish_reason == "length"
    assert out.token_ids == ref.tolist()
    assert full_forward_greedy(tiny_llm.model, ids, 40) == out.token_ids
    assert out.text == tiny_llm.tokenizer.decode(out.token_ids)


@pytest.mark.parametrize("queries", [1, 5])
def test_sdpa_masked_folds_query_groups(queries):
    """A masked call folds each KV head's query heads into the query axis: the numbers of repeated K/V heads."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 16, queries, 64), torch.randn(2, 8, 12, 64), torch.randn(2, 8, 12, 64)
    allowed = torch.arange(12) <= torch.arange(7 - queries, 7)[:, None]
    mask = torch.zeros(2, 1, queries, 12).masked_fill_(~allowed, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    torch.testing.assert_close(sdpa(q, k, v, mask), expected)
    q = torch.randn(2, 16, 12, 64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(sdpa(q, k, v, None), expected)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_decode_graph_bookkeeping_on_cpu(tiny_llm, monkeypatch, compile):
    """The CUDA-graph path's buffers on CPU: decode steps padded to the graph sizes give the eager engine's tokens, one
    recording per size (off CUDA, runner.RecordedStep runs the step again at each replay); the padding rows write only
    to the scratch block. Compiled, as on CUDA: one whole graph per size (fullgraph), the kernels inside it."""
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, kv_memory="16MiB", max_running=6, compile=compile)
    assert engine.runner.graph_sizes == [1, 2, 4, 6]
    monkeypatch.setattr(engine.runner, "use_graphs", True)
    prompts = [tiny_llm.tokenizer.encode(p) for p in (PROMPT, "Hi", "A third, somewhat longer prompt than the others.")]
    expected = [o.token_ids for o in tiny_llm.generate(prompts, max_new_tokens=20, temperature=0.0, ignore_eos=True)]
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n, ignore_eos=True)) for p, n in zip(prompts, (20, 12, 20))]
    tokens = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids
    assert [tokens[i] for i in ids] == [expected[0], expected[1][:12], expected[2]]
    assert sorted(engine.runner.graphs) == [2, 4]  # 3 rows, then 2
    assert engine.pool.caches[0][0][0].abs().sum() > 0  # the scratch block took the padding rows' writes


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
