"""The block manager and the scheduler, without a model: allocation, hashing, reference counts, eviction, the token
budget, admission and preemption order."""

import pytest

from qwen3gen.engine.block_manager import SCRATCH_BLOCKS, BlockManager
from qwen3gen.engine.request import Request, Status
from qwen3gen.engine.scheduler import Scheduler
from qwen3gen.sampling import SamplingParams


def request(name: str, tokens: list[int], max_new_tokens: int = 8, **params: object) -> Request:
    return Request(name, tokens, SamplingParams(max_new_tokens=max_new_tokens, **params), frozenset(), 0)


def computed(step) -> None:
    """What the engine does after a step's forward pass."""
    for r, n in zip(step.requests, step.num_tokens):
        r.num_computed += n


def test_allocation_refcounts_and_release():
    blocks = BlockManager(num_blocks=9, block_size=4)
    assert blocks.num_free == 8 and blocks.capacity_tokens == 32  # block 0 is the scratch block
    a = request("a", list(range(10)))
    assert blocks.grow(a, 10) and len(a.block_table) == 3 and 0 not in a.block_table
    assert blocks.num_free == 5
    assert not blocks.grow(a, 40) and len(a.block_table) == 3  # nothing taken when it cannot be had
    blocks.release(a)
    assert blocks.num_free == 8 and a.block_table == [] and a.num_computed == 0


def test_chained_hashes_share_prefixes_with_refcounts():
    blocks = BlockManager(num_blocks=12, block_size=4)
    system = list(range(100, 108))  # two full blocks
    a = request("a", system + [1, 2, 3])
    blocks.admit(a, blocks.match_prefix(a))
    blocks.grow(a, a.num_tokens)
    blocks.commit(a, a.num_tokens)
    b = request("b", system + [9, 9, 9, 9, 9])
    hits = blocks.match_prefix(b)
    assert hits == a.block_table[:2]
    blocks.admit(b, hits)
    assert b.num_computed == 8 and b.num_cached_tokens == 8 and blocks.ref_counts[hits[0]] == 2
    assert blocks.hit_tokens == 8 and blocks.queried_tokens == a.prompt_len + b.prompt_len
    # Same second block's tokens after another first block: a different chain, no hit.
    c = request("c", [7, 7, 7, 7] + system[4:] + [1])
    assert blocks.match_prefix(c) == []
    # A prompt that is all cached still leaves its last token to compute.
    d = request("d", system)
    assert blocks.match_prefix(d) == a.block_table[:1]


def test_freed_cached_blocks_stay_reusable_until_evicted_least_recent_first():
    blocks = BlockManager(num_blocks=1 + 4, block_size=2)
    a = request("a", [1, 2, 3, 4, 5])
    blocks.grow(a, 5)
    blocks.commit(a, 4)  # two full blocks cached, the third part-full
    first, second, partial = a.block_table
    blocks.release(a)
    assert blocks.num_free == 4
    # The part-full block is taken first, then the one never used, then the freed cached blocks, later ones first.
    assert list(blocks.free) == [partial, 4, second, first]
    again = request("again", [1, 2, 3, 4, 9])
    assert blocks.match_prefix(again) == [first, second]
    x = request("x", [0] * 6)
    blocks.grow(x, 6)  # takes the part-full one, the other unused one, then evicts `second`
    assert second in x.block_table and first not in x.block_table
    assert blocks.match_prefix(again) == [first]


def test_budget_decodes_first_then_chunks_then_admission():
    blocks = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(blocks, max_running=8, max_batched_tokens=10)
    long, short = request("long", list(range(25))), request("short", list(range(3)))
    scheduler.add(long)
    scheduler.add(short)
    step = scheduler.schedule()
    assert [r.request_id for r in step.requests] == ["long"] and step.num_tokens == [10]  # a chunk of the budget
    computed(step)
    step = scheduler.schedule()
    assert [(r.request_id, n) for r, n in zip(step.requests, step.num_tokens)] == [("long", 10)]
    computed(step)
    step = scheduler.schedule()  # the last 5 of the long prompt, and the short one admitted beside it
    assert [(r.request_id, n) for r, n in zip(step.requests, step.num_tokens)] == [("long", 5), ("short", 3)]
    computed(step)
    long.token_ids.append(1)
    short.token_ids.append(1)
    waiting = request("new", list(range(100, 130)))
    scheduler.add(waiting)
    step = scheduler.schedule()  # both decodes first, then a chunk of the new prompt in the rest of the budget
    assert [(r.request_id, n) for r, n in zip(step.requests, step.num_tokens)] == [("long", 1), ("short", 1), ("new", 8)]


def test_running_limit_and_pool_hold_admission_back():
    blocks = BlockManager(num_blocks=1 + 4, block_size=4)
    scheduler = Scheduler(blocks, max_running=2, max_batched_tokens=100)
    for name in "abc":
        scheduler.add(request(name, list(range(4))))
    step = scheduler.schedule()
    assert [r.request_id for r in step.requests] == ["a", "b"] and len(scheduler.waiting) == 1
    scheduler.remove(step.requests[0])
    big = request("big", list(range(16)))
    scheduler.waiting.appendleft(big)  # needs 4 blocks, 3 are free: waits, and nothing behind it jumps the queue
    assert not scheduler.schedule().requests[1:] and scheduler.waiting[0] is big


def test_preemption_takes_the_youngest_and_requeues_it_first():
    blocks = BlockManager(num_blocks=1 + 3, block_size=4)
    scheduler = Scheduler(blocks, max_running=8, max_batched_tokens=100)
    old, young = request("old", [1, 2, 3, 4]), request("young", [5, 6, 7, 8])
    scheduler.add(old)
    scheduler.add(young)
    computed(scheduler.schedule())
    for r in (old, young):
        r.token_ids.append(0)
    step = scheduler.schedule()  # both need a second block; one is free
    assert [r.request_id for r in step.requests] == ["old"] and step.preempted == [young]
    assert young.status is Status.WAITING and young.num_computed == 0 and scheduler.waiting[0] is young
    assert young.block_table == [] and scheduler.preemptions == 1
    computed(step)
    scheduler.remove(old)
    step = scheduler.schedule()  # recomputed, its output included; its own full block still cached
    assert step.requests == [young] and young.num_computed == 4 and step.num_tokens == [1]


def test_a_lone_request_that_outgrows_the_pool_preempts_itself():
    blocks = BlockManager(num_blocks=1 + 1, block_size=4)
    scheduler = Scheduler(blocks, max_running=8, max_batched_tokens=100)
    r = request("r", [1, 2, 3, 4])
    scheduler.add(r)
    computed(scheduler.schedule())
    r.token_ids.append(0)
    step = scheduler.schedule()
    assert step.preempted == [r] and not step.requests and blocks.num_free == 1


def test_n_samples_admitted_together_share_the_prompt_blocks():
    blocks = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(blocks, max_running=8, max_batched_tokens=100)
    prompt = list(range(13))  # three full blocks and one token
    samples = [request(f"s{i}", prompt) for i in range(4)]
    for s in samples:
        scheduler.add(s)
    step = scheduler.schedule()
    assert step.num_tokens == [13, 1, 1, 1]
    assert all(s.block_table[:3] == samples[0].block_table[:3] for s in samples)
    assert blocks.num_free == 63 - 3 - 4  # the shared three, and each sample's own last block


def test_prompt_logprobs_requests_skip_the_cache():
    blocks = BlockManager(num_blocks=64, block_size=4)
    scheduler = Scheduler(blocks, max_running=8, max_batched_tokens=100)
    a, b = request("a", list(range(9))), request("b", list(range(9)), prompt_logprobs=0)
    scheduler.add(a)
    scheduler.add(b)
    assert scheduler.schedule().num_tokens == [9, 9]


def test_block_manager_needs_a_block_to_hand_out():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=SCRATCH_BLOCKS, block_size=16)


def test_a_cpu_pool_takes_memory_only_as_its_blocks_are_written():
    """A CPU KV pool is zeros from the OS's zero pages: made at once, resident only where written (torch.zeros wrote
    every byte of a pool of gigabytes at load)."""
    import re
    from pathlib import Path

    import torch

    import qwen3gen
    from qwen3gen.engine.kv_pool import KVPool

    def resident() -> int:
        return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    before = resident()
    pool = KVPool.sized(qwen3gen.preset("0.6B"), "512MiB", 16, torch.bfloat16, torch.device("cpu"))
    assert pool.nbytes > 500 * 2**20 and resident() - before < 64 * 2**20
    keys = pool.caches[3][0]
    assert keys.dtype == torch.bfloat16 and not keys[:2].any()
    keys[1] = 1.0
    assert keys[1].all() and not keys[2].any()
