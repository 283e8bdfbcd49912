"""The CPU decode step's kernels (kernels/cpu.c, built by kernels/cpu.py) against the model's own PyTorch lines and the
paged attention's reference, and the 2 MiB-page weight block."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from decode_steps import assert_same_step, attention_config, attention_step

import qwen3gen
import qwen3gen.bench
import qwen3gen.loaders.quantize
from qwen3gen.attention import AttentionBackend, PagedBatch, choose_backend
from qwen3gen.kernels import cpu
from qwen3gen.model import RMSNorm, rotary_angles

CPU = torch.device("cpu")


def tiny_config(**overrides: object) -> qwen3gen.Qwen3Config:
    cfg = qwen3gen.Qwen3Config(
        vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=100, max_position_embeddings=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )  # fmt: skip
    return cfg.replace(**overrides)


def test_the_kernel_is_built_on_this_machine():
    """On x86-64 with AVX2 (this machine and CI) the kernel must build: a silent fallback would hide a broken build."""
    if cpu.cpu_supported():
        assert cpu.available(CPU), cpu.unavailable_reason()
    else:
        assert not cpu.available(CPU) and cpu.unavailable_reason()
    assert not cpu.available(torch.device("meta"))


requires_kernel = pytest.mark.skipif(not cpu.available(CPU), reason="no AVX2 here: test_the_kernel_is_built_on_this_machine says why")


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "norm", "swiglu+residual", "bias+residual", "int8", "int8+norm"])
@pytest.mark.parametrize("rows", [1, 3, 5, 9])
def test_matvec_matches_pytorch(case, dtype, rows):
    """residual + linear(input) for input x, RMSNorm(x), SwiGLU(x); int8 weights with per-row scales; for 1, 3, 5 and 9
    input rows of very different sizes (each row its own norm; 5 rows in groups of 3 and 2, 9 of 4, 3 and 2). K = 100 leaves a tail of 36
    after the 64-wide step (4 after the 32-wide one of several rows); N = 301 rows split unevenly between threads, and
    leave one weight row after the pairs that several input rows take."""
    torch.manual_seed(0)
    n, k = 301, 100
    weight = torch.randn(n, k, dtype=dtype) / k**0.5
    sizes = torch.linspace(0.5, 4.0, rows)[:, None]  # a norm shared between rows would show
    x = (torch.randn(1, rows, 2 * k if "swiglu" in case else k) * sizes).to(dtype)
    kwargs, inputs, scale = {}, x, None
    if "norm" in case:
        norm = RMSNorm(k, 1e-6).to(dtype)
        torch.nn.init.normal_(norm.weight, 1.0, 0.5)
        kwargs.update(norm_weight=norm.weight, eps=norm.eps)
        inputs = norm(x)
    if "swiglu" in case:
        inputs = F.silu(x[..., :k]) * x[..., k:]
        kwargs.update(swiglu=True)
    if "bias" in case:
        kwargs.update(bias=torch.randn(n, dtype=dtype))
    if "int8" in case:
        int8 = qwen3gen.loaders.quantize.Int8Linear(weight)
        weight, scale = int8.weight, int8.scales
        expected = F.linear(inputs.float(), weight.float() * scale.float()[:, None])
    else:
        expected = F.linear(inputs.float(), weight.float(), None if "bias" not in kwargs else kwargs["bias"].float())
    if "residual" in case:
        kwargs.update(residual=torch.randn(1, rows, n, dtype=dtype))
        expected = kwargs["residual"].float() + expected.to(dtype).float()
    out = cpu.matvec(
        x, weight, scale, kwargs.get("bias"), kwargs.get("norm_weight"), kwargs.get("eps", 0.0), kwargs.get("residual"),
        kwargs.get("swiglu", False),
    )  # fmt: skip
    assert out.dtype == dtype and out.shape == (1, rows, n)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.01)
    torch.testing.assert_close(out.float(), expected.to(dtype).float(), **tolerance)


@requires_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", ["qwen3", "qwen3-group5", "qwen2"])
def test_attention_kernels_match_the_model(shape, dtype):
    """new_token (q/k norm, rotation, pool writes) and decode_attention for three requests of 75, 17 and 4 slots over
    a shuffled paged pool whose other slots are NaN: the same output and pool as the reference lines."""
    cfg = attention_config(shape)
    assert_same_step(attention_step(cfg, dtype, cpu), attention_step(cfg, dtype, None), dtype)


def scattered_pool(lengths: list[int], kv_heads: int, dim: int, block_size: int, spare: int = 3) -> tuple:
    """(keys, values, block tables [rows, blocks] int32, seq_lens int32): each row's blocks in shuffled order over a
    pool with spare blocks no row holds; every slot no row holds is NaN and every table entry past a row's blocks -1
    (the kernel must read neither). The table is a view of a wider one: its rows lie apart."""
    torch.manual_seed(0)
    counts = [-(-n // block_size) for n in lengths]
    num_blocks = sum(counts) + spare
    k, v = torch.randn(num_blocks, kv_heads, block_size, dim) * 3, torch.randn(num_blocks, kv_heads, block_size, dim)
    order = torch.randperm(num_blocks).tolist()
    wide = torch.full((len(lengths), max(counts) + 5), -1, dtype=torch.int32)
    held = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for row, (n, count) in enumerate(zip(lengths, counts)):
        for j in range(count):
            wide[row, j] = order.pop()
        for slot in range(n):
            held[wide[row, slot // block_size], slot % block_size] = True
    for cache in (k, v):
        cache.masked_fill_(~held[:, None, :, None], float("nan"))
    return k, v, wide[:, : max(counts)], torch.tensor(lengths, dtype=torch.int32)


def gathered_attention(q, k_cache, v_cache, tables, seq_lens):  # noqa: ANN001, ANN201
    """The reference: each row's context gathered from the pool in order, then SDPA."""
    size, outs = k_cache.shape[2], []
    for row, n in enumerate(seq_lens.tolist()):
        j = torch.arange(n)
        blocks, offsets = tables[row].long()[j // size], j % size
        keys, values = k_cache[blocks, :, offsets].transpose(0, 1)[None], v_cache[blocks, :, offsets].transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(q[row : row + 1], keys, values, enable_gqa=True))
    return torch.cat(outs)


@requires_kernel
@pytest.mark.parametrize("isa", list(cpu.ISAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_over_rows_of_very_different_lengths(isa, dtype, monkeypatch):
    """Rows of 3001 slots (scores spread wide: softmax weights from 1 down to underflow), 1, exactly three blocks, and
    37, in one call over a NaN-poisoned pool through a strided block table: SDPA's numbers over each row's own
    context (bf16: the kernel's AVX-512 lines, against float32 SDPA on the same bf16 values); nothing past a row's
    length, nor in another row's blocks, is read. Each instruction set's library this CPU has (AVX-512's lines and
    AVX2's)."""
    if isa not in cpu.supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("QWEN3GEN_CPU_ISA", isa)
    lengths, block_size = [3001, 1, 3 * 16, 37], 16
    k, v, tables, seq_lens = scattered_pool(lengths, kv_heads=8, dim=64, block_size=block_size)
    assert tables.stride(0) != tables.shape[1]
    q = torch.randn(len(lengths), 16, 1, 64) * 3
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    out = cpu.decode_attention(q, k, v, tables, seq_lens)
    assert torch.isfinite(out).all()
    expected = gathered_attention(q.float(), k.float(), v.float(), tables, seq_lens)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)
    torch.testing.assert_close(out.float(), expected, **tolerance)
    for row in range(len(lengths)):  # each row alone, through its own table: the same numbers
        alone = cpu.decode_attention(q[row : row + 1], k, v, tables[row : row + 1], seq_lens[row : row + 1])
        torch.testing.assert_close(alone, out[row : row + 1], atol=0, rtol=0)


@requires_kernel
def test_the_kernels_refuse_what_would_reach_outside_their_tensors():
    """A slot outside the pool, a length past the block table or of 0, a used block id outside the pool, inputs of the
    wrong size, mixed types: an exception, never a write or read outside the tensors (nor a partial write)."""
    pool = torch.zeros(3, 2, 4, 32)  # 3 blocks of 4 slots
    qkv, cos, sin, weight = torch.zeros(2, 1, 256), torch.ones(2, 1, 1, 16), torch.zeros(2, 1, 1, 16), torch.ones(32)
    for slots in ([0, 12], [-1, 0]):
        k_cache, v_cache = pool.clone(), pool.clone()
        with pytest.raises(IndexError):
            cpu.new_token(qkv + 1, weight, weight, cos, sin, torch.tensor(slots), k_cache, v_cache, 4, 1e-6, True)
        assert not k_cache.any() and not v_cache.any()  # the good row was not written either
    with pytest.raises(ValueError):  # one slot for two rows
        cpu.new_token(qkv, weight, weight, cos, sin, torch.tensor([0]), pool, pool.clone(), 4, 1e-6, True)
    with pytest.raises(ValueError):  # one row's angles for two rows
        cpu.new_token(qkv, weight, weight, cos[:1], sin[:1], torch.tensor([0, 1]), pool, pool.clone(), 4, 1e-6, True)
    with pytest.raises(ValueError):  # q/k/v for 8 + 2 x 2 heads on a 4-head layer
        cpu.new_token(torch.zeros(2, 1, 384), weight, weight, cos, sin, torch.tensor([0, 1]), pool, pool.clone(), 4, 1e-6, True)
    with pytest.raises(TypeError):
        cpu.new_token(qkv, weight, weight, cos, sin, torch.tensor([0, 1]), pool.bfloat16(), pool.bfloat16(), 4, 1e-6, True)
    q, tables = torch.zeros(2, 4, 1, 32), torch.tensor([[0, 1], [2, -1]], dtype=torch.int32)
    assert torch.equal(cpu.decode_attention(q, pool, pool, tables, torch.tensor([8, 4], dtype=torch.int32)), q)  # -1 unused
    for lengths in ([8, 5], [0, 4], [9, 1]):  # row 1 reaches its -1; an empty row; past the table's 2 x 4 slots
        with pytest.raises(IndexError):
            cpu.decode_attention(q, pool, pool, tables, torch.tensor(lengths, dtype=torch.int32))
    with pytest.raises(IndexError):  # block 3 of 3
        cpu.decode_attention(q, pool, pool, torch.tensor([[0, 3], [2, 1]], dtype=torch.int32), torch.tensor([5, 4], dtype=torch.int32))
    with pytest.raises(ValueError):  # one length for two rows
        cpu.decode_attention(q, pool, pool, tables, torch.tensor([4], dtype=torch.int32))
    with pytest.raises(ValueError):  # head size 16 over a pool of 32
        cpu.decode_attention(torch.zeros(2, 4, 1, 16), pool, pool, tables, torch.tensor([4, 4], dtype=torch.int32))
    with pytest.raises(ValueError):
        cpu.matvec(torch.zeros(1, 1, 31), torch.zeros(5, 32), None, None, None, 0.0, None, False)
    with pytest.raises(TypeError):
        cpu.matvec(torch.zeros(1, 1, 32), torch.zeros(32, 5).t(), None, None, None, 0.0, None, False)
    with pytest.raises(ValueError, match="MATVEC_ROWS"):  # more rows than the kernel takes
        cpu.matvec(torch.zeros(1, cpu.MATVEC_ROWS + 1, 32), torch.zeros(5, 32), None, None, None, 0.0, None, False)
    with pytest.raises(ValueError, match="MATVEC_ROWS"):  # no rows
        cpu.matvec(torch.zeros(1, 0, 32), torch.zeros(5, 32), None, None, None, 0.0, None, False)
    with pytest.raises(ValueError):  # one row's residual for three rows
        cpu.matvec(torch.zeros(1, 3, 32), torch.zeros(5, 32), None, None, None, 0.0, torch.zeros(1, 1, 5), False)
    with pytest.raises(ValueError):  # rows along the first axis
        cpu.matvec(torch.zeros(3, 1, 32), torch.zeros(5, 32), None, None, None, 0.0, None, False)
    most = cpu.matvec(torch.ones(1, cpu.MATVEC_ROWS, 32), torch.ones(5, 32), None, None, None, 0.0, None, False)
    assert most.shape == (1, cpu.MATVEC_ROWS, 5) and torch.equal(most, torch.full_like(most, 32.0))


BLOCK = 4  # the model tests' pool: small blocks, so a dozen tokens cross several
TABLE = [5, 2, 7, 1]  # the request's blocks, out of order, in a pool of 8
TABLES = [TABLE, [3, 9, 11, 0], [10, 6, 4, 8]]  # three requests' blocks, in a pool of 12


def random_weights(variant: str, **shape: int) -> qwen3gen.Qwen3:
    """A tiny float32 model with norms and biases far from 1 and 0; untied, Qwen2 (q/k/v biases, no q/k norms) or
    int8 (every linear layer, and the tied head, quantized) as variant says."""
    overrides = {"untied": dict(tie_word_embeddings=False), "qwen2": dict(qk_norm=False, attention_bias=True)}
    model = qwen3gen.bench.random_model(tiny_config(**overrides.get(variant, {}), **shape), CPU, torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                torch.nn.init.normal_(param, 1.0, 0.5)
    if variant == "int8":
        qwen3gen.loaders.quantize.quantize(model, "int8")
    return model


def one_request(kernels, caches, positions: list[int], table: list[int] = TABLE) -> PagedBatch:  # noqa: ANN001
    """The PagedBatch of one request (blocks table) whose new tokens sit at positions (its last ones)."""
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in positions])
    return PagedBatch.of(
        AttentionBackend(kernels), caches, slots, [len(positions)], [positions[-1] + 1],
        torch.tensor([table], dtype=torch.int32), torch.float32,
    )  # fmt: skip


def decode_requests(kernels, caches, positions: list[int]) -> PagedBatch:  # noqa: ANN001
    """The PagedBatch of a decode step of len(positions) requests (blocks TABLES), request i's new token at positions[i]."""
    tables = TABLES[: len(positions)]
    slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for table, p in zip(tables, positions)])
    seq_lens = [p + 1 for p in positions]
    return PagedBatch.of(
        AttentionBackend(kernels), caches, slots, [1] * len(positions), seq_lens,
        torch.tensor(tables, dtype=torch.int32), torch.float32,
    )  # fmt: skip


@requires_kernel
@pytest.mark.parametrize("variant", ["qwen3", "int8", "qwen2"])
@pytest.mark.parametrize("positions", [[10], [10, 3, 14]], ids=["one-request", "three-requests"])
def test_a_decode_block_with_the_kernels_equals_the_reference(variant, positions):
    """Block.decode_one_token (the four products with norms, SwiGLU and residual adds inside; new_token;
    decode_attention) for one token at slot 10 of a request over 3 shuffled blocks, or one new token for each of
    three requests (the products' several-row path), against Block.forward's reference lines on an identical copy of
    the pool: the same output and pool, float32."""
    model = random_weights(variant)
    cfg, block = model.config, model.layers[0]
    torch.manual_seed(2)
    pool = torch.randn(2, 12, cfg.num_key_value_heads, BLOCK, cfg.head_dim)
    x = torch.randn(1, len(positions), cfg.hidden_size) * torch.linspace(0.5, 3.0, len(positions))[:, None]
    rope = rotary_angles(torch.tensor([positions]), cfg.head_dim, cfg.rope_theta, torch.float32)
    outputs = []
    for kernels in (cpu, None):
        caches = [(pool[0].clone(), pool[1].clone())]
        with torch.no_grad():
            outputs.append((block(x, rope, decode_requests(kernels, caches, positions)), *caches[0]))
    for ours, theirs in zip(*outputs):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.equal(outputs[0][1], pool[0])  # the new key went in


@requires_kernel
@pytest.mark.parametrize("variant", ["tied", "untied", "int8", "qwen2"])
@pytest.mark.parametrize("requests", [1, 3])
def test_decode_steps_with_the_kernels_equal_the_reference(variant, requests):
    """Prefills of 9 (5, 12) tokens into the pool, then three decode steps of one new token for each of 1 (3) requests
    through Qwen3.forward with the kernels (every block's decode_one_token, and the output head through matvec with
    the final norm inside: FUSED_HEAD; several rows at 3 requests) and without: the same logits, float32."""
    model = random_weights(variant)
    cfg = model.config
    shape = (12, cfg.num_key_value_heads, BLOCK, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers]
    lengths, generator = [9, 5, 12][:requests], torch.Generator().manual_seed(1)
    for length, table in zip(lengths, TABLES):
        prompt = torch.randint(0, cfg.vocab_size, (length,), generator=generator)
        with torch.no_grad():
            model(prompt, torch.arange(length), one_request(None, caches, list(range(length)), table))
    logits = []
    for kernels in (cpu, None):
        pool = [(k.clone(), v.clone()) for k, v in caches]
        steps = []
        for i, tokens in enumerate([[5, 17, 3], [17, 42, 99], [3, 150, 7]]):
            positions = [n + i for n in lengths]
            with torch.no_grad():
                steps.append(model(torch.tensor(tokens[:requests]), torch.tensor(positions), decode_requests(kernels, pool, positions)))
        logits.append(torch.cat(steps))
    assert logits[0].shape == (3 * requests, cfg.vocab_size)
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)


@requires_kernel
@pytest.mark.parametrize("variant", ["qwen3", "int8", "qwen2", "bf16", "int4-bf16"])
@pytest.mark.parametrize("positions", [[10], [10, 3, 14]], ids=["one-request", "three-requests"])
def test_every_block_in_one_call_equals_the_blocks_one_by_one(variant, positions, monkeypatch):
    """cpu.decode_blocks (every block's decode step in one C call) against the blocks' own decode_one_token one after
    another (the same C functions, called from Python): the same bits in the output and in every layer's pool, for
    float32, int8, Qwen2's biases and no q/k norms, bf16, and int4 blocks (Q4_K and Q4_0) under bf16 activations; and
    Qwen3.forward takes the one call in a decode step."""
    shape = dict(hidden_size=256, intermediate_size=256) if variant == "int4-bf16" else {}
    model = random_weights("qwen2" if variant == "qwen2" else "qwen3", **shape)
    if variant in ("bf16", "int4-bf16"):
        model = model.to(torch.bfloat16)
    if variant in ("int8", "int4-bf16"):
        qwen3gen.loaders.quantize.quantize(model, variant[:4])
    dtype, cfg = model.norm.weight.dtype, model.config
    torch.manual_seed(2)
    pool = torch.randn(len(model.layers), 2, 12, cfg.num_key_value_heads, BLOCK, cfg.head_dim).to(dtype)
    x = (torch.randn(1, len(positions), cfg.hidden_size) * torch.linspace(0.5, 3.0, len(positions))[:, None]).to(dtype)
    rope = rotary_angles(torch.tensor([positions]), cfg.head_dim, cfg.rope_theta, dtype)
    outputs = []
    for whole in (True, False):
        caches = [(k.clone(), v.clone()) for k, v in pool]
        batch = decode_requests(cpu, caches, positions)
        with torch.no_grad():
            if whole:
                out = cpu.decode_blocks(model.layers, x, rope, batch)
            else:
                out = x
                for block in model.layers:
                    out = block(out, rope, batch)
        outputs.append([out, *(t for cache in caches for t in cache)])
    for ours, theirs in zip(*outputs, strict=True):
        assert ours.dtype == dtype and torch.equal(ours, theirs)
    calls = []
    monkeypatch.setattr(cpu, "decode_blocks", lambda *args: calls.append(1))  # None: the blocks one by one
    with torch.no_grad():
        model(torch.tensor([5] * len(positions)), torch.tensor(positions), decode_requests(cpu, [(k.clone(), v.clone()) for k, v in pool], positions))
    assert calls == [1]


@requires_kernel
def test_every_block_in_one_call_refuses_slots_and_lengths_outside_the_pool():
    """A slot past the pool leaves every layer's pool as it was; a length past a row's blocks is refused too."""
    model = random_weights("qwen3")
    cfg = model.config
    pool = torch.randn(len(model.layers), 2, 12, cfg.num_key_value_heads, BLOCK, cfg.head_dim)
    x = torch.randn(1, 1, cfg.hidden_size)
    rope = rotary_angles(torch.tensor([[10]]), cfg.head_dim, cfg.rope_theta, torch.float32)
    caches = [(k.clone(), v.clone()) for k, v in pool]
    batch = decode_requests(cpu, caches, [10])
    with pytest.raises(IndexError, match="slots"):
        cpu.decode_blocks(model.layers, x, rope, replace(batch, slots=torch.tensor([12 * BLOCK])))
    assert all(torch.equal(ours, theirs) for cache, before in zip(caches, pool) for ours, theirs in zip(cache, before))
    with pytest.raises(IndexError, match="lengths"):
        cpu.decode_blocks(model.layers, x, rope, replace(batch, seq_lens=torch.tensor([4 * BLOCK + 1], dtype=torch.int32)))


@requires_kernel
def test_compiled_decode_uses_the_kernel_without_graph_breaks():
    """The kernels are custom ops: a compiled block calls them inside its one graph."""
    model = qwen3gen.bench.random_model(tiny_config(), CPU, torch.float32)
    cfg = model.config
    shape = (8, cfg.num_key_value_heads, BLOCK, cfg.head_dim)
    batch = one_request(cpu, [(torch.zeros(shape), torch.zeros(shape)) for _ in model.layers], [3])
    x, rope = torch.randn(1, 1, cfg.hidden_size), rotary_angles(torch.tensor([[3]]), cfg.head_dim, cfg.rope_theta, torch.float32)
    explanation = torch._dynamo.explain(model.layers[0])(x, rope, batch)
    assert explanation.graph_break_count == 0
    graph = str(explanation.graphs[0].graph)
    assert all(f"qwen3gen.cpu_{op}" in graph for op in ("matvec", "new_token", "decode_attention"))


def test_huge_page_weights_moves_every_tensor_and_keeps_ties():
    """Every parameter and buffer lands in the block with the same values; a tied embedding stays one Parameter; a
    second call does nothing."""
    model = qwen3gen.bench.random_model(tiny_config(), CPU, torch.bfloat16)
    qwen3gen.loaders.quantize.quantize(model, "int8")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    cpu.huge_page_weights(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name
    if hasattr(__import__("mmap"), "MADV_HUGEPAGE"):
        addresses = sorted(t.data_ptr() for t in after.values())
        assert all(address % 64 == 0 for address in addresses)
        assert addresses[-1] - addresses[0] < 2 * sum(t.numel() * t.element_size() for t in after.values())  # one block
    assert isinstance(model.embed_tokens.weight, torch.nn.Parameter)
    snapshot = [t.data_ptr() for t in model.state_dict().values()]
    cpu.huge_page_weights(model)
    assert [t.data_ptr() for t in model.state_dict().values()] == snapshot


def test_a_failed_build_leaves_the_pytorch_lines_and_no_file(tmp_path, monkeypatch):
    """A compiler that fails: the kernel is unavailable with the compiler's reason, the backend chosen for the CPU is
    the reference, the model runs its PyTorch lines, and nothing half-built is left in the cache."""
    monkeypatch.setenv("QWEN3GEN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    cpu._build.cache_clear()
    try:
        if cpu.cpu_supported():
            assert not cpu.available(CPU)
            assert "could not build the CPU kernel" in cpu.unavailable_reason()
        assert list(tmp_path.iterdir()) == []
        assert choose_backend(CPU).kernels is None
        model = qwen3gen.bench.random_model(tiny_config(), CPU, torch.float32)
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()
    finally:
        monkeypatch.undo()
        cpu._build.cache_clear()
    assert cpu.available(CPU) == (cpu.unavailable_reason() == "")
