"""Which pool blocks each request holds, and the prefix cache over them.

A full block is known by a hash chained to the previous block's (so equal hashes mean equal token prefixes, checked
against the block's own tokens as well), and is shared by every request whose prompt starts with those tokens, with a
reference count. A block whose count drops to zero keeps its contents and its hash: it is free, and reusable as a
cache hit until a new allocation takes it, least recently freed first. Block 0 is never handed out: it is the scratch
block that padding rows of a recorded CUDA graph write to.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .request import Request

SCRATCH_BLOCKS = 1


def chained_hash(previous: int | None, tokens: Sequence[int]) -> int:
    return hash((previous, tuple(tokens)))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= SCRATCH_BLOCKS:
            raise ValueError(f"a pool of {num_blocks} blocks has none to hand out")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self.hashes: list[int | None] = [None] * num_blocks
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(SCRATCH_BLOCKS, num_blocks))  # oldest first
        self.hit_tokens = 0  # prompt tokens found in the cache
        self.queried_tokens = 0  # prompt tokens looked up

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - SCRATCH_BLOCKS) * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def match_prefix(self, request: Request) -> list[int]:
        """The cached blocks that hold the longest prefix of the request's tokens, leaving at least its last token to
        compute (its logits are needed). Changes nothing."""
        size, tokens = self.block_size, request.token_ids
        blocks, previous = [], None
        for start in range(0, (len(tokens) - 1) // size * size, size):
            chunk = tokens[start : start + size]
            previous = chained_hash(previous, chunk)
            block = self.cached.get(previous)
            if block is None or self.tokens[block] != tuple(chunk):
                break
            blocks.append(block)
        return blocks

    def can_admit(self, hits: Sequence[int], tokens: int) -> bool:
        """Whether the blocks for `tokens` tokens, the first of them the cached `hits`, can be had now."""
        reclaimed = sum(1 for b in hits if self.ref_counts[b] == 0)  # free ones, which a hit takes out of the free list
        return self.blocks_for(tokens) - len(hits) + reclaimed <= self.num_free

    def admit(self, request: Request, hits: Sequence[int]) -> None:
        """Give a request without blocks its cached prefix: its first len(hits) blocks are computed already."""
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
        request.block_table = list(hits)
        request.block_hashes = [self.hashes[b] for b in hits]
        request.num_computed = len(hits) * self.block_size
        if not request.admitted:
            self.queried_tokens += request.prompt_len
            self.hit_tokens += request.num_computed
            request.num_cached_tokens = request.num_computed
            request.admitted = True

    def grow(self, request: Request, tokens: int) -> bool:
        """Give the request blocks for its first `tokens` tokens; False (and nothing taken) when the pool lacks them."""
        needed = self.blocks_for(tokens) - len(request.block_table)
        if needed > self.num_free:
            return False
        for _ in range(needed):
            request.block_table.append(self._take_free())
        return True

    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.hashes[block] is not None:  # evicted from the cache
            if self.cached.get(self.hashes[block]) == block:
                del self.cached[self.hashes[block]]
            self.hashes[block] = self.tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def commit(self, request: Request, tokens: int) -> None:
        """Enter the request's full blocks among its first `tokens` tokens into the cache. Called for the tokens a step
        is about to compute, once that step's plan is final: another request of the same step that hits these blocks
        reads them after they are written, since every layer writes the step's keys and values before attending."""
        size = self.block_size
        tokens = min(tokens, len(request.token_ids))  # a pending token's block is entered once the token is known
        for index in range(len(request.block_hashes), tokens // size):
            block, chunk = request.block_table[index], tuple(request.token_ids[index * size : (index + 1) * size])
            digest = chained_hash(request.block_hashes[-1] if request.block_hashes else None, chunk)
            request.block_hashes.append(digest)
            if digest not in self.cached:  # else an equal block is cached already: that one stays the hit
                self.cached[digest], self.hashes[block], self.tokens[block] = block, digest, chunk

    def reset_cache(self) -> None:
        """Forget every cached block (their contents stay, as plain free or held blocks)."""
        self.cached.clear()
        self.hashes = [None] * self.num_blocks
        self.tokens = [None] * self.num_blocks

    def release(self, request: Request) -> None:
        """Drop the request's blocks: cached ones stay reusable (the last of a request's blocks evicted first), the
        others go to the front of the free list, to be taken first."""
        for block in reversed(request.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.hashes[block] is None:
                    self.free.move_to_end(block, last=False)
        request.block_table, request.block_hashes, request.num_computed = [], [], 0
