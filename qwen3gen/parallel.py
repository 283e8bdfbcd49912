"""Tensor parallelism: how one model is split over N ranks (Megatron's layout), each rank holding 1/N of every layer.

    q/k/v and gate/up: split by output rows, whole KV heads with the query heads that read them, so each rank attends
        its own heads over its own share of the KV cache (its pool holds its KV heads only);
    o_proj and down_proj: split by input columns, so each rank's product is a partial sum and one all-reduce adds
        them up (RowParallelLinear); rank 0 alone adds the bias and, in the fused decode product, the residual;
    the embedding and the output head: split by vocabulary; a token's row is looked up on the rank that holds it (the
        others give zeros, added by an all-reduce), and the ranks' logits are gathered side by side.

A rank's model is model.py's Qwen3 built from the rank's config (`shard_config`: heads, KV heads, MLP width and
vocabulary divided by N) with those layers in place of the plain ones (`shard_layers`); the model file knows nothing of
ranks. Each rank reads only its part of every checkpoint tensor (`shard_part`, loaders/checkpoint.py). The engine side
(worker processes, the step sent to them) is engine/distributed.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from .config import Qwen3Config
from .errors import InvalidParameterError
from .model import Qwen3

# All-gather along one axis: all_gather_single in recent PyTorch releases, all_gather_tensor (deprecated there) before.
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


@dataclass(frozen=True)
class Shard:
    """This process's place among the ranks; group: the process group of the model's collectives."""

    rank: int
    size: int
    group: dist.ProcessGroup | None = dataclasses.field(default=None, compare=False)


def check_size(size: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidParameterError(f"tensor_parallel_size must be a positive integer, not {size!r}.")


def check_shardable(cfg: Qwen3Config, size: int) -> None:
    """InvalidParameterError unless `size` ranks can each hold whole KV heads (and an equal share of the MLP)."""
    if cfg.num_key_value_heads % size:
        raise InvalidParameterError(
            f"tensor_parallel_size {size} does not divide the model's {cfg.num_key_value_heads} KV heads: each rank "
            f"holds whole KV heads (try a divisor of {cfg.num_key_value_heads})."
        )
    if cfg.intermediate_size % size:
        raise InvalidParameterError(
            f"tensor_parallel_size {size} does not divide the MLP width {cfg.intermediate_size}."
        )


def shard_config(cfg: Qwen3Config, size: int) -> Qwen3Config:
    """The shape of one rank's model: 1/size of the heads, KV heads, MLP width and vocabulary (rounded up; the last
    rank's spare rows are zeros, their logits cut off after the gather)."""
    return cfg.replace(
        num_attention_heads=cfg.num_attention_heads // size,
        num_key_value_heads=cfg.num_key_value_heads // size,
        intermediate_size=cfg.intermediate_size // size,
        vocab_size=-(-cfg.vocab_size // size),
    )


class RowParallelLinear(nn.Linear):
    """A product split by input columns: each rank multiplies its columns, one all-reduce adds the partial sums. Rank
    0 holds the bias (the others hold zeros) and alone adds the residual of a fused product, so each is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, shard: Shard) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.shard = shard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(super().forward(x))

    def fused(
        self, kernels: object, x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float,
        residual: torch.Tensor | None, swiglu: bool,
    ) -> torch.Tensor:  # fmt: skip
        """model.fused_linear's product, the residual added on rank 0 only."""
        residual = residual if self.shard.rank == 0 else None
        return self.reduce(kernels.matvec(x, self.weight, None, self.bias, norm_weight, eps, residual, swiglu))

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(partial, group=self.shard.group)
        return partial


class VocabParallelEmbedding(nn.Embedding):
    """Rows [rank * n, (rank + 1) * n) of the embedding; a token outside them gives zeros here, its row where it lives,
    and an all-reduce adds the ranks' rows (only one of them non-zero). As the tied output head, its weight gives this
    rank's share of the logits."""

    def __init__(self, num_embeddings: int, embedding_dim: int, shard: Shard) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.shard = shard

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.shard.rank * self.num_embeddings
        outside = (local < 0) | (local >= self.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        dist.all_reduce(rows, group=self.shard.group)
        return rows


def shard_layers(model: Qwen3, shard: Shard, vocab_size: int) -> None:
    """Put the split layers in place of a rank's model's plain o_proj, down_proj and embedding (same shapes), and
    gather its logits from every rank, the whole vocabulary's vocab_size (a forward hook, so that compiled and
    recorded steps include the gather)."""
    cfg = model.config
    for block in model.layers:
        attn, mlp = block.self_attn, block.mlp
        attn.o_proj = RowParallelLinear(attn.o_proj.in_features, cfg.hidden_size, cfg.o_proj_bias, shard)
        mlp.down_proj = RowParallelLinear(mlp.down_proj.in_features, cfg.hidden_size, False, shard)
    model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, shard)
    model.register_forward_hook(lambda _module, _args, logits: gather_vocab(logits, shard)[..., :vocab_size])


def gather_vocab(logits: torch.Tensor, shard: Shard) -> torch.Tensor:
    """Each rank's logits [..., n] side by side, [..., size * n], in rank order (the vocabulary's order)."""
    parts = _all_gather(logits.contiguous(), 0, shard.group)  # [size * first axis, ..., n]
    return parts.view(shard.size, *logits.shape).movedim(0, -2).flatten(-2)


def shard_part(name: str, full: tuple[int, ...], local: tuple[int, ...], rank: int) -> tuple[int, int, int] | None:
    """The part of checkpoint tensor `name` (shape `full`) that `rank` holds (shape `local`): (axis, start, stop)
    along the one split axis, fewer rows than `local` where the vocabulary runs out; None where every rank holds it
    whole. A row-parallel bias is whole on rank 0 and an empty part (zeros) elsewhere."""
    split = [axis for axis, (f, n) in enumerate(zip(full, local)) if f != n]
    if not split:
        return (0, 0, 0) if rank > 0 and name.endswith("o_proj.bias") else None
    (axis,) = split
    start = rank * local[axis]
    return axis, min(start, full[axis]), min(start + local[axis], full[axis])
