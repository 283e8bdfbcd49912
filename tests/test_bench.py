"""`qwen3gen bench` on a tiny checkpoint: every row is filled, and the transformers copy is the same model."""

import json

import pytest
import torch
from checkpoints import TINY

import qwen3gen
from qwen3gen import cli
from qwen3gen.bench import (
    THROUGHPUT_TABLE_HEAD, format_throughput_row, format_throughput_setup, random_model, run_bench, run_throughput,
    to_json, transformers_model,
)
from qwen3gen.config import Qwen3Config


def test_bench_rows(tiny_checkpoint):
    setup, rows = run_bench(str(tiny_checkpoint), device="cpu", dtype="float32", prompt_tokens=8, new_tokens=6, batch=2, reps=1, engines=("transformers", "qwen3gen"))
    assert [r.engine for r in rows] == ["transformers", "qwen3gen"]
    assert rows[0].vs_transformers == 1.0 and rows[1].vs_transformers > 0
    assert rows[1].same_tokens == 6  # float32 greedy: the same tokens as transformers
    assert all(r.decode_tokens_per_s > 0 and r.bandwidth_gb_s > 0 and 0 < r.bandwidth_share for r in rows)
    assert setup["copy_bandwidth_gb_s"] > 0 and setup["batch"] == 2


def test_bench_command_json(tiny_checkpoint, capsys):
    code = cli.main(["bench", "--model", str(tiny_checkpoint), "--device", "cpu", "--prompt-tokens", "4", "--new-tokens", "4", "--reps", "1", "--engines", "qwen3gen", "--quantize", "int8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["rows"][0]["engine"] == "qwen3gen (int8)" and report["setup"]["dtype"] == "bfloat16"


def test_random_model_in_transformers_is_the_same_model():
    cfg = Qwen3Config(**{k: v for k, v in TINY.items() if k != "initializer_range"}, torch_dtype="float32")
    ours = random_model(cfg, torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 151643, (1, 7))
    with torch.inference_mode():
        torch.testing.assert_close(transformers_model(ours, None)(ids).logits, ours(ids), atol=1e-4, rtol=0)


def test_throughput_rows(tiny_checkpoint):
    seen = []
    setup, rows = run_throughput(
        str(tiny_checkpoint), device="cpu", dtype="float32", requests=6, min_prompt_tokens=4, max_prompt_tokens=24,
        min_output_tokens=2, max_output_tokens=12, engines=("qwen3gen", "transformers"), on_row=lambda s, r: seen.append(r),
    )  # fmt: skip
    assert [r.engine for r in rows] == ["transformers", "qwen3gen"] and seen == rows  # transformers first: the baseline
    hf, ours = rows
    assert setup["requests"] == 6 and 12 <= setup["total_output_tokens"] <= 72
    for row in rows:  # EOS ignored: every request produced exactly its length
        assert row.note is None and row.requests == 6
        assert row.output_tokens == setup["total_output_tokens"] and row.prompt_tokens == setup["total_prompt_tokens"]
        assert row.wall_s > 0 and row.total_tokens_per_s > row.output_tokens_per_s > 0 and row.kv_pool_mib > 0
    assert hf.vs_transformers == 1.0 and ours.vs_transformers == ours.output_tokens_per_s / hf.output_tokens_per_s
    table = "\n".join([format_throughput_setup(setup), THROUGHPUT_TABLE_HEAD, *map(format_throughput_row, rows)])
    assert "| qwen3gen |" in table and json.loads(to_json(setup, rows))["rows"][1]["output_tokens"] == ours.output_tokens


def test_throughput_command_prints_its_table(tiny_checkpoint, capsys):
    code = cli.main([
        "bench", "--throughput", "--model", str(tiny_checkpoint), "--device", "cpu", "--requests", "3",
        "--min-prompt-tokens", "4", "--max-prompt-tokens", "9", "--min-output-tokens", "2", "--max-output-tokens", "5",
        "--engines", "qwen3gen", "--kv-memory", "8MiB",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "| qwen3gen |" in out and "output tok/s" in out
    assert cli.main(["bench", "--throughput", "--engines", "transformers-static"]) == 1


def test_bench_counts_below_one_are_refused(capsys):
    for flag in ("--reps", "--new-tokens", "--batch", "--prompt-tokens", "--requests"):
        assert cli.main(["bench", flag, "0"]) == 1
        err = capsys.readouterr().err
        assert f"{flag} must be at least 1" in err and "Traceback" not in err


def test_serve_bench_gets_every_token_over_http(tiny_checkpoint):
    from qwen3gen.serve_bench import SERVE_TABLE_HEAD, format_serve_row, run_serve_bench

    setup, rows = run_serve_bench(str(tiny_checkpoint), device="cpu", dtype="float32", requests=3)
    assert [(r.workload, r.concurrency) for r in rows] == [
        ("throughput", 64), ("latency", 1), ("latency", 2), ("latency", 4), ("latency, 16-token prompts", 1)
    ]
    for row in rows:
        assert row.requests == 3 and row.http_tokens_per_s > 0 and row.offline_tokens_per_s > 0
        assert all(v >= 0 for v in row.ttft_ms + row.itl_ms)
        assert format_serve_row(row).count("|") == SERVE_TABLE_HEAD.splitlines()[0].count("|")
    assert [r.output_tokens for r in rows[1:]] == [3 * 16] * 4  # every token of every request came back
    with pytest.raises(qwen3gen.InvalidParameterError, match="--tokenizer"):
        run_serve_bench(None, device="cpu")


@pytest.fixture(scope="module")
def tiny_q8_gguf(tiny_checkpoint, tmp_path_factory):
    """The tiny model as a GGUF file of Q8_0 blocks (kept as blocks on a CPU) with the real tokenizer's metadata."""
    from gguf import GGMLQuantizationType
    from test_gguf import write_gguf

    return write_gguf(tmp_path_factory.mktemp("bench-gguf") / "tiny-q8_0.gguf", tiny_checkpoint, GGMLQuantizationType.Q8_0)


def test_gguf_bench_measures_qwen3gen_in_its_own_process(tiny_q8_gguf, monkeypatch):
    """Every figure of the row filled; llama.cpp, when llama-cpp-python is missing, is a row that says how to get it."""
    import importlib.util

    from qwen3gen.gguf_bench import run_gguf_bench

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    setup, rows = run_gguf_bench(str(tiny_q8_gguf), prompt_tokens=6, new_tokens=5, prefill_tokens=20, reps=1)
    missing, ours = rows
    assert missing.engine == "llama.cpp" and "pip install llama-cpp-python" in missing.error
    assert ours.engine == "qwen3gen" and ours.error is None and len(ours.tokens) == 5
    assert ours.decode_tokens_per_s > 0 and ours.prefill_tokens_per_s > 0 and ours.peak_rss_gb > 0
    assert 0 < ours.load_s < ours.ready_s
    assert ours.decode_vs_llama_cpp is None and setup["file_gb"] > 0 and setup["threads"] >= 1


def test_gguf_bench_command_prints_its_table_and_refuses_a_bad_file(tiny_q8_gguf, tmp_path, capsys):
    code = cli.main(["bench", "--model", str(tiny_q8_gguf), "--engines", "qwen3gen", "--prompt-tokens", "4", "--new-tokens", "3", "--prefill-tokens", "8", "--reps", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "| engine | decode tok/s | x llama.cpp | prefill tok/s" in out
    assert out.strip().splitlines()[-1].startswith("| qwen3gen | ")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(tiny_q8_gguf.read_bytes()[:4096])  # cut short: refused before any engine starts
    code = cli.main(["bench", "--model", str(broken), "--engines", "qwen3gen", "--new-tokens", "3", "--reps", "1"])
    captured = capsys.readouterr()
    assert code != 0 and "is truncated or corrupt" in captured.err and "Traceback" not in captured.err + captured.out


def test_gguf_bench_reports_a_crashing_engine_as_its_row(tiny_q8_gguf, monkeypatch):
    """An engine's process that dies (here: killed by a signal as it starts) is its row's message, not the bench's end."""
    from qwen3gen import gguf_bench

    real_run = gguf_bench.subprocess.run
    monkeypatch.setattr(gguf_bench.subprocess, "run", lambda command, **kw: real_run(["sh", "-c", "kill -SEGV $$"], **kw))
    _, (row,) = gguf_bench.run_gguf_bench(str(tiny_q8_gguf), engines=("qwen3gen",), new_tokens=2, reps=1)
    assert row.error == "crashed (SIGSEGV)"


def test_gguf_bench_against_llama_cpp(tiny_q8_gguf):
    """Both engines on the same file: the same greedy tokens (float arithmetic on both sides of a tiny random model,
    so only the first few are asserted) and the ratios against llama.cpp's row."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional benchmark dependency")
    from qwen3gen.gguf_bench import run_gguf_bench

    _, (theirs, ours) = run_gguf_bench(str(tiny_q8_gguf), prompt_tokens=6, new_tokens=5, prefill_tokens=20, reps=1)
    assert theirs.error is None and ours.error is None, (theirs.error, ours.error)
    assert ours.decode_vs_llama_cpp > 0 and ours.prefill_vs_llama_cpp > 0 and ours.same_tokens >= 1
