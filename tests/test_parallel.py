"""Tensor parallelism on the CPU: two gloo ranks (this process and one it starts) against the same model at tp=1.

Float32: log-probabilities (log_softmax of the gathered logits) within 1e-5 of tp=1's, greedy tokens identical, through
the engine with requests added at different steps, chunked prefill, prefix-cache hits and overlapped steps (the
tokens of the step in flight sent to the other rank). A rank that dies is an EngineError, not a hang.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import qwen3gen
import qwen3gen.bench
import qwen3gen.loaders.checkpoint
from qwen3gen.config import Qwen3Config
from qwen3gen.errors import EngineError, InvalidParameterError
from qwen3gen.parallel import check_shardable, shard_config, shard_part

from checkpoints import hf_model, write_checkpoint

PROMPTS = [[1, 2, 3, 4, 5], list(range(100, 140)), list(range(7, 60)), [42] * 3, list(range(1000, 1100)), [5, 6]]
NEW_TOKENS = [12, 5, 9, 14, 3, 8]


@pytest.fixture(scope="module")
def biased_checkpoint(tmp_path_factory, tokenizer_dir):
    """Tied head, q/k/v and o_proj biases (o_proj's is added once over the ranks)."""
    return write_checkpoint(tmp_path_factory.mktemp("tp-tied"), tokenizer_dir, hf_model(attention_bias=True))


@pytest.fixture(scope="module")
def untied_checkpoint(tmp_path_factory, tokenizer_dir):
    """An output head of its own and an odd vocabulary: the second rank's last row is padding, cut after the gather."""
    model = hf_model(seed=1, tie_word_embeddings=False, vocab_size=151937)
    return write_checkpoint(tmp_path_factory.mktemp("tp-untied"), tokenizer_dir, model)


def run_staggered(llm: qwen3gen.LLM, logprobs: int | None = None) -> dict[str, list]:
    """PROMPTS added two at a time, one step apart, greedy: each request's tokens (and logprobs)."""
    engine, tokens, scores, ids = llm.engine, {}, {}, []
    params = [qwen3gen.SamplingParams(max_new_tokens=n, logprobs=logprobs) for n in NEW_TOKENS]
    for step in range(200):
        if 2 * step < len(PROMPTS):
            ids += [engine.add_request(p, q) for p, q in zip(PROMPTS[2 * step : 2 * step + 2], params[2 * step :])]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            scores.setdefault(out.request_id, []).extend(out.logprobs or [])
        if len(ids) == len(PROMPTS) and not engine.has_unfinished():
            break
    return {"tokens": [tokens[i] for i in ids], "logprobs": [scores.get(i, []) for i in ids]}


def assert_same_logprobs(ours: list, reference: list) -> None:
    for row, expected in zip(ours, reference):
        assert [t for t, _, _ in row] == [t for t, _, _ in expected]
        for (_, logprob, top), (_, ref_logprob, ref_top) in zip(row, expected):
            assert abs(logprob - ref_logprob) < 1e-5
            assert [i for i, _ in top] == [i for i, _ in ref_top]
            assert max(abs(a - b) for (_, a), (_, b) in zip(top, ref_top)) < 1e-5


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "reference"])
def test_two_ranks_match_one(biased_checkpoint, kernels):
    options = dict(device="cpu", kv_memory="32MiB", max_batched_tokens=48, kernels=kernels)  # 100 tokens: 3 chunks
    with qwen3gen.load(biased_checkpoint, **options) as one:
        expected = run_staggered(one, logprobs=5)
    with qwen3gen.load(biased_checkpoint, tensor_parallel_size=2, **options) as two:
        got = run_staggered(two, logprobs=5)
        assert got["tokens"] == expected["tokens"]
        assert [len(t) for t in got["tokens"]] == NEW_TOKENS
        assert_same_logprobs(got["logprobs"], expected["logprobs"])
        # The same prompts again: their full blocks come from the prefix cache, on both ranks alike.
        hits = two.engine.stats()["prefix_cache_hit_tokens"]
        assert run_staggered(two)["tokens"] == expected["tokens"]
        assert two.engine.stats()["prefix_cache_hit_tokens"] > hits
        assert two.engine.stats()["kv_blocks_used"] == 0
        worker = two.engine.parallel.processes[0]
    assert worker.wait(timeout=10) == 0  # close() stopped it


def test_untied_head_odd_vocabulary_and_overlap(untied_checkpoint):
    """Overlapped steps feed each decode the token sampled by the step in flight, on every rank."""
    options = dict(device="cpu", kv_memory="32MiB", max_batched_tokens=64, overlap=True)
    with qwen3gen.load(untied_checkpoint, **options) as one:
        expected = run_staggered(one, logprobs=3)
    with qwen3gen.load(untied_checkpoint, tensor_parallel_size=2, **options) as two:
        got = run_staggered(two, logprobs=3)
        outs = two.generate(["Hello there", "The capital of France is"], max_new_tokens=6, temperature=0)
    assert got["tokens"] == expected["tokens"]
    assert_same_logprobs(got["logprobs"], expected["logprobs"])
    assert all(len(o.token_ids) == 6 or o.finish_reason == "stop" for o in outs)


def test_a_lost_rank_is_an_error_not_a_hang(biased_checkpoint):
    llm = qwen3gen.load(biased_checkpoint, device="cpu", kv_memory="16MiB", tensor_parallel_size=2)
    try:
        llm.generate([1, 2, 3], max_new_tokens=2, temperature=0)
        worker = llm.engine.parallel.processes[0]
        worker.kill()
        worker.wait(timeout=10)
        start = time.monotonic()
        with pytest.raises(EngineError, match="rank 1 exited"):
            llm.generate([4, 5, 6], max_new_tokens=4, temperature=0)
        assert time.monotonic() - start < 30
        with pytest.raises(EngineError, match="cannot go on"):
            llm.generate([4, 5, 6], max_new_tokens=4, temperature=0)
        assert llm.engine.stats()["kv_blocks_used"] == 0
    finally:
        llm.close()


def test_cli_generate_with_two_ranks(biased_checkpoint):
    command = [sys.executable, "-m", "qwen3gen.cli", "generate", "--model", str(biased_checkpoint), "--device", "cpu",
               "--kv-memory", "16MiB", "Hello", "--max-new-tokens", "5", "--temperature", "0"]  # fmt: skip
    one = subprocess.run(command, capture_output=True, text=True, timeout=120)
    two = subprocess.run([*command, "--tensor-parallel-size", "2"], capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    assert two.stdout == one.stdout


def test_refusals(biased_checkpoint, monkeypatch):
    with pytest.raises(InvalidParameterError, match="does not divide the model's 2 KV heads"):
        qwen3gen.load(biased_checkpoint, device="cpu", tensor_parallel_size=3)
    with pytest.raises(InvalidParameterError, match="positive integer"):
        qwen3gen.load(biased_checkpoint, device="cpu", tensor_parallel_size=0)
    with monkeypatch.context() as patch, pytest.raises(InvalidParameterError, match="more than the 1 CPU cores"):
        patch.setattr("os.cpu_count", lambda: 1)
        qwen3gen.load(biased_checkpoint, device="cpu", tensor_parallel_size=2)
    with pytest.raises(InvalidParameterError, match="not GGUF files or quantized"):
        qwen3gen.load(biased_checkpoint, device="cpu", tensor_parallel_size=2, quantization="int8")
    command = [sys.executable, "-m", "qwen3gen.cli", "generate", "--model", str(biased_checkpoint), "--device", "cpu",
               "Hi", "--tensor-parallel-size", "3"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "does not divide" in result.stderr


def test_shard_shapes_and_parts():
    cfg = Qwen3Config(vocab_size=11, num_attention_heads=16, num_key_value_heads=8, intermediate_size=3072)
    local = shard_config(cfg, 4)
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size, local.vocab_size) == (4, 2, 768, 3)
    with pytest.raises(InvalidParameterError, match="KV heads"):
        check_shardable(cfg, 3)
    # Rows of q/k/v and gate/up, columns of o_proj and down, rows of the vocabulary (the last rank's cut short).
    assert shard_part("model.layers.0.self_attn.k_proj.weight", (1024, 1024), (256, 1024), 2) == (0, 512, 768)
    assert shard_part("model.layers.0.self_attn.o_proj.weight", (1024, 2048), (1024, 512), 1) == (1, 512, 1024)
    assert shard_part("model.embed_tokens.weight", (11, 64), (3, 64), 3) == (0, 9, 11)
    assert shard_part("model.norm.weight", (64,), (64,), 1) is None
    assert shard_part("model.layers.0.self_attn.o_proj.bias", (64,), (64,), 0) is None
    assert shard_part("model.layers.0.self_attn.o_proj.bias", (64,), (64,), 1) == (0, 0, 0)  # zeros: rank 0 adds it


def test_shard_loads_only_its_part(biased_checkpoint):
    """Rank 1's tensors are its slices of the checkpoint's (read without a process group: no collective runs)."""
    from qwen3gen.loaders.checkpoint import Checkpoint, load_model
    from qwen3gen.parallel import Shard
    from safetensors.torch import load_file

    full = load_file(str(biased_checkpoint / "model.safetensors"))
    model = load_model(Checkpoint.open(biased_checkpoint), torch.device("cpu"), torch.float32, shard=Shard(1, 2))
    attn = model.layers[1].self_attn
    q, k = full["model.layers.1.self_attn.q_proj.weight"], full["model.layers.1.self_attn.k_proj.weight"]
    assert torch.equal(attn.qkv_proj.weight[: q.shape[0] // 2], q[q.shape[0] // 2 :])
    assert torch.equal(attn.qkv_proj.weight[q.shape[0] // 2 : (q.shape[0] + k.shape[0]) // 2], k[k.shape[0] // 2 :])
    o = full["model.layers.1.self_attn.o_proj.weight"]
    assert torch.equal(attn.o_proj.weight, o[:, o.shape[1] // 2 :])
    assert not attn.o_proj.bias.any()
    embed = full["model.embed_tokens.weight"]
    assert torch.equal(model.embed_tokens.weight, embed[embed.shape[0] // 2 :])


def test_workers_exit_when_rank_zero_dies(biased_checkpoint):
    """Rank 0 killed outright (no close, no atexit): its worker notices the lost peer and exits by itself."""
    script = (
        "import os, signal, qwen3gen\n"
        f"llm = qwen3gen.load({str(biased_checkpoint)!r}, device='cpu', kv_memory='16MiB', tensor_parallel_size=2)\n"
        "llm.generate([1, 2, 3], max_new_tokens=2, temperature=0)\n"
        "print(llm.engine.parallel.processes[0].pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    worker = int(result.stdout.split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and running(worker):
        time.sleep(0.1)
    assert not running(worker)


def running(pid: int) -> bool:
    """Whether process pid runs (a zombie, exited but not yet reaped by its new parent, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_bench_runs_each_qwen3gen_row_again_over_two_ranks(biased_checkpoint, tmp_path):
    """`bench --tensor-parallel-size 2`: after each qwen3gen row, the same engine over two ranks, whose greedy tokens
    equal the one-rank row's (float32), with its speed against that row; random weights reach the ranks through a
    checkpoint folder bench writes, which loads back as the same tensors."""
    setup, rows = qwen3gen.bench.run_bench(
        str(biased_checkpoint), device="cpu", dtype="float32", prompt_tokens=6, new_tokens=6, reps=1,
        engines=("qwen3gen",), tensor_parallel_size=2,
    )  # fmt: skip
    assert [r.engine for r in rows] == ["qwen3gen", "qwen3gen tp=2"] and setup["tensor_parallel_size"] == 2
    assert rows[1].same_tokens == 6 and rows[1].decode_tokens_per_s > 0
    assert qwen3gen.bench.parallel_ratios(rows) == [
        f"qwen3gen tp=2: {rows[1].decode_tokens_per_s / rows[0].decode_tokens_per_s:.2f}x qwen3gen"
    ]
    model = qwen3gen.bench.random_model(Qwen3Config(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=96, tie_word_embeddings=False,
    ), torch.device("cpu"), torch.bfloat16)  # fmt: skip
    folder = qwen3gen.bench.write_checkpoint(model, tmp_path)
    loaded = qwen3gen.loaders.checkpoint.load_model(
        qwen3gen.loaders.checkpoint.Checkpoint.open(folder), torch.device("cpu"), torch.bfloat16
    )  # fmt: skip
    assert loaded.config == model.config
    for (name, ours), (_, theirs) in zip(loaded.checkpoint_tensors(), model.checkpoint_tensors(), strict=True):
        assert torch.equal(ours, theirs), name


def test_bench_refuses_tensor_parallel_rows_it_cannot_run(capsys):
    from qwen3gen.cli import main

    for extra in (["--throughput"], ["--quantize", "int8"]):
        assert main(["bench", "--device", "cpu", "--tensor-parallel-size", "2", *extra]) != 0
        err = capsys.readouterr().err
        assert "tensor" in err and "Traceback" not in err
