"""Qwen2 / Qwen2.5 (model_type "qwen2") through the same model: against transformers' Qwen2ForCausalLM, and refusals."""

import json
import re
from pathlib import Path

import pytest
import torch
from checkpoints import BASE_GENERATION_CONFIG, hf_model, hf_qwen2_model, write_checkpoint
from safetensors.torch import load_file, save_file

import qwen3gen
from qwen3gen.loaders.checkpoint import Checkpoint, load_model
from qwen3gen.errors import CheckpointError
from qwen3gen.loaders.quantize import Int8Linear, quantize, quantize_per_channel

PROMPT = "Explain large language models."
CPU = torch.device("cpu")


def edit_config(directory: Path, drop: tuple[str, ...] = (), **changes) -> None:
    path = directory / "config.json"
    config = {**json.loads(path.read_text()), **changes}
    path.write_text(json.dumps({k: v for k, v in config.items() if k not in drop}))


def edit_tensors(file: Path, edit) -> None:
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture(scope="module", params=["tied", "untied"])
def qwen2(request, tmp_path_factory, tokenizer_dir):
    """(transformers model, our LLM): tied with head_dim from hidden_size // heads (16), transformers 5 layout; or
    untied with an explicit head_dim (32) and config.json as the Hub serves Qwen2.5 (4.x layout, a sliding_window
    size and max_window_layers that do nothing while use_sliding_window is false)."""
    tied = request.param == "tied"
    hf = hf_qwen2_model(seed=2, tie_word_embeddings=True) if tied else hf_qwen2_model(seed=3, tie_word_embeddings=False, head_dim=32)
    directory = tmp_path_factory.mktemp(f"qwen2-{request.param}")
    write_checkpoint(directory, tokenizer_dir, hf, BASE_GENERATION_CONFIG, layout="v5" if tied else "v4")
    if not tied:
        edit_config(directory, sliding_window=32768, max_window_layers=1, use_sliding_window=False, drop=("layer_types",))
    return hf, qwen3gen.load(directory, device="cpu", dtype="float32")


def test_config_switches(qwen2):
    hf, llm = qwen2
    cfg = llm.model.config
    assert (cfg.model_type, cfg.qk_norm, cfg.attention_bias, cfg.o_proj_bias) == ("qwen2", False, True, False)
    assert cfg.head_dim == hf.model.layers[0].self_attn.head_dim == (16 if cfg.tie_word_embeddings else 32)
    assert cfg.tie_word_embeddings == (llm.model.lm_head is None) == hf.config.tie_word_embeddings
    names = {n for n, _ in llm.model.checkpoint_tensors()}
    assert "layers.0.self_attn.v_proj.bias" in names and "layers.0.self_attn.o_proj.bias" not in names
    assert not any("norm" in n for n in names if ".self_attn." in n)
    assert hf.model.layers[1].self_attn.k_proj.bias.abs().min() > 0  # random, so a dropped bias changes the logits


def test_logits_match_transformers(qwen2):
    hf, llm = qwen2
    ids = torch.tensor([llm.tokenizer.encode(PROMPT + " And why do they work?")])
    batch = torch.randint(0, 151643, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours, ref = llm.model(ids), hf(ids).logits
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(llm.model(batch), hf(batch).logits, atol=1e-4, rtol=0)


def test_greedy_tokens_equal_transformers(qwen2):
    hf, llm = qwen2
    ids = llm.tokenizer.encode(PROMPT)
    out = llm.generate(ids, max_new_tokens=32, temperature=0.0, ignore_eos=True)
    with torch.inference_mode():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None)[0, len(ids):]
    assert out.finish_reason == "length"
    assert out.token_ids == ref.tolist()
    assert len(set(out.token_ids)) > 4  # not one token repeated: the comparison means something


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A small-vocabulary, untied Qwen2 checkpoint for int8 and the refusals (the tokenizer is not used)."""
    hf = hf_qwen2_model(vocab_size=1000, tie_word_embeddings=False)
    return write_checkpoint(tmp_path_factory.mktemp("qwen2-small"), tokenizer_dir, hf)


def test_int8_keeps_the_biases(qwen2_checkpoint):
    """int8 equals the float model with every linear weight replaced by its dequantised int8 copy, biases kept."""
    dequantised = load_model(Checkpoint.open(qwen2_checkpoint), CPU, torch.float32)
    int8 = quantize(load_model(Checkpoint.open(qwen2_checkpoint), CPU, torch.float32), "int8")
    assert isinstance(int8.layers[0].self_attn.qkv_proj, Int8Linear) and int8.layers[0].self_attn.qkv_proj.bias is not None
    with torch.no_grad():
        for module in dequantised.modules():
            if isinstance(module, torch.nn.Linear):
                q, scales = quantize_per_channel(module.weight)
                module.weight.copy_(q.float() * scales[:, None])
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(int8(ids), dequantised(ids), atol=1e-3, rtol=0)


def test_sliding_window_is_refused(tmp_path, qwen2_checkpoint):
    config = json.loads((qwen2_checkpoint / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "use_sliding_window": True, "sliding_window": 4096}))
    with pytest.raises(CheckpointError) as info:
        qwen3gen.Qwen3Config.from_file(tmp_path / "config.json")
    assert str(info.value) == "config.json asks for sliding-window attention (use_sliding_window: true), which is not implemented."


def test_missing_bias_is_named(tmp_path, tokenizer_dir):
    directory = write_checkpoint(tmp_path, tokenizer_dir, hf_qwen2_model(vocab_size=1000))
    name = "model.layers.1.self_attn.k_proj.bias"
    edit_tensors(directory / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_model(Checkpoint.open(directory), CPU, torch.float32)


def test_qwen3_refuses_a_stray_q_proj_bias(tmp_path, tokenizer_dir):
    directory = write_checkpoint(tmp_path, tokenizer_dir, hf_model(vocab_size=1000))
    name = "model.layers.0.self_attn.q_proj.bias"
    edit_tensors(directory / "model.safetensors", lambda t: t.update({name: torch.ones(128)}))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        load_model(Checkpoint.open(directory), CPU, torch.float32)
