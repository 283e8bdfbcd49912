"""The Qwen3 architecture, and Qwen2 / Qwen2.5 through two config switches, and nothing else.

    tokens -> embedding -> N x Block -> RMSNorm -> output head (tied to the embedding or not) -> logits
    Block:  x + Attention(RMSNorm(x))  then  x + MLP(RMSNorm(x))
    Attention: grouped-query, RMSNorm on every query and key head, rotary positions (split halves)
    MLP: SwiGLU

Qwen2 (model_type "qwen2": Qwen2, Qwen2.5, DeepSeek-R1-Distill-Qwen) differs only in attention:
cfg.attention_bias puts biases on q_proj/k_proj/v_proj (cfg.o_proj_bias on o_proj, Qwen3's own
attention_bias), and cfg.qk_norm=False drops the query/key norms. config.py sets both from config.json.

Module names follow the Hugging Face checkpoint ("layers.3.self_attn.o_proj.weight"), except that q/k/v
and gate/up are each held as one matrix (one larger kernel reads it, where three or two small ones would):
`checkpoint_tensors` names their row blocks as the checkpoint does. Positions are tensors, so a compiled
decode step never recompiles as it advances. A decode step runs the same math through decode_kernels(device)
(Block.decode_one_token, Attention.attend): kernels.py's Triton kernels on CUDA, where batch 1 is bound by the kernel
count; cpu_kernels.py's C kernels on a CPU with AVX2, which read the weights faster and stand for the small ops.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, kernels
from .config import Qwen3Config


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back, as the reference does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x over the root mean square of its last axis, times weight (which broadcasts against x)."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position x frequency, shape [batch, 1, tokens, head_dim / 2].

    Computed from the positions on every call (a few tiny ops) rather than from a 40,960-row table,
    in float32 and then cast, exactly as the reference computes them.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions[:, None, :, None].float() * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head's (first half, second half) pairs by the position's angles."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class KVCache(nn.Module):
    """Keys and values of one layer, pre-allocated for the whole request and written in place."""

    def __init__(self, batch_size: int, length: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (batch_size, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        return self.k, self.v


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, fold: bool) -> torch.Tensor:
    """Attention of q [batch, heads, tokens, dim] over the first mask.shape[-1] slots of k, v [batch, kv_heads, slots, dim].

    K/V are never repeated, and slots past the mask are never read. fold=True folds the query heads that
    share a KV head into the query axis, rows (group member, token), and the mask with them: on CPU five
    times faster than SDPA's enable_gqa. On the H200, enable_gqa (cuDNN) is faster, 1.8-2.4x per decode
    step (scripts/gpu_attention.py). Both give the same numbers.
    """
    keys = mask.shape[-1]
    k, v = k[:, :, :keys], v[:, :, :keys]
    if not fold:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    batch, heads, tokens, dim = q.shape
    group = heads // k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(batch, -1, group * tokens, dim), k, v, attn_mask=mask.repeat(1, 1, group, 1))
    return out.reshape(batch, heads, tokens, dim)  # reshape: an attention kernel may return another memory layout


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_sizes = [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=cfg.attention_bias)  # q_proj, k_proj, v_proj stacked
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias)
        # Identity holds no parameters, so a Qwen2 model has no q_norm/k_norm tensors to load.
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), rope, mask, slots))

    def attend(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        """Attention of the q/k/v projections [batch, tokens, (heads + 2 kv_heads) * head_dim]: [batch, tokens, heads * head_dim]."""
        batch, tokens, _ = qkv.shape
        fused = decode_kernels(qkv.device)
        if slots is not None and tokens == 1 and fused is not None:
            q, (k, v) = self.new_token(fused, qkv, rope, slots), (self.kv_cache.k, self.kv_cache.v)
            if mask.shape[-1] <= fused.ATTENTION_MAX_KEYS:
                return fused.decode_attention(q, k, v, mask).view(batch, tokens, -1)
        else:
            heads = qkv.view(batch, tokens, -1, self.head_dim).transpose(1, 2)  # query, key, value heads
            qk, v = heads.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=1)
            # Query and key heads are normed and rotated as one tensor: compiled, one kernel where there would be four.
            q, k = apply_rotary(self.qk_norm(qk), *rope).split([self.n_heads, self.n_kv_heads], dim=1)
            if slots is not None:
                k, v = self.kv_cache.update(slots, k, v)
        out = grouped_query_attention(q, k, v, mask, fold=qkv.device.type == "cpu")
        return out.transpose(1, 2).reshape(batch, tokens, -1)

    def new_token(self, fused: ModuleType, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], slots: torch.Tensor) -> torch.Tensor:
        """The lines from qk_norm to the cache update above, for one new token, as one kernel of `fused` (kernels.py
        or cpu_kernels.py): returns the query heads; the cache holds the new key and value."""
        qk_norm = not isinstance(self.q_norm, nn.Identity)
        q_weight, k_weight = (self.q_norm.weight, self.k_norm.weight) if qk_norm else (qkv, qkv)  # unused without norms
        eps = self.q_norm.eps if qk_norm else 0.0
        cache = self.kv_cache
        return fused.new_token(qkv, q_weight, k_weight, *rope, slots, cache.k, cache.v, self.n_heads, eps, qk_norm)

    def qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm on the query heads and k_norm on the key heads of qk [batch, n_heads + n_kv_heads, tokens, head_dim]."""
        if isinstance(self.q_norm, nn.Identity):
            return qk
        weight = torch.cat([self.q_norm.weight.expand(self.n_heads, -1), self.k_norm.weight.expand(self.n_kv_heads, -1)])
        return rms_norm(qk, weight[:, None], self.q_norm.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate_proj, up_proj stacked
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, slots: torch.Tensor | None) -> torch.Tensor:
        if slots is not None and x.shape[0] * x.shape[1] == 1 and decode_kernels(x.device) is not None:
            return self.decode_one_token(x, rope, mask, slots)
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, slots)
        return x + self.mlp(self.post_attention_layernorm(x))

    def decode_one_token(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """forward for one token of one row as four products, each with its neighbours inside (kernels.py on CUDA,
        cpu_kernels.py on CPU): each norm inside the product after it, SwiGLU inside the down product, each residual
        add inside the product before it. On CUDA, q/k norm, rotation and cache writes are one kernel more, and
        attention another (Attention.attend)."""
        attn, mlp = self.self_attn, self.mlp
        qkv = fused_linear(x, attn.qkv_proj, norm=self.input_layernorm)
        x = fused_linear(attn.attend(qkv, rope, mask, slots), attn.o_proj, residual=x)
        gate_up = fused_linear(x, mlp.gate_up_proj, norm=self.post_attention_layernorm)
        return fused_linear(gate_up, mlp.down_proj, residual=x, swiglu=True)


def decode_kernels(device: torch.device) -> ModuleType | None:
    """The kernels that run a decode step's products and attention on this device (Triton's on CUDA, cpu_kernels.c's
    on an AVX2 CPU; one contract), or None: the PyTorch lines."""
    if kernels.available(device):
        return kernels
    return cpu_kernels if cpu_kernels.available(device) else None


def fused_linear(
    x: torch.Tensor, layer: nn.Module, norm: RMSNorm | None = None, residual: torch.Tensor | None = None, swiglu: bool = False
) -> torch.Tensor:
    """residual + layer(input), input being x, norm(x) or silu(gate) * up of x = [gate, up], in one kernel; layer is
    an nn.Linear, an int8 one (quantize.py: int8 weight, a scale per row) or the embedding as a tied output head."""
    scales, bias = getattr(layer, "scales", None), getattr(layer, "bias", None)
    norm_weight, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
    return decode_kernels(x.device).matvec(x, layer.weight, scales, bias, norm_weight, eps, residual, swiglu)


def attention_mask(query_slots: torch.Tensor, key_length: int, pad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What each query adds to its attention scores, [batch, 1, queries, keys]: 0 where it may look, -inf elsewhere.

    Causal (key slot <= query slot), never a row's left padding (key slot >= pad[row]). A padding
    query also sees itself, so no row of the mask is empty and no NaN enters the cache. Additive and in
    the activations' dtype because it is built once per step: SDPA would convert a boolean mask in every layer.
    """
    keys = torch.arange(key_length, device=query_slots.device)
    causal = keys <= query_slots[:, None]
    not_padding = keys >= pad[:, None, None]
    allowed = ((causal & not_padding) | (keys == query_slots[:, None]))[:, None]
    return torch.full(allowed.shape, float("-inf"), dtype=dtype, device=allowed.device).masked_fill_(allowed, 0.0)


class Qwen3(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def setup_cache(self, batch_size: int, length: int) -> None:
        """Give every layer its own key/value buffers for `length` slots."""
        weight = self.embed_tokens.weight
        for layer in self.layers:
            attn = layer.self_attn
            attn.kv_cache = KVCache(batch_size, length, attn.n_kv_heads, attn.head_dim, weight.dtype, weight.device)

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter under its checkpoint name (without transformers' "model." prefix); the stacked q/k/v
        and gate/up matrices as views of their row blocks, under the names checkpoints store them by."""
        q_rows, k_rows, v_rows = self.layers[0].self_attn.qkv_sizes
        mlp_rows = self.config.intermediate_size
        stacked = {
            "self_attn.qkv_proj": (("self_attn.q_proj", q_rows), ("self_attn.k_proj", k_rows), ("self_attn.v_proj", v_rows)),
            "mlp.gate_up_proj": (("mlp.gate_proj", mlp_rows), ("mlp.up_proj", mlp_rows)),
        }
        for name, param in self.named_parameters():
            module, _, kind = name.rpartition(".")  # "layers.3.mlp.gate_up_proj", "weight"
            *layer, local = module.split(".", 2)  # ["layers", "3"], "mlp.gate_up_proj"
            if local not in stacked:
                yield name, param
                continue
            start = 0
            for part, rows in stacked[local]:
                yield ".".join([*layer, part, kind]), param[start : start + rows]
                start += rows

    def step_inputs(
        self, input_pos: torch.Tensor, pad: torch.Tensor, key_length: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The attention mask and rotary angles of these slots, which every layer shares."""
        positions = (input_pos[None, :] - pad[:, None]).clamp(min=0)
        rope = rotary_angles(positions, self.config.head_dim, self.config.rope_theta, dtype)
        return attention_mask(input_pos, key_length, pad, dtype), rope

    @property
    def cache_shape(self) -> tuple[int, int] | None:
        """(batch size, slots) of the current cache, or None."""
        cache = self.layers[0].self_attn.kv_cache
        return None if cache is None else (cache.k.shape[0], cache.k.shape[2])

    def forward(
        self,
        input_ids: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        pad: torch.Tensor | None = None,
        last_only: bool = False,
        key_length: int | None = None,
    ) -> torch.Tensor:
        """Logits [batch, tokens, vocab] (or [batch, 1, vocab] with last_only).

        Without input_pos: a plain causal pass over input_ids, no cache. With input_pos (the cache
        slots these tokens go to, shape [tokens]): keys and values are written to the cache and
        attention reads every slot. pad[row] is the number of left-padding slots of that row, so
        its real tokens start at position 0.
        """
        batch, tokens = input_ids.shape
        slots = input_pos
        if input_pos is None:
            input_pos = torch.arange(tokens, device=input_ids.device)
        if pad is None:
            pad = torch.zeros(batch, dtype=torch.long, device=input_ids.device)
        if slots is None:
            key_length = tokens
        elif key_length is None:
            key_length = self.cache_shape[1]
        x = self.embed_tokens(input_ids)
        mask, rope = self.step_inputs(input_pos, pad, key_length, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, mask, slots)
        if last_only:
            x = x[:, -1:]
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if x.shape[0] * x.shape[1] == 1 and decode_kernels(x.device) is cpu_kernels:
            return fused_linear(x, head, norm=self.norm)  # on CUDA, cuBLAS reads the head as fast as a kernel of ours
        x = self.norm(x)
        return F.linear(x, head.weight) if self.lm_head is None else self.lm_head(x)
