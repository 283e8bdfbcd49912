"""The CUDA decode kernels (kernels/gpu.py), run on CPU tensors through Triton's interpreter (conftest sets
TRITON_INTERPRET=1), against the model's own PyTorch lines over a paged pool."""

import itertools
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from decode_steps import BLOCK_SIZE, assert_same_step, attention_config, attention_step, paged_pool

import qwen3gen
import qwen3gen.bench
import qwen3gen.loaders.quantize
from qwen3gen.attention import AttentionBackend, PagedBatch
from qwen3gen.kernels import gpu
from qwen3gen.model import rotary_angles

# A recorded step's padding tokens attend no one, so their rows carry whatever the attention's output buffer held;
# the interpreter's numpy warns where the norm squares such a row (rows no one reads).
PADDING_ROWS = pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered in multiply:RuntimeWarning")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["qwen3", "qwen3-group5", "qwen2"])
def test_new_token_kernel_matches_the_model(shape, dtype):
    """Attention with the new_token kernel (q/k norm, rotation, writes to each row's pool slot) and decode_attention
    (three rows of 75, 17 and 4 slots over shuffled pool blocks) equals the model's lines (the kernel rounds where the
    eager lines round, but computes the rotation in float32)."""
    assert gpu.triton is not None, "the kernel tests need triton (pip install -e '.[test]')"
    cfg = attention_config(shape)
    assert_same_step(attention_step(cfg, dtype, gpu), attention_step(cfg, dtype, None), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [BLOCK_SIZE, 12])
def test_decode_step_attention_over_contexts_of_any_length(block_size, dtype):
    """decode_step_attention (the new token's writes, then attention) for rows of 600 slots (past the old kernel's
    512), 1, two full blocks, 45 and 0 (a padding row: zeros), in one launch, their blocks shuffled over a pool whose
    every slot outside the contexts is NaN, and so is each row's last slot until the kernel writes its new key and
    value there: each row sees exactly its own slots, the new one included. Block size 12: the kernel's 64-slot tiles
    gather from blocks of any size. (No q/k norms and no rotation here: the kernel's attention alone.)"""
    cfg = attention_config("qwen3-group5")
    heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    lengths = [600, 1, 2 * block_size, 45, 0]
    k_cache, v_cache, tables, contexts = scattered_pool(cfg, lengths, block_size, dtype)
    rows = len(lengths)
    slots = [int(tables[r, (n - 1) // block_size]) * block_size + (n - 1) % block_size if n else 0 for r, n in enumerate(lengths)]
    new = torch.zeros(2, rows, kv_heads, dim, dtype=dtype)  # each row's new key and value (zeros for padding)
    for r, slot in enumerate(slots[:-1]):
        for cache, values in zip((k_cache, v_cache), new):
            values[r] = cache[slot // block_size, :, slot % block_size]
            cache[slot // block_size, :, slot % block_size] = float("nan")
    q = torch.randn(rows, heads, dim, dtype=dtype)
    qkv = torch.cat([q.flatten(1), new[0].flatten(1), new[1].flatten(1)], dim=1)[:, None]
    cos, sin = torch.ones(rows, 1, 1, dim // 2, dtype=dtype), torch.zeros(rows, 1, 1, dim // 2, dtype=dtype)
    out = gpu.decode_step_attention(
        qkv, qkv, qkv, cos, sin, torch.tensor(slots), k_cache, v_cache, tables, torch.tensor(lengths, dtype=torch.int32),
        heads, 0.0, False,
    )  # fmt: skip
    assert torch.isfinite(out).all() and torch.equal(out[-1], torch.zeros_like(out[-1]))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)
    for row, (keys, values) in enumerate(contexts[:-1]):
        expected = F.scaled_dot_product_attention(q[row][None, :, None].double(), keys, values, enable_gqa=True)
        torch.testing.assert_close(out[row : row + 1].double(), expected, **tolerance)


def scattered_pool(cfg, lengths: list[int], block_size: int, dtype: torch.dtype) -> tuple:
    """(keys, values, block tables, contexts): requests of `lengths` slots, their blocks shuffled over a pool whose
    every slot outside them is NaN; contexts: each request's keys and values [1, kv_heads, n, dim] in float64."""
    torch.manual_seed(2)
    held = [-(-n // block_size) for n in lengths]
    order = (torch.randperm(sum(held)) + 1).tolist()  # block 0 unused, as the engine's scratch block
    tables = torch.zeros(len(lengths), max(held), dtype=torch.int32)
    shape = (sum(held) + 1, cfg.num_key_value_heads, block_size, cfg.head_dim)
    k_cache, v_cache = torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)
    contexts = []
    for row, n in enumerate(lengths):
        tables[row, : held[row]] = torch.tensor(order[: held[row]], dtype=torch.int32)
        del order[: held[row]]
        j = torch.arange(n)
        at = tables[row].long()[j // block_size], slice(None), j % block_size
        k_cache[at] = torch.randn(n, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype)
        v_cache[at] = torch.randn(n, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype)
        contexts.append([cache[at].transpose(0, 1)[None].double() for cache in (k_cache, v_cache)])
    return k_cache, v_cache, tables, contexts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "block_size"), [("qwen3", BLOCK_SIZE), ("qwen3-group5", 12)])
def test_paged_attention_over_a_mixed_step(shape, block_size, dtype):
    """paged_attention takes a whole prompt, a chunk after 470 slots of context (three query tiles, the last part
    full), decodes (their own programs) and a 3-token chunk, and spare entries of -1 (a recorded step's padding): each
    request's tokens attend causally over exactly their own slots of a NaN-poisoned pool, as SDPA does."""
    cfg = attention_config(shape)
    seq_lens, query_lens = [75, 600, 17, 1, 45], [75, 130, 1, 1, 3]
    k_cache, v_cache, tables, contexts = scattered_pool(cfg, seq_lens, block_size, dtype)
    q = torch.randn(sum(query_lens), cfg.num_attention_heads, cfg.head_dim, dtype=dtype)
    starts = [0, *itertools.accumulate(query_lens)]
    queries = gpu.tile_queries(cfg.num_attention_heads, cfg.num_key_value_heads)
    requests, firsts, singles = gpu.query_tiles(query_lens, queries)
    assert singles == [2, 3]
    tiles = torch.tensor([requests + [-1] * 3, firsts + [0] * 3], dtype=torch.int32)
    lens = torch.tensor(starts, dtype=torch.int32), torch.tensor(seq_lens, dtype=torch.int32)
    out = gpu.paged_attention(q, k_cache, v_cache, tables, *lens, tiles, torch.tensor(singles + [-1]))
    assert torch.isfinite(out).all()
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)
    for r, (keys, values) in enumerate(contexts):
        own = q[starts[r] : starts[r + 1]].transpose(0, 1)[None].double()  # [1, heads, n, dim]
        position = torch.arange(seq_lens[r] - query_lens[r], seq_lens[r])
        mask = torch.arange(seq_lens[r])[None, :] <= position[:, None]
        expected = F.scaled_dot_product_attention(own, keys, values, attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out[starts[r] : starts[r + 1]].double(), expected[0].transpose(0, 1), **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain", "norm", "swiglu+residual", "bias+residual", "int8"])
def test_matvec_matches_pytorch(case, dtype):
    """residual + linear(input) for input x, RMSNorm(x), SwiGLU(x); int8 weights with per-row scales. K = 96 runs
    the kernel's loop over 64-column steps twice, the second half-empty; N = 30 leaves the last 4-row program
    part empty."""
    torch.manual_seed(0)
    n, k = 30, 96
    weight = torch.randn(n, k, dtype=dtype) / k**0.5
    x = torch.randn(1, 1, 2 * k if "swiglu" in case else k, dtype=dtype)
    kwargs, inputs, scale = {}, x, None
    if case == "norm":
        norm = qwen3gen.model.RMSNorm(k, 1e-6).to(dtype)
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        kwargs.update(norm_weight=norm.weight, eps=norm.eps)
        inputs = norm(x)
    if "swiglu" in case:
        inputs = torch.nn.functional.silu(x[..., :k]) * x[..., k:]
        kwargs.update(swiglu=True)
    if "bias" in case:
        kwargs.update(bias=torch.randn(n, dtype=dtype))
    if "residual" in case:
        kwargs.update(residual=torch.randn(1, 1, n, dtype=dtype))
    if case == "int8":
        int8 = qwen3gen.loaders.quantize.Int8Linear(weight)
        weight, scale = int8.weight, int8.scales
        expected = int8(x) if dtype == torch.float32 else torch.nn.functional.linear(x.float(), weight.float() * scale.float()[:, None])
    else:
        expected = torch.nn.functional.linear(inputs, weight, kwargs.get("bias"))
    if "residual" in case:
        expected = kwargs["residual"] + expected
    out = gpu.matvec(
        x, weight, scale, kwargs.get("bias"), kwargs.get("norm_weight"), kwargs.get("eps", 0.0), kwargs.get("residual"),
        kwargs.get("swiglu", False),
    )  # fmt: skip
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.02)
    torch.testing.assert_close(out.float(), expected.float(), **tolerance)


@pytest.mark.parametrize(
    ("dtype", "weight_dtype"), [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32)]
)
def test_rms_norm_kernel_matches_the_model(dtype, weight_dtype):
    """gpu.rms_norm equals model.rms_norm over rows of 96 (a padded, masked block of 128), any leading shape, and a
    strided input; a float32 weight on bf16 rows gives float32, as PyTorch's promotion does."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 96, dtype=dtype) * 3
    weight = torch.randn(96, dtype=weight_dtype)
    for rows in (x, x[:, ::2], x[:1, :1]):
        expected = qwen3gen.model.rms_norm(rows, weight, 1e-6)
        out = gpu.rms_norm(rows, weight, 1e-6)
        assert out.dtype == expected.dtype and out.shape == expected.shape
        # Triton's interpreter rounds to bf16 by truncation: two roundings, up to two steps of bf16 apart.
        tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=2**-6)
        torch.testing.assert_close(out, expected, **tolerance)


def test_rotary_table_holds_the_computed_angles():
    """The recorded steps' table lookup gives exactly what rotary_angles computes for the same positions."""
    cfg = qwen3gen.preset("0.6B")
    table = qwen3gen.model.rotary_table(cfg, 4096, torch.device("cpu"), torch.bfloat16)
    positions = torch.tensor([[0, 1, 17, 1000, 4095, 3]])
    cos, sin = rotary_angles(positions, cfg.head_dim, cfg.rope_theta, torch.bfloat16)
    looked_up = table[positions]
    assert torch.equal(looked_up[:, :, 0], cos) and torch.equal(looked_up[:, :, 1], sin)


@pytest.mark.parametrize("quantized", [False, True])
def test_block_decodes_one_token_with_the_kernels(quantized):
    """Block.decode_one_token (norms, SwiGLU and residual adds inside the products, new_token and decode_attention
    over the pool) equals Block.forward's lines, for one request with 20 slots of context (two pool blocks), on
    identical copies of the pool: the same output, and the same new key and value at the request's slot."""
    cfg = qwen3gen.Qwen3Config(
        vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=96, max_position_embeddings=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = qwen3gen.bench.random_model(cfg, torch.device("cpu"), torch.float32)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.normal_(param, 1.0, 0.5)
    if quantized:
        qwen3gen.loaders.quantize.quantize(model, "int8")
    block = model.layers[0]
    k_cache, v_cache, tables, seq_lens = paged_pool(cfg, torch.float32, [20], poison=False)
    position = seq_lens.long() - 1
    slots = tables[0, position // BLOCK_SIZE].long() * BLOCK_SIZE + position % BLOCK_SIZE
    rope = rotary_angles(position[None], cfg.head_dim, cfg.rope_theta, torch.float32)
    x = torch.randn(1, 1, cfg.hidden_size)
    outs, pools = [], []
    for kernels in (None, gpu):  # the reference: the PyTorch lines
        pool = (k_cache.clone(), v_cache.clone())
        batch = PagedBatch.of(AttentionBackend(kernels), [pool], slots, [1], [20], tables, torch.float32)
        with torch.no_grad():
            outs.append(block(x, rope, batch))
        pools.append(pool)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
    for ours, theirs in zip(pools[1], pools[0]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@PADDING_ROWS
def test_the_cuda_engine_path_on_cpu(tiny_llm, monkeypatch):
    """The engine's CUDA path on CPU tensors (Triton's interpreter; runner.RecordedStep runs each recorded step again
    in place of a graph replay), overlapped steps included: prompts chunked under a 40-token budget beside decodes,
    all through paged_attention in steps padded to PREFILL_SIZES, decodes in the decode graphs, a prompt whose first
    blocks are cached, a request scoring its prompt (steps run as they come, the same kernels): every request's greedy
    tokens equal the reference engine's, the prompt's log-probabilities too, and the pool ends as it began."""
    monkeypatch.setattr(gpu, "available", lambda device: True)
    engine = qwen3gen.Engine(
        tiny_llm.model, tiny_llm.tokenizer, kv_memory="16MiB", max_running=4, max_batched_tokens=40, overlap=True
    )  # fmt: skip
    assert engine.backend.kernels is gpu and engine.runner.prefill_sizes == [16, 32, 40]
    monkeypatch.setattr(engine.runner, "use_graphs", True)
    system = "You are a careful assistant who answers in one short sentence, and thinks before answering. " * 2
    texts = [system + "What is 2+2?", "Hi", "Name a colour.", system + "Name a prime number.", "Why is the sky blue?"]
    prompts = [tiny_llm.tokenizer.encode(t) for t in texts]
    lengths = [12, 9, 15, 10, 8]
    reference = tiny_llm.generate(prompts, max_new_tokens=15, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids[:n] for o, n in zip(reference, lengths)]
    free = engine.blocks.num_free
    params = [qwen3gen.SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    # A request scoring its prompt: its steps run as they come, not recorded.
    params[2] = qwen3gen.SamplingParams(max_new_tokens=lengths[2], ignore_eos=True, prompt_logprobs=1)
    scoring = qwen3gen.SamplingParams(max_new_tokens=1, prompt_logprobs=1)
    scored = tiny_llm.generate(prompts[2], params=scoring).prompt_logprobs
    ids = [engine.add_request(p, s) for p, s in zip(prompts[:3], params)]
    tokens: dict[str, list[int]] = {}
    for step in range(200):
        if step == 3:
            ids += [engine.add_request(p, s) for p, s in zip(prompts[3:], params[3:])]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.prompt_logprobs is not None:
                prompt_scores = out.prompt_logprobs
        if step > 3 and not engine.has_unfinished():
            break
    assert [tokens[i] for i in ids] == expected
    for ours, theirs in zip(prompt_scores[1:], scored[1:], strict=True):
        assert ours[0] == theirs[0] and abs(ours[1] - theirs[1]) < 1e-4
    assert engine.stats()["prefix_cache_hit_tokens"] > 0
    assert {16, 40} <= set(engine.runner.prefill_graphs) and engine.runner.graphs  # padded steps, and full ones
    assert engine.blocks.num_free == free


@PADDING_ROWS
def test_warm_up_records_every_step_graph(tiny_llm, monkeypatch):
    """Engine.warm_up records the graph of every decode batch size and prefill token count (largest first, as they
    share one memory pool), and steps after it replay them: the same greedy tokens as the reference engine."""
    monkeypatch.setattr(gpu, "available", lambda device: True)
    engine = qwen3gen.Engine(tiny_llm.model, kv_memory="4MiB", max_running=2, max_batched_tokens=20, overlap=True)
    monkeypatch.setattr(engine.runner, "use_graphs", True)
    engine.warm_up()
    assert set(engine.runner.graphs) == {1, 2} and set(engine.runner.prefill_graphs) == {16, 20}
    prompt = tiny_llm.tokenizer.encode("Why is the sky blue? Explain it to a child in one sentence, please.")
    expected = tiny_llm.generate(prompt, max_new_tokens=6, temperature=0.0, ignore_eos=True).token_ids
    request = engine.add_request(prompt, qwen3gen.SamplingParams(max_new_tokens=6, ignore_eos=True))
    tokens = []
    for _ in range(20):
        tokens += [t for out in engine.step() if out.request_id == request for t in out.new_token_ids]
    assert tokens == expected


@PADDING_ROWS
def test_decode_graphs_feed_sampled_and_penalised_tokens(tiny_llm, monkeypatch):
    """A decode graph leaves its greedy tokens in the buffer the next step reads; rows that draw change them there,
    and a batch with penalised rows takes its greedy tokens again from the changed logits: greedy and seeded sampled
    requests, then greedy and penalised ones, through the recorded decode steps (overlapped) get the tokens each gets
    through the reference lines."""
    monkeypatch.setattr(gpu, "available", lambda device: True)
    greedy = qwen3gen.SamplingParams(max_new_tokens=12, ignore_eos=True)
    drawn = [greedy, replace(greedy, temperature=1.0, seed=3), replace(greedy, temperature=0.7, top_k=20, seed=5)]
    penalised = [greedy, replace(greedy, repetition_penalty=1.5), replace(greedy, frequency_penalty=1.0)]
    prompts = [tiny_llm.tokenizer.encode(t) for t in ["Hi", "Name a colour.", "Count to three."]]

    def run(params: list[qwen3gen.SamplingParams], kernels: bool) -> list[list[int]]:
        engine = qwen3gen.Engine(tiny_llm.model, kv_memory="4MiB", max_running=4, kernels=kernels, overlap=kernels)
        if kernels:
            monkeypatch.setattr(engine.runner, "use_graphs", True)
        ids = [engine.add_request(p, s) for p, s in zip(prompts, params)]
        tokens: dict[str, list[int]] = {i: [] for i in ids}
        for _ in range(40):
            for out in engine.step():
                tokens[out.request_id] += out.new_token_ids
            if not engine.has_unfinished():
                break
        if kernels:
            assert engine.runner.graphs  # the decodes were recorded steps
        return [tokens[i] for i in ids]

    for params in (drawn, penalised):
        expected = run(params, kernels=False)
        assert run(params, kernels=True) == expected
        assert len({tuple(t) for t in expected}) == 3 and all(len(t) == 12 for t in expected)
