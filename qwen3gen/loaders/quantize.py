"""Weight-only int8: each output channel of every linear layer (and the output head) stored as int8 with one scale.

Decoding reads every weight once per token, so halving the bytes of the weights nearly halves the time
per token where memory bandwidth is the limit. Activations stay in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import QUANTIZATIONS
from ..errors import InvalidParameterError
from ..model import Qwen3


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


def quantize(model: Qwen3, method: str) -> Qwen3:
    """Replace every linear layer in place, so that the memory held peaks near the larger of the float and the int8
    model rather than at both; a tied head gets its own int8 copy (the embedding lookup stays exact)."""
    if method not in QUANTIZATIONS:
        raise InvalidParameterError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {method!r}.")
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    with torch.no_grad():
        for name in names:  # one layer at a time, each float matrix freed once its int8 copy exists
            parent, _, attribute = name.rpartition(".")
            module = model.get_submodule(parent)
            linear = getattr(module, attribute)
            setattr(module, attribute, Int8Linear(linear.weight, linear.bias))
            del linear
        if not isinstance(model.lm_head, Int8Linear):
            model.lm_head = Int8Linear(model.output_weight)
    return model
