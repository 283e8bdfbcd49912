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
`checkpoint_tensors` names their row blocks as the checkpoint does.

The model holds no cache. Called plainly it runs a causal pass over [batch, tokens]; called by the engine it gets one
step's PagedBatch (attention.py), whose pool holds the keys and values and whose backend says how attention runs. A
step whose backend has kernels for it (a decode step; on CUDA, any step) runs the same math through them
(Attention.attend, Block.decode_one_token): q/k norm, rotation and cache write as one kernel, attention as another,
and for up to kernels.MATVEC_ROWS requests of a decode step the four products with the norms, SwiGLU and residual
adds inside.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .attention import PagedBatch, sdpa
from .config import Qwen3Config

Rope = tuple[torch.Tensor, torch.Tensor]
# The layers that hold several checkpoint matrices, stacked by rows in this order.
STACKED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


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


def rotary_angles(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Rope:
    """cos and sin of position x frequency, shape [batch, tokens, 1, head_dim / 2] (one value for every head).

    Computed from the positions on every call (a few tiny ops) rather than from a 40,960-row table,
    in float32 and then cast, exactly as the reference computes them.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    angles = positions[:, :, None, None].float() * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_table(cfg: Qwen3Config, positions: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """rotary_angles of positions 0 to positions - 1 as one table [positions, 2 (cos, sin), 1, head_dim / 2], for the
    steps that look them up by position (PagedBatch.rope_table): one gather where computing them is ten small kernels,
    the same values (each position's angles do not depend on the others')."""
    cos, sin = rotary_angles(torch.arange(positions, device=device)[None], cfg.head_dim, cfg.rope_theta, dtype)
    return torch.stack((cos[0], sin[0]), dim=1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each head's (first half, second half) pairs by the position's angles."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index  # which of the pool's caches is this layer's
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_sizes = [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]
        self.qkv_proj = nn.Linear(cfg.hidden_size, sum(self.qkv_sizes), bias=cfg.attention_bias)  # q_proj, k_proj, v_proj
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias)
        # Identity holds no parameters, so a Qwen2 model has no q_norm/k_norm tensors to load.
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Rope, batch: PagedBatch | None) -> torch.Tensor:
        return self.o_proj(self.attend(self.qkv_proj(x), rope, batch))

    def attend(self, qkv: torch.Tensor, rope: Rope, batch: PagedBatch | None) -> torch.Tensor:
        """Attention of the q/k/v projections [batch, tokens, (heads + 2 kv_heads) * head_dim]: [batch, tokens, heads *
        head_dim]. Without a PagedBatch, causal over the tokens; with one, over each request's context in the pool."""
        rows, tokens, _ = qkv.shape
        kernels = None if batch is None else batch.kernels
        if kernels is not None:  # the step's tokens side by side, each the row of one kernel program
            flat, rope = qkv.view(tokens, 1, -1), [r.view(tokens, 1, 1, -1) for r in rope]
            if batch.decode and hasattr(kernels, "decode_step_attention"):
                return self.new_token(kernels, flat, rope, batch, attend=True).view(1, tokens, -1)
            return batch.attend_written(self.layer_index, self.new_token(kernels, flat, rope, batch)).view(1, tokens, -1)
        heads = qkv.view(rows, tokens, -1, self.head_dim)  # query, key, value heads
        qk, v = heads.split([self.n_heads + self.n_kv_heads, self.n_kv_heads], dim=2)
        # Query and key heads are normed and rotated as one tensor: compiled, one kernel where there would be four.
        q, k = apply_rotary(self.qk_norm(qk), *rope).split([self.n_heads, self.n_kv_heads], dim=2)
        if batch is None:
            out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None).transpose(1, 2)
        else:
            out = batch.attend(self.layer_index, q[0], k[0], v[0])
        return out.reshape(rows, tokens, -1)

    def new_token(
        self, kernels: ModuleType, qkv: torch.Tensor, rope: list[torch.Tensor], batch: PagedBatch, attend: bool = False
    ) -> torch.Tensor:  # fmt: skip
        """The lines from qk_norm to the cache write above as one kernel, a program per token (and key/value head):
        returns the query heads [tokens, heads, 1, head_dim]; the pool holds the new keys and values. attend: the
        decode step's attention too, in the same kernel (where the kernels have one): returns its output."""
        qk_norm = not isinstance(self.q_norm, nn.Identity)
        q_weight, k_weight = (self.q_norm.weight, self.k_norm.weight) if qk_norm else (qkv, qkv)  # unused without norms
        eps = self.q_norm.eps if qk_norm else 0.0
        k_cache, v_cache = batch.caches[self.layer_index]
        args = (qkv, q_weight, k_weight, *rope, batch.slots, k_cache, v_cache)
        if attend:
            return kernels.decode_step_attention(*args, batch.block_tables, batch.seq_lens, self.n_heads, eps, qk_norm)
        return kernels.new_token(*args, self.n_heads, eps, qk_norm)

    def qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        """q_norm on the query heads and k_norm on the key heads of qk [batch, tokens, n_heads + n_kv_heads, head_dim]."""
        if isinstance(self.q_norm, nn.Identity):
            return qk
        weight = torch.cat([self.q_norm.weight.expand(self.n_heads, -1), self.k_norm.weight.expand(self.n_kv_heads, -1)])
        return rms_norm(qk, weight, self.q_norm.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate_proj, up_proj
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: Qwen3Config, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_index)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: Rope, batch: PagedBatch | None) -> torch.Tensor:
        if batch is not None and batch.kernels is not None and x.shape[1] <= batch.kernels.MATVEC_ROWS:
            return self.decode_one_token(x, rope, batch)
        kernels = None if batch is None else batch.kernels
        x = x + self.self_attn(normed(kernels, self.input_layernorm, x), rope, batch)
        return x + self.mlp(normed(kernels, self.post_attention_layernorm, x))

    def decode_one_token(self, x: torch.Tensor, rope: Rope, batch: PagedBatch) -> torch.Tensor:
        """forward for the new tokens of a decode step of up to kernels.MATVEC_ROWS requests as four products, each
        with its neighbours inside: each norm inside the product after it, SwiGLU inside the down product, each
        residual add inside the product before it; q/k norm, rotation and cache writes one kernel more, and attention
        another (Attention.attend)."""
        attn, mlp, kernels = self.self_attn, self.mlp, batch.kernels
        qkv = fused_linear(kernels, x, attn.qkv_proj, norm=self.input_layernorm)
        x = fused_linear(kernels, attn.attend(qkv, rope, batch), attn.o_proj, residual=x)
        gate_up = fused_linear(kernels, x, mlp.gate_up_proj, norm=self.post_attention_layernorm)
        return fused_linear(kernels, gate_up, mlp.down_proj, residual=x, swiglu=True)


def normed(kernels: ModuleType | None, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x), as one kernel where the step's kernels have one (rms_norm) and torch.compile is not fusing the
    norm's PyTorch lines with their neighbours itself."""
    if kernels is None or not hasattr(kernels, "rms_norm") or torch.compiler.is_compiling():
        return norm(x)
    return kernels.rms_norm(x, norm.weight, norm.eps)


def fused_linear(
    kernels: ModuleType, x: torch.Tensor, layer: nn.Module, norm: RMSNorm | None = None,
    residual: torch.Tensor | None = None, swiglu: bool = False,
) -> torch.Tensor:  # fmt: skip
    """residual + layer(input), input being x, norm(x) or silu(gate) * up of x = [gate, up], in one kernel; layer is
    an nn.Linear, an int8 one (quantize.py: int8 weight, a scale per row), the embedding as a tied output head, or a
    layer of its own product (`fused`: blocks.py's GGML block formats)."""
    norm_weight, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
    if hasattr(layer, "fused"):
        return layer.fused(kernels, x, norm_weight, eps, residual, swiglu)
    scales, bias = getattr(layer, "scales", None), getattr(layer, "bias", None)
    return kernels.matvec(x, layer.weight, scales, bias, norm_weight, eps, residual, swiglu)


class Qwen3(nn.Module):
    def __init__(self, cfg: Qwen3Config) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def checkpoint_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every parameter under its checkpoint name (without transformers' "model." prefix); the stacked q/k/v
        and gate/up matrices as views of their row blocks, under the names checkpoints store them by."""
        rows = dict(zip(STACKED["self_attn.qkv_proj"], self.layers[0].self_attn.qkv_sizes))
        rows.update(dict.fromkeys(STACKED["mlp.gate_up_proj"], self.config.intermediate_size))
        for name, param in self.named_parameters():
            module, _, kind = name.rpartition(".")  # "layers.3.mlp.gate_up_proj", "weight"
            *layer, local = module.split(".", 2)  # ["layers", "3"], "mlp.gate_up_proj"
            if local not in STACKED:
                yield name, param
                continue
            start = 0
            for part in STACKED[local]:
                yield ".".join([*layer, part, kind]), param[start : start + rows[part]]
                start += rows[part]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        batch: PagedBatch | None = None,
        logits_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits. Plain: input_ids [batch, tokens], a causal pass from position 0: [batch, tokens, vocab].

        With a PagedBatch (the engine's step): input_ids and positions [tokens] are the new tokens of every request of
        the step side by side; their keys and values go into the pool, and the logits of the tokens at logits_rows
        [rows] (all, if None) come back, [rows, vocab].
        """
        x = self.embed_tokens(input_ids)
        if batch is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape)
        else:
            x, positions = x[None], positions[None]  # the step as one row of tokens
        if batch is not None and batch.rope_table is not None:
            angles = batch.rope_table[positions]  # [1, tokens, 2, 1, head_dim / 2]
            rope = angles[:, :, 0], angles[:, :, 1]
        else:
            rope = rotary_angles(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        x = self.blocks(x, rope, batch)
        if batch is None:
            return self.logits(x, None)
        return self.logits(x[0] if logits_rows is None else x[0, logits_rows], batch)

    def blocks(self, x: torch.Tensor, rope: Rope, batch: PagedBatch | None) -> torch.Tensor:
        """x through every block. A decode step whose kernels run whole blocks (the CPU's `decode_blocks`: every
        block's decode_one_token in one call) takes that call where they know the blocks' layers."""
        kernels = None if batch is None else batch.kernels
        whole = getattr(kernels, "decode_blocks", None)
        if whole is not None and batch.decode and x.shape[1] <= kernels.MATVEC_ROWS and not torch.compiler.is_compiling():
            out = whole(self.layers, x, rope, batch)
            if out is not None:
                return out
        for layer in self.layers:
            x = layer(x, rope, batch)
        return x

    def logits(self, x: torch.Tensor, batch: PagedBatch | None) -> torch.Tensor:
        """The final norm and the output head of hidden states x [..., hidden]."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        kernels = None if batch is None else batch.head_kernels
        if kernels is not None and kernels.FUSED_HEAD and x.dim() == 2 and 0 < x.shape[0] <= kernels.MATVEC_ROWS:
            return fused_linear(kernels, x[None], head, norm=self.norm)[0]  # [rows, hidden] as [1, rows, hidden]
        x = normed(kernels, self.norm, x)
        return F.linear(x, head.weight) if self.lm_head is None else self.lm_head(x)
