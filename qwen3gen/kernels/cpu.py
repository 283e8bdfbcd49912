"""The CPU decode step's kernels (cpu.c), built on first use with the machine's C compiler.

A decode step reads every weight once, so on a CPU it costs what the products' reads cost, plus whatever the small ops
around them cost. PyTorch's bf16 and int8 products read the weights well below the memory's speed on an AVX2 machine
without bf16 instructions, and their time grows with the rows (they are bound by the conversion arithmetic there);
inductor's generated reductions did no better (BENCHMARKS.md). cpu.c has the contracts of gpu.py's CUDA kernels:
- `matvec` streams each weight row once with AVX2 for up to MATVEC_ROWS input rows (one new token per request), with
  what surrounds the product inside: the RMSNorm before it, SwiGLU before the down product, the residual add after it;
- `block_matvec` is matvec for GGML's block formats (GGUF files, int4), a layer's parts of different formats in one
  call; on AVX-512, a bf16 input row meets the blocks as 16-bit integers (VNNI's vpdpwssd where the CPU has it);
- `new_token` (q/k norm, rotation, writes to the paged KV pool) and `decode_attention` (one new token per row over
  its blocks of the pool) stand for some twenty small PyTorch ops a layer, each a few microseconds of dispatch here;
- `decode_blocks` runs every decoder layer of a decode step (the four products, new_token, decode_attention) in one C
  call, where calling each from Python cost about a fifth of a small model's step.
Weights are also moved into memory advised for 2 MiB pages (`huge_page_weights`), which the reads need to come near the
memory's speed: with 4 KiB pages every 4 KiB of weights costs a page-table walk.

The library is compiled once per source version into the user's cache (QWEN3GEN_CACHE, else ~/.cache/qwen3gen) and
loaded with ctypes; its OpenMP threads are PyTorch's own (the same libgomp). Where there is no x86-64 CPU with AVX2,
or no C compiler, `available` is False and the model keeps its PyTorch lines; `unavailable_reason` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).with_name("cpu.c")
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC"]
# The instruction sets cpu.c is built for, best first, and their compiler flags: the library of the best one this CPU
# has is loaded (QWEN3GEN_CPU_ISA names another). cpu.c's block formats run LANES-wide vectors of the set it is built for.
ISAS = {
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
}
TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}  # cpu.c's enum
# GGML's block formats cpu.c multiplies: GGML's type number -> (name, cpu.c's code (its second enum), weights a block,
# bytes a block).
BLOCK_FORMATS = {
    8: ("Q8_0", 4, 32, 34), 2: ("Q4_0", 5, 32, 18), 6: ("Q5_0", 6, 32, 22),
    12: ("Q4_K", 7, 256, 144), 13: ("Q5_K", 8, 256, 176), 14: ("Q6_K", 9, 256, 210),
}  # fmt: skip
HUGE_PAGE = 2 << 20
PAGED_PREFILL = False  # prefill steps run the reference lines (SDPA), compute-bound on a CPU anyway
FUSED_HEAD = True  # the output head (sampled rows only) is one more weight stream: matvec, with the final norm inside
# matvec's most input rows. Each added row costs matvec the FMAs of one more pass (weights read once): the 0.6B layer's
# four products took 0.8 / 3.5 / 9.4 / 18 ms at 1 / 8 / 16 / 32 bf16 rows, F.linear 2.0 / 13 / 45 / 81 (its bf16 product
# converts per row, never caught up through 128); float32 F.linear (a real GEMM) came level only near 64 (28 vs 30 ms).
MATVEC_ROWS = 32


def cache_dir() -> Path:
    return Path(os.environ.get("QWEN3GEN_CACHE") or Path.home() / ".cache" / "qwen3gen")


@functools.cache
def supported_isas() -> tuple[str, ...]:
    """The instruction sets of ISAS this CPU runs, best first: x86-64 with AVX2 (PyTorch's own AVX2 kernels imply FMA
    and F16C too), AVX-512 (F, BW, VL, DQ) where PyTorch finds it, and its VNNI extension where Linux lists it. Asked
    at every kernel call (through isa()), so found once."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    found = {"AVX512": ("avx512", "avx2"), "AVX2": ("avx2",)}.get(torch.backends.cpu.get_cpu_capability(), ())
    return (("avx512vnni",) if "avx512" in found and "avx512_vnni" in _cpu_flags() else ()) + found


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (none known elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def cpu_supported() -> bool:
    return bool(supported_isas())


def isa() -> str:
    """The instruction set whose library the kernels call: QWEN3GEN_CPU_ISA's, else the best this CPU has."""
    return os.environ.get("QWEN3GEN_CPU_ISA") or _best_isa()


def _library() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded library of isa(), "") or (None, why not)."""
    return _build(isa())


@functools.cache
def _best_isa() -> str:
    return next(iter(supported_isas()), "avx2")


@functools.cache
def _build(name: str) -> tuple[ctypes.CDLL | None, str]:
    if name not in ISAS:
        return None, f"QWEN3GEN_CPU_ISA is {name!r}, not one of {', '.join(ISAS)}"
    if name not in supported_isas():
        capability = torch.backends.cpu.get_cpu_capability()
        return None, f"the CPU kernel for {name} needs an x86-64 CPU with it (this is {platform.machine()}, {capability})"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc or gcc, or $CC) to build the CPU kernel"
    source, flags = SOURCE.read_bytes(), FLAGS + ISAS[name]
    path = cache_dir() / f"cpu-{name}-{hashlib.sha256(source + ' '.join(flags).encode()).hexdigest()[:16]}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Built beside its final name and renamed into place: another process never loads a half-written library.
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            built = Path(tmp) / path.name
            result = subprocess.run([compiler, *flags, "-o", str(built), str(SOURCE)], capture_output=True, text=True)
            if result.returncode != 0:
                return None, f"{compiler} could not build the CPU kernel: {result.stderr.strip()[-500:]}"
            os.replace(built, path)
    try:
        library = ctypes.CDLL(str(path))
    except OSError as err:  # a library from another machine, or a damaged file, in a shared cache
        return None, f"could not load the CPU kernel {path}: {err}"
    library.qwen3gen_matvec.restype = ctypes.c_int
    library.qwen3gen_matvec.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_long,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_int,
    ]  # fmt: skip
    library.qwen3gen_block_matvec.restype = ctypes.c_int
    library.qwen3gen_block_matvec.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int),
        ctypes.POINTER(ctypes.c_long), ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
        ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_long, ctypes.c_int,
    ]  # fmt: skip
    library.qwen3gen_new_token.restype = ctypes.c_int
    library.qwen3gen_new_token.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
        ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
    ]  # fmt: skip
    library.qwen3gen_dequantize.restype = ctypes.c_int
    library.qwen3gen_dequantize.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_int, ctypes.c_int
    ]  # fmt: skip
    library.qwen3gen_decode_attention.restype = ctypes.c_int
    library.qwen3gen_decode_attention.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
        ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_long,
        ctypes.c_long, ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    library.qwen3gen_decode_layers.restype = ctypes.c_int
    library.qwen3gen_decode_layers.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_Layer), ctypes.c_int, ctypes.POINTER(_DecodeStep), ctypes.c_int
    ]  # fmt: skip
    return library, ""


class _Product(ctypes.Structure):  # cpu.c's struct product
    _fields_ = [
        ("weight", ctypes.c_void_p), ("weight_type", ctypes.c_int), ("scale", ctypes.c_void_p),
        ("scale_type", ctypes.c_int), ("parts", ctypes.POINTER(ctypes.c_void_p)), ("types", ctypes.POINTER(ctypes.c_int)),
        ("part_rows", ctypes.POINTER(ctypes.c_long)), ("count", ctypes.c_int), ("bias", ctypes.c_void_p),
        ("bias_type", ctypes.c_int), ("n", ctypes.c_long), ("k", ctypes.c_long),
    ]  # fmt: skip


class _Layer(ctypes.Structure):  # cpu.c's struct layer
    _fields_ = [
        ("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("q_norm", ctypes.c_void_p),
        ("k_norm", ctypes.c_void_p), ("eps", ctypes.c_float), ("qk_eps", ctypes.c_float), ("qkv", _Product),
        ("o", _Product), ("gate_up", _Product), ("down", _Product), ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
    ]  # fmt: skip


class _DecodeStep(ctypes.Structure):  # cpu.c's struct decode_step
    _fields_ = [
        *((name, ctypes.c_long) for name in (
            "rows", "heads", "kv_heads", "dim", "num_blocks", "block_size", "rope_row_stride", "table_stride",
            "max_blocks",
        )),
        ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p), ("slots", ctypes.c_void_p), ("block_tables", ctypes.c_void_p),
        ("seq_lens", ctypes.c_void_p), ("scale", ctypes.c_float),
    ]  # fmt: skip


def available(device: torch.device) -> bool:
    """Whether the CPU decode step can use the kernel (built here, or found in the cache)."""
    return device.type == "cpu" and _library()[0] is not None


def unavailable_reason() -> str:
    return _library()[1]


def _pointer(t: torch.Tensor | None) -> tuple[int | None, int]:
    """(address, cpu.c's type code) of a contiguous CPU tensor, (NULL, 0) for None."""
    if t is None:
        return None, 0
    if not t.is_cpu or not t.is_contiguous() or t.dtype not in TYPES:
        raise TypeError(f"the CPU kernels take contiguous CPU {list(TYPES)} tensors, not a {'' if t.is_contiguous() else 'strided '}{t.device} {t.dtype} one")
    return t.data_ptr(), TYPES[t.dtype]


def _index_pointer(t: torch.Tensor, dtype: torch.dtype) -> int:
    """The address of a CPU index tensor of dtype (slots int64; block tables, lengths int32) whose last axis is
    contiguous: a block table's rows may lie apart (a view of a wider table), the C code takes their stride."""
    if not t.is_cpu or t.dtype != dtype or t.stride(-1) != 1:
        raise TypeError(f"the CPU kernels take CPU {dtype} index tensors, not a {t.device} {t.dtype} one")
    return t.data_ptr()


def _same_type(*tensors: torch.Tensor) -> None:
    """The attention kernels read every tensor as the activations' one type."""
    if len({t.dtype for t in tensors}) != 1:
        raise TypeError(f"the CPU attention kernels take tensors of one type, not {sorted({str(t.dtype) for t in tensors})}")


def _opaque(mutates_args: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Register fn as the custom op qwen3gen::cpu_<name>, one opaque call inside compiled graphs; called eagerly, fn
    runs straight, as the op dispatcher's own ~25 us per call would add about 4 % to an eager step here."""

    def register(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"qwen3gen::cpu_{fn.__name__}", fn, mutates_args=mutates_args)

        @functools.wraps(fn)
        def call(*args: object) -> torch.Tensor:
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        call.register_fake = op.register_fake
        return call

    return register


@_opaque()
def matvec(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    swiglu: bool,
) -> torch.Tensor:
    """kernels.matvec's contract on the CPU: residual + linear(input) * scale + bias for x [1, rows, K] (or [1, rows,
    2K] with swiglu), rows from 1 to MATVEC_ROWS, where input is x, RMSNorm(x) (each row its own) with norm_weight, or
    silu(gate) * up; weight [N, K], residual [1, rows, N] or None: [1, rows, N]."""
    n, k = weight.shape
    x, residual, out = _product_arguments(x, n, k, residual, swiglu)
    (x_ptr, x_type), *rest = [_pointer(t) for t in (x, weight, scale, bias, norm_weight)]
    flat = [value for pair in rest for value in pair]  # weight, scale, bias, norm weight: address and type each
    status = _library()[0].qwen3gen_matvec(
        x_ptr, x_type, *flat[:2], n, k, *flat[2:], eps, _pointer(residual)[0], swiglu, out.data_ptr(), out.shape[1],
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the CPU kernel could not allocate its input buffer")
    return out


@matvec.register_fake
def _(x, weight, scale, bias, norm_weight, eps, residual, swiglu):  # noqa: ANN001, ANN202
    return x.new_empty(1, x.shape[1], weight.shape[0])


@_opaque()
def block_matvec(
    x: torch.Tensor,
    parts: list[torch.Tensor],
    block_types: list[int],
    k: int,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    swiglu: bool,
) -> torch.Tensor:
    """matvec for a weight [N, k] held in GGML's block formats, in parts stacked by rows (a layer's q, k and v are
    apart in a GGUF file, often in different formats): part i is blocks [rows_i, k / block weights * block bytes]
    uint8 of GGML's type number block_types[i] (a key of BLOCK_FORMATS), each row's blocks decoded as they are
    multiplied; N is the parts' rows together. One call for them all: the input is made once."""
    addresses, codes, rows, n = _block_parts(parts, block_types, k)
    x, residual, out = _product_arguments(x, n, k, residual, swiglu)
    (x_ptr, x_type), *rest = [_pointer(t) for t in (x, bias, norm_weight)]
    flat = [value for pair in rest for value in pair]  # bias, norm weight: address and type each
    status = _library()[0].qwen3gen_block_matvec(
        x_ptr, x_type, addresses, codes, rows, len(parts), k, *flat, eps, _pointer(residual)[0], swiglu,
        out.data_ptr(), out.shape[1], torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("the CPU kernel could not allocate its input buffer")
    return out


_PARTS: dict[tuple, tuple] = {}  # _block_parts' C arrays by the parts' layout


def _block_parts(parts: list[torch.Tensor], block_types: list[int], k: int) -> tuple:
    """(addresses, codes, rows as C arrays, N) of a weight's parts, checked and made once per layout of its parts
    (each one's address, shape, strides, dtype and device): a decode step calls the same layers again and again."""
    key = (tuple((b.data_ptr(), *b.shape, *b.stride(), b.dtype, b.is_cpu) for b in parts), tuple(block_types), k)
    found = _PARTS.get(key)
    if found is not None:
        return found
    if len(parts) != len(block_types) or not parts:
        raise ValueError(f"block_matvec takes one block type per part, not {len(block_types)} for {len(parts)} parts")
    for blocks, block_type in zip(parts, block_types):
        check_blocks(blocks, block_type, k)
    count = len(parts)
    addresses = (ctypes.c_void_p * count)(*[blocks.data_ptr() for blocks in parts])
    codes = (ctypes.c_int * count)(*[BLOCK_FORMATS[t][1] for t in block_types])
    rows = (ctypes.c_long * count)(*[blocks.shape[0] for blocks in parts])
    if len(_PARTS) >= 4096:  # more layers than any model has: layouts of tensors gone
        _PARTS.clear()
    _PARTS[key] = addresses, codes, rows, sum(blocks.shape[0] for blocks in parts)
    return _PARTS[key]


@block_matvec.register_fake
def _(x, parts, block_types, k, bias, norm_weight, eps, residual, swiglu):  # noqa: ANN001, ANN202
    return x.new_empty(1, x.shape[1], sum(blocks.shape[0] for blocks in parts))


def _product_arguments(
    x: torch.Tensor, n: int, k: int, residual: torch.Tensor | None, swiglu: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """x and residual checked against an [n, k] weight and made contiguous (held while the kernel runs), and out."""
    rows = x.shape[1] if x.dim() == 3 else 0
    if x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != (2 * k if swiglu else k) or residual is not None and residual.shape != (1, rows, n):
        raise ValueError(
            f"the CPU kernel's [{n}, {k}] weight takes x [1, rows, {2 * k if swiglu else k}]{' (SwiGLU)' if swiglu else ''} and "
            f"residual [1, rows, {n}], not x {list(x.shape)} and residual {None if residual is None else list(residual.shape)}"
        )
    if not 1 <= rows <= MATVEC_ROWS:
        raise ValueError(f"the CPU kernel takes 1 to MATVEC_ROWS = {MATVEC_ROWS} input rows, not {rows}")
    residual = None if residual is None else residual.contiguous()
    return x.contiguous(), residual, x.new_empty(1, rows, n)


def block_shape(block_type: int) -> tuple[int, int]:
    """(weights, bytes) of one block of GGML's block format block_type (a key of BLOCK_FORMATS)."""
    return BLOCK_FORMATS[block_type][2:]


def check_blocks(blocks: torch.Tensor, block_type: int, k: int) -> None:
    """The kernels read a row of k / weights blocks per row of blocks: its shape checked, as a wrong one would reach
    outside the tensor."""
    if block_type not in BLOCK_FORMATS:
        raise ValueError(f"the CPU kernels take GGML's types {sorted(BLOCK_FORMATS)}, not {block_type}")
    weights, size = block_shape(block_type)
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or k % weights or blocks.shape[1] != k // weights * size:
        raise ValueError(
            f"GGML type {block_type}: a row of {k} weights is {k // weights} blocks of {size} bytes ({weights} weights "
            f"each), not a {blocks.dtype} {list(blocks.shape)} tensor's row"
        )
    if not blocks.is_cpu or not blocks.is_contiguous():
        raise TypeError("the CPU kernels take contiguous CPU block tensors")


def dequantize(blocks: torch.Tensor, block_type: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The weights [N, k] of blocks [N, k / block weights * block bytes] (GGML's type block_type) as dtype (float32,
    bfloat16 or float16): each weight's float value as the gguf package computes it, then rounded to nearest even."""
    check_blocks(blocks, block_type, k)
    out = torch.empty(blocks.shape[0], k, dtype=dtype)
    code = _pointer(out)[1]
    status = _library()[0].qwen3gen_dequantize(
        blocks.data_ptr(), BLOCK_FORMATS[block_type][1], blocks.shape[0], k, out.data_ptr(), code, torch.get_num_threads()
    )
    if status != 0:
        raise MemoryError("the CPU kernel could not allocate its row buffer")
    return out


@_opaque(mutates_args=("k_cache", "v_cache"))
def new_token(
    qkv: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    eps: float,
    qk_norm: bool,
) -> torch.Tensor:
    """kernels.new_token's contract on the CPU: writes each row's new key (normed, rotated) and value of qkv [rows, 1,
    (heads + 2 kv_heads) * head_dim], with its own angles cos, sin [rows, 1, 1, head_dim / 2], to the pool k_cache,
    v_cache [num_blocks, kv_heads, block_size, head_dim] at slots[row] (block * block_size + offset, int64) and
    returns the query heads [rows, heads, 1, head_dim]."""
    num_blocks, kv_heads, block_size, dim = k_cache.shape
    rows = qkv.shape[0]
    # The kernel writes and reads where these say: checked here (the slots' values in the kernel, before it writes),
    # as a wrong one would reach outside the tensors.
    if (
        qkv.shape[1:] != (1, (heads + 2 * kv_heads) * dim) or slots.shape != (rows,) or v_cache.shape != k_cache.shape
        or cos.shape != (rows, 1, 1, dim // 2) or sin.shape != cos.shape or dim % 2
        or (qk_norm and (q_weight.numel() != dim or k_weight.numel() != dim))
    ):  # fmt: skip
        raise ValueError(
            f"new_token: q/k/v {list(qkv.shape)}, slots {list(slots.shape)}, cos/sin {list(cos.shape)}/{list(sin.shape)} "
            f"for {heads} + 2 x {kv_heads} heads of {dim} over a {list(k_cache.shape)} / {list(v_cache.shape)} pool"
        )
    _same_type(qkv, cos, sin, k_cache, v_cache, *((q_weight, k_weight) if qk_norm else ()))
    qkv, cos, sin, slots = qkv.contiguous(), cos.contiguous(), sin.contiguous(), slots.to(torch.int64).contiguous()
    q = qkv.new_empty(rows, heads, 1, dim)
    (qkv_ptr, kind), (q_norm, _), (k_norm, _) = _pointer(qkv), *(_pointer(w if qk_norm else None) for w in (q_weight, k_weight))
    status = _library()[0].qwen3gen_new_token(
        qkv_ptr, kind, qkv.stride(0), q_norm, k_norm, eps, _pointer(cos)[0], _pointer(sin)[0], cos.stride(0),
        _index_pointer(slots, torch.int64), num_blocks * block_size, _pointer(k_cache)[0], _pointer(v_cache)[0], kv_heads, block_size,
        q.data_ptr(), rows, heads, dim,
    )  # fmt: skip
    if status != 0:
        bad = slots[(slots < 0) | (slots >= num_blocks * block_size)].tolist()
        raise IndexError(f"new_token: slots {bad} outside the pool's {num_blocks} x {block_size} slots; nothing was written")
    return q


@new_token.register_fake
def _(qkv, q_weight, k_weight, cos, sin, slots, k_cache, v_cache, heads, eps, qk_norm):  # noqa: ANN001, ANN202
    return qkv.new_empty(qkv.shape[0], heads, 1, k_cache.shape[-1])


@_opaque()
def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor
) -> torch.Tensor:
    """kernels.decode_attention's contract on the CPU: attention of each row's query heads q [rows, heads, 1,
    head_dim] over its first seq_lens[row] slots (the new token's included, all visible) of the pool k_cache, v_cache
    [num_blocks, kv_heads, block_size, head_dim], found through block_tables [rows, max_blocks] (int32)."""
    rows, heads, _, dim = q.shape
    num_blocks, kv_heads, block_size = k_cache.shape[:3]
    if (
        q.shape[2] != 1 or k_cache.shape[3] != dim or v_cache.shape != k_cache.shape or heads % kv_heads or dim % 8
        or block_tables.dim() != 2 or block_tables.shape[0] != rows or seq_lens.shape != (rows,)
    ):  # fmt: skip
        raise ValueError(
            f"decode_attention: q {list(q.shape)} over a {list(k_cache.shape)} / {list(v_cache.shape)} pool (head size a "
            f"multiple of 8), block tables {list(block_tables.shape)}, lengths {list(seq_lens.shape)}"
        )
    _same_type(q, k_cache, v_cache)
    q, seq_lens = q.contiguous(), seq_lens.to(torch.int32).contiguous()
    block_tables = block_tables.to(torch.int32)
    if block_tables.stride(1) != 1:  # rows may lie apart (a view of a wider table), a row's block ids may not
        block_tables = block_tables.contiguous()
    out = torch.empty_like(q)
    max_blocks = block_tables.shape[1]
    status = _library()[0].qwen3gen_decode_attention(
        q.data_ptr(), _pointer(q)[1], _pointer(k_cache)[0], _pointer(v_cache)[0], num_blocks, kv_heads, block_size,
        _index_pointer(block_tables, torch.int32), block_tables.stride(0), max_blocks, _index_pointer(seq_lens, torch.int32),
        out.data_ptr(), rows, heads, dim, dim**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    _check_status(status, "decode_attention", seq_lens, block_tables, num_blocks, block_size)
    return out


def _check_status(
    status: int, name: str, seq_lens: torch.Tensor, tables: torch.Tensor, num_blocks: int, block_size: int,
    slots: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """The error a C attention call's status stands for (0: none): -1 no memory, -2 a length, -3 a block id, -4 a
    slot outside the pool (each found before anything is read or written)."""
    if status == -1:
        raise MemoryError(f"{name}: the CPU kernels could not allocate their buffers")
    if status == -2:
        raise IndexError(f"{name}: lengths {seq_lens.tolist()} outside [1, {tables.shape[1]} blocks x {block_size}]")
    if status == -3:
        raise IndexError(f"{name}: a block id outside the pool's {num_blocks} blocks in the used part of {tables.tolist()}")
    if status == -4:
        raise IndexError(f"{name}: slots {slots.tolist()} outside the pool's {num_blocks} x {block_size} slots")


@decode_attention.register_fake
def _(q, k_cache, v_cache, block_tables, seq_lens):  # noqa: ANN001, ANN202
    return torch.empty_like(q)


def decode_blocks(blocks: nn.ModuleList, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch) -> torch.Tensor | None:  # noqa: ANN001
    """model.Block.decode_one_token for every block of a decode step in one C call (qwen3gen_decode_layers), where
    calling the products, new_token and attention from Python costs about a quarter of a small model's step: x [1,
    rows, hidden] -> the last block's output. None where the blocks hold a layer it does not know (a tensor-parallel
    shard's, whose products end in an all-reduce): the caller runs them one by one."""
    layers = _layers(blocks, batch.caches, x.dtype)
    if layers is None:
        return None
    rows = x.shape[1]
    attn = blocks[0].self_attn
    k_cache = batch.caches[0][0]
    num_blocks, kv_heads, block_size, dim = k_cache.shape
    cos, sin = (r.contiguous() for r in rope)
    slots = batch.slots.to(torch.int64).contiguous()
    seq_lens = batch.seq_lens.to(torch.int32).contiguous()
    tables = batch.block_tables.to(torch.int32)
    tables = tables if tables.stride(1) == 1 else tables.contiguous()
    if slots.shape != (rows,) or seq_lens.shape != (rows,) or tables.dim() != 2 or tables.shape[0] != rows:
        raise ValueError(f"decode_blocks: {rows} rows, slots {list(slots.shape)}, lengths {list(seq_lens.shape)}, "
                         f"block tables {list(tables.shape)}")  # fmt: skip
    step = _DecodeStep(
        rows, attn.n_heads, kv_heads, dim, num_blocks, block_size, cos.shape[-1], tables.stride(0), tables.shape[1],
        cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), seq_lens.data_ptr(), dim**-0.5,
    )  # fmt: skip
    out = x.contiguous().clone()
    status = _library()[0].qwen3gen_decode_layers(
        out.data_ptr(), TYPES[x.dtype], layers.array, len(blocks), ctypes.byref(step), torch.get_num_threads()
    )  # fmt: skip
    _check_status(status, "decode_blocks", seq_lens, tables, num_blocks, block_size, slots)
    return out


@dataclass
class _Layers:
    """The C descriptions of a model's blocks over one pool, and what they point into (kept alive)."""

    array: ctypes.Array
    held: list  # the C arrays of the block formats' parts
    tensors: list[torch.Tensor]
    addresses: list[int]

    def moved(self) -> bool:
        """Whether the first or last tensor has moved (as huge_page_weights moves them all), checked at every step
        where checking every tensor would cost more than a small product."""
        return any(self.tensors[i].data_ptr() != self.addresses[i] for i in (0, -1))


_LAYERS: dict[tuple, _Layers | None] = {}


def _layers(blocks: nn.ModuleList, caches: list, dtype: torch.dtype) -> _Layers | None:
    """The blocks' C descriptions over the pool's caches, made once (and again where a tensor has moved)."""
    key = (id(blocks), caches[0][0].data_ptr(), dtype)
    if key in _LAYERS:
        found = _LAYERS[key]
        if found is None or not found.moved():
            return found
    if len(_LAYERS) >= 64:
        _LAYERS.clear()
    _LAYERS[key] = _describe(blocks, caches, dtype)
    return _LAYERS[key]


def _describe(blocks: nn.ModuleList, caches: list, dtype: torch.dtype) -> _Layers | None:
    tensors: list[torch.Tensor] = []
    held: list = []

    def address(t: torch.Tensor | None, same_type: bool = True) -> int | None:
        if t is None:
            return None
        if not t.is_cpu or not t.is_contiguous() or t.dtype not in TYPES or same_type and t.dtype != dtype:
            raise TypeError
        tensors.append(t)
        return t.data_ptr()

    def product(layer: nn.Module) -> _Product:
        bias = getattr(layer, "bias", None)
        bias_type = 0 if bias is None else TYPES[bias.dtype]
        if hasattr(layer, "parts"):  # loaders/blocks.py's BlockLinear: GGML blocks in parts
            parts = [p.blocks for p in layer.parts]
            addresses, codes, rows, n = _block_parts(parts, [p.block_type for p in layer.parts], layer.in_features)
            tensors.extend(parts)
            held.append((addresses, codes, rows))
            pointers = ctypes.cast(addresses, ctypes.POINTER(ctypes.c_void_p))
            return _Product(None, 0, None, 0, pointers, codes, rows, len(parts), address(bias, False), bias_type, n, layer.in_features)
        if hasattr(layer, "fused"):
            raise TypeError  # a product of its own (a tensor-parallel shard's, with its all-reduce)
        weight, scales = layer.weight, getattr(layer, "scales", None)
        n, k = weight.shape
        return _Product(
            address(weight, False), TYPES[weight.dtype], address(scales, False), 0 if scales is None else TYPES[scales.dtype],
            None, None, None, 0, address(bias, False), bias_type, n, k,
        )  # fmt: skip

    try:
        array = (_Layer * len(blocks))()
        for entry, block, (k_cache, v_cache) in zip(array, blocks, caches):
            attn, mlp = block.self_attn, block.mlp
            qk_norm = not isinstance(attn.q_norm, nn.Identity)
            entry.input_norm, entry.post_norm = address(block.input_layernorm.weight), address(block.post_attention_layernorm.weight)
            entry.eps = block.input_layernorm.eps
            if qk_norm:
                entry.q_norm, entry.k_norm, entry.qk_eps = address(attn.q_norm.weight), address(attn.k_norm.weight), attn.q_norm.eps
            entry.qkv, entry.o = product(attn.qkv_proj), product(attn.o_proj)
            entry.gate_up, entry.down = product(mlp.gate_up_proj), product(mlp.down_proj)
            entry.k_cache, entry.v_cache = address(k_cache), address(v_cache)
    except TypeError:
        return None
    return _Layers(array, held, tensors, [t.data_ptr() for t in tensors])


def huge_page_weights(model: nn.Module, copy: bool = True) -> None:
    """Move every parameter and buffer of a CPU model into one block of memory advised for 2 MiB pages (Linux);
    copy=False only places them there, their values not kept (a model about to be loaded: one copy, not two).

    Reading 1.2 GB of weights per token through 4 KiB pages costs a page-table walk every 4 KiB; through 2 MiB pages the
    same reads ran about a quarter faster here. Elsewhere (no madvise, or transparent huge pages off) nothing changes.
    """
    if not hasattr(mmap, "MADV_HUGEPAGE") or getattr(model, "weights_on_huge_pages", False):
        return
    tensors = {}
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is not None and t.device.type == "cpu":
                    tensors.setdefault(id(t), (t, []))[1].append((module, kind, name))
    offsets, size = [], 0
    for t, _ in tensors.values():
        offsets.append(size)
        size += -(-t.numel() * t.element_size() // 64) * 64  # each tensor 64-byte aligned
    block = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared memory gets no huge pages
    block.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(block, dtype=torch.uint8)  # keeps the mmap alive as long as any view of it
    start = -raw.data_ptr() % HUGE_PAGE
    with torch.no_grad():
        for offset in offsets:
            t, owners = tensors.pop(next(iter(tensors)))  # dropped as it goes: peak memory grows by one tensor, not all
            begin = start + offset
            moved = raw[begin : begin + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
            if copy:
                moved.copy_(t)
            if isinstance(t, nn.Parameter):  # one Parameter still, where modules share one (tied weights)
                moved = nn.Parameter(moved, t.requires_grad)
            for module, kind, name in owners:
                getattr(module, kind)[name] = moved
    model.weights_on_huge_pages = True
