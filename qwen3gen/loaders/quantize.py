"""Weight-only quantization of every linear layer (and the output head); activations stay in the model's dtype.

Decoding reads every weight once per token, so halving the bytes of the weights nearly halves the time per token where
memory bandwidth is the limit. int8: each output channel as int8 with one scale (every device). int4: llama.cpp's Q4_K
blocks (each 32 weights a 6-bit scale and minimum, 4.5 bits a weight) where a matrix's rows are multiples of 256
weights, else its Q4_0 blocks (32 weights share a float16 scale), multiplied by the CPU's block kernels (blocks.py),
so on the CPU only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import QUANTIZATIONS
from ..errors import InvalidParameterError
from ..model import Qwen3
from .blocks import BlockLinear, BlockMatrix, quantize_q4_0, quantize_q4_k


def quantize_per_channel(weight: torch.Tensor, rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: weight ~= int8 * scale[row], |int8| <= 127. A slice of `rows` rows at a time,
    so that a large matrix (the output head) is never held whole as float32 while it converts."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        w = weight[start : start + rows].float()
        row_scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q[start : start + rows] = torch.round(w / row_scales[:, None]).clamp(-127, 127)
        scales[start : start + rows] = row_scales
    return q, scales


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scales = quantize_per_channel(weight)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias is None else bias.detach())  # kept exact (Qwen2's q/k/v biases); None registers nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.bfloat16:
            # PyTorch's fused CPU kernel: reads int8, never materialises a dequantised matrix.
            out = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.weight, self.scales)
            out = out.view(*x.shape[:-1], -1)
        else:
            # Elsewhere: dequantise inside the matmul's input; torch.compile fuses the cast into the kernel.
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales
        return out if self.bias is None else out + self.bias


def check_quantization(method: str | None, device: torch.device) -> None:
    """Refuse a quantization that does not exist, or int4 off the CPU."""
    if method is not None and method not in QUANTIZATIONS:
        raise InvalidParameterError(f"quantization must be one of {', '.join(QUANTIZATIONS)} (or None), not {method!r}.")
    if method == "int4" and device.type != "cpu":
        raise InvalidParameterError(f"int4 runs on the CPU only (its kernels are CPU kernels), not on {device.type}; use int8 there.")


def quantize(model: Qwen3, method: str) -> Qwen3:
    """Replace every linear layer in place, so that the memory held peaks near the larger of the float and the
    quantized model rather than at both; a tied head gets its own quantized copy (the embedding lookup stays exact)."""
    check_quantization(method, model.norm.weight.device)

    def quantized(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Module:
        if method == "int8":
            return Int8Linear(weight, bias)
        k = weight.shape[1]
        if k % 256 == 0:  # every Qwen3 matrix: Q4_K, the faster and finer of the two
            blocks = BlockMatrix(quantize_q4_k(weight.detach()), 12, k)
        else:  # a row of 32s only (Qwen2.5-0.5B's 896, tiny test models): Q4_0
            blocks = BlockMatrix(quantize_q4_0(weight.detach()), 2, k)
        return BlockLinear([blocks], None if bias is None else bias.detach())

    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    with torch.no_grad():
        for name in names:  # one layer at a time, each float matrix freed once its quantized copy exists
            parent, _, attribute = name.rpartition(".")
            module = model.get_submodule(parent)
            linear = getattr(module, attribute)
            setattr(module, attribute, quantized(linear.weight, linear.bias))
            del linear
        if model.lm_head is None:
            model.lm_head = quantized(model.embed_tokens.weight)
    return model
