"""Weights held in GGML's block formats (Q8_0, Q4_0, Q5_0, Q4_K, Q5_K, Q6_K), as a GGUF file stores them.

A block is 32 weights (256 for the K formats) with the scales they share; a row of a matrix is a run of blocks. A
decode step reads every weight once, so on a CPU it costs what those bytes cost: 0.56 to 1.06 bytes a weight here,
against 2 for bf16. `BlockLinear` keeps a layer's blocks (memory-mapped from the file where they came from) and
multiplies them as they are: in a decode step through the CPU kernels' block_matvec (the model's fused_linear asks the
layer for it), in a prefill a slice of rows at a time decoded into the activations' dtype and multiplied by PyTorch.
`BlockEmbedding` decodes the rows it looks up. `reference_dequantize` is the PyTorch lines every kernel is tested
against (and what runs where the kernels are not built); the gguf package's numpy code is their own reference.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu

NAMES = {block_type: f[0] for block_type, f in cpu.BLOCK_FORMATS.items()}  # GGML's type number -> its name
SLICE_ELEMENTS = 1 << 21  # weights decoded at a time in a prefill's product: a few MB, in cache while multiplied


def _halves(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per row as a float16 [rows, 1], in float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, runs: int) -> torch.Tensor:
    """qs [rows, runs * m] -> [rows, runs, 2, m]: each run's low nibbles, then its high ones."""
    q = qs.reshape(qs.shape[0], runs, 1, -1)
    return torch.cat((q & 15, q >> 4), dim=2)


def _scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's and Q5_K's 12 bytes [rows, 12] -> eight 6-bit scales and eight 6-bit minimums [rows, 8]."""
    d, m, md = s.reshape(-1, 3, 4).unbind(1)
    scales = torch.cat((d & 63, (md & 15) | ((d >> 2) & 48)), dim=1)
    mins = torch.cat((m & 63, (md >> 4) | ((m >> 2) & 48)), dim=1)
    return scales.float(), mins.float()


def reference_dequantize(blocks: torch.Tensor, block_type: int) -> torch.Tensor:
    """Blocks [n, bytes] (uint8) of one GGML format -> their weights [n, weights] in float32, with the gguf package's
    products in its order."""
    n, b = blocks.shape[0], blocks.to(torch.int32)
    if block_type == 8:  # Q8_0: d, 32 int8
        return blocks[:, 2:].view(torch.int8).float() * _halves(blocks[:, :2])
    if block_type == 2:  # Q4_0: d, 16 bytes of nibbles; weight = d * (q - 8)
        return _halves(blocks[:, :2]) * (_nibbles(b[:, 2:], 1).reshape(n, 32) - 8).float()
    if block_type == 6:  # Q5_0: d, 32 fifth bits, 16 bytes of nibbles; weight = d * (q - 16)
        high = (b[:, 2:6, None] >> torch.arange(8)) & 1  # bit i of the 32 is weight i's
        q = _nibbles(b[:, 6:], 1).reshape(n, 32) | (high.reshape(n, 32) << 4)
        return _halves(blocks[:, :2]) * (q - 16).float()
    if block_type in (12, 13):  # Q4_K, Q5_K: d, dmin, 12 bytes of scales and minimums, (32 bytes of fifth bits), nibbles
        scales, mins = _scales_mins(b[:, 4:16])
        scale, low = (_halves(blocks[:, :2]) * scales)[..., None], (_halves(blocks[:, 2:4]) * mins)[..., None]
        if block_type == 12:
            q = _nibbles(b[:, 16:], 4).reshape(n, 8, 32)
        else:
            q = _nibbles(b[:, 48:], 4).reshape(n, 8, 32) | (((b[:, None, 16:48] >> torch.arange(8)[:, None]) & 1) << 4)
        return (scale * q.float() - low).reshape(n, 256)
    if block_type == 14:  # Q6_K: 128 bytes of low nibbles, 64 of high bit pairs, 16 int8 scales, d
        low = _nibbles(b[:, :128], 2).reshape(n, 8, 32)
        high = ((b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6])[:, None]) & 3).reshape(n, 8, 32)
        q = ((low | (high << 4)) - 32).reshape(n, 16, 16).float()
        scale = _halves(blocks[:, 208:]) * blocks[:, 192:208].view(torch.int8).float()
        return (scale[..., None] * q).reshape(n, 256)
    raise ValueError(f"GGML type {block_type} is not one of the block formats {NAMES}")


def quantize_q4_0(weight: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """weight [n, k] (k a multiple of 32) -> its Q4_0 blocks [n, k / 32 * 18], as llama.cpp's reference quantizer
    makes them (the gguf package's numpy lines, to the bit): each 32 weights' largest magnitude, with its sign, is
    -8 steps of the block's scale. A slice of `rows` rows at a time, so that a large matrix is never held whole as
    float32."""
    n, k = weight.shape
    if k % 32:
        raise ValueError(f"Q4_0 takes rows of a multiple of 32 weights, not {k}")
    out = torch.empty(n, k // 32 * 18, dtype=torch.uint8, device=weight.device)
    for start in range(0, n, rows):
        w = weight[start : start + rows].float().reshape(-1, k // 32, 32)
        largest = w.gather(-1, w.abs().argmax(-1, keepdim=True))
        d = largest / -8
        inverse = torch.where(d == 0, 0.0, 1 / d)
        q = torch.trunc(w * inverse + 8.5).clamp(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        out[start : start + rows] = torch.cat((d.half().view(torch.uint8), packed), dim=-1).reshape(w.shape[0], -1)
    return out


def quantize_q4_k(weight: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """weight [n, k] (k a multiple of 256) -> Q4_K blocks [n, k / 256 * 144]: each 32 weights' range in 15 steps
    above its minimum (at most 0), the steps and minimums in 6 bits times their superblock's float16 d and dmin,
    rounded up so that no weight falls outside its range. Simpler than llama.cpp's search for the best scales, and the
    blocks are the same format, so the same kernels (and any GGUF reader) decode them. `rows` rows at a time."""
    n, k = weight.shape
    if k % 256:
        raise ValueError(f"Q4_K takes rows of a multiple of 256 weights, not {k}")
    out = torch.empty(n, k // 256 * 144, dtype=torch.uint8, device=weight.device)
    for start in range(0, n, rows):
        w = weight[start : start + rows].float().reshape(-1, k // 256, 8, 32)
        low, high = w.amin(-1).clamp(max=0.0), w.amax(-1).clamp(min=0.0)
        d = ((high - low) / 15).amax(-1, keepdim=True).div(63).half()
        dmin = (-low).amax(-1, keepdim=True).div(63).half()
        sc = torch.where(d > 0, ((high - low) / 15 / d.float()).ceil(), 0.0).clamp(0, 63)
        m = torch.where(dmin > 0, (-low / dmin.float()).ceil(), 0.0).clamp(0, 63)
        step, offset = (d.float() * sc)[..., None], (dmin.float() * m)[..., None]
        q = torch.where(step > 0, ((w + offset) / torch.where(step > 0, step, 1.0)).round(), 0.0).clamp(0, 15).to(torch.uint8)
        sc, m = sc.to(torch.uint8), m.to(torch.uint8)
        scales = torch.cat((
            sc[..., :4] | (sc[..., 4:] >> 4 << 6), m[..., :4] | (m[..., 4:] >> 4 << 6), (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
        ), dim=-1)  # fmt: skip
        qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).flatten(-2)  # each 32 bytes: a sub-block low, the next high
        halves = torch.cat((d, dmin), dim=-1).view(torch.uint8)
        out[start : start + rows] = torch.cat((halves, scales, qs), dim=-1).reshape(w.shape[0], -1)
    return out


def dequantize(blocks: torch.Tensor, block_type: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows of blocks [n, k / weights * bytes] -> weights [n, k] as dtype: the CPU kernel where it is built, else the
    PyTorch lines."""
    if cpu.available(blocks.device):
        return cpu.dequantize(blocks.contiguous(), block_type, k, dtype)
    size = cpu.block_shape(block_type)[1]
    return reference_dequantize(blocks.reshape(-1, size), block_type).reshape(blocks.shape[0], k).to(dtype)


class BlockMatrix(nn.Module):
    """One matrix [rows, k] as rows of blocks of one format (buffer `blocks`, uint8). A layer's weight may be several
    stacked (a layer's q, k and v are stored apart in a GGUF file, often in different formats)."""

    def __init__(self, blocks: torch.Tensor, block_type: int, k: int) -> None:
        super().__init__()
        cpu.check_blocks(blocks, block_type, k)
        self.register_buffer("blocks", blocks, persistent=False)
        self.block_type, self.k = block_type, k

    @property
    def rows(self) -> int:
        return self.blocks.shape[0]

    def weights(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.blocks[start:stop], self.block_type, self.k, dtype)


class BlockLinear(nn.Module):
    """A linear layer whose weight is BlockMatrix parts stacked by rows (out_features is their rows together), with
    no bias or one kept exact (Qwen2's q/k/v biases)."""

    def __init__(self, parts: list[BlockMatrix], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if len({p.k for p in parts}) != 1:
            raise ValueError("the parts of one layer's weight take inputs of one size")
        self.parts = nn.ModuleList(parts)
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = parts[0].k, sum(p.rows for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]: each slice of rows decoded to x's dtype, then multiplied."""
        flat, outs, start = x.reshape(-1, self.in_features), [], 0
        for part in self.parts:
            step = max(1, SLICE_ELEMENTS // part.k)
            for s in range(0, part.rows, step):
                stop = min(s + step, part.rows)
                bias = None if self.bias is None else self.bias[start + s : start + stop]  # added before rounding
                outs.append(F.linear(flat, part.weights(s, stop, x.dtype), bias))
            start += part.rows
        out = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        return out.view(*x.shape[:-1], self.out_features)

    def fused(
        self, kernels: ModuleType, x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
        residual: torch.Tensor | None, swiglu: bool,
    ) -> torch.Tensor:  # fmt: skip
        """model.fused_linear's product for this layer: one kernels.block_matvec over its parts, with the norm
        inside (and the residual, which meets o_proj and down_proj)."""
        return kernels.block_matvec(
            x, [p.blocks for p in self.parts], [p.block_type for p in self.parts], self.in_features, self.bias,
            norm_weight, eps, residual, swiglu,
        )  # fmt: skip


class BlockEmbedding(nn.Module):
    """The token embedding as a BlockMatrix: the rows looked up are decoded, in the model's dtype."""

    def __init__(self, matrix: BlockMatrix, dtype: torch.dtype) -> None:
        super().__init__()
        self.matrix, self.dtype = matrix, dtype
        self.num_embeddings, self.embedding_dim = matrix.rows, matrix.k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.matrix.blocks[ids.reshape(-1)]
        return dequantize(rows, self.matrix.block_type, self.matrix.k, self.dtype).view(*ids.shape, self.matrix.k)
