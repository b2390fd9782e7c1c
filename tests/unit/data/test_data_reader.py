from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch

from components.data.reader import TieredReader
from components.data.shards import decode_shard


def _reader(small_dataset, tmp_path, **kw) -> TieredReader:
    result, storage = small_dataset
    args = dict(
        split="train",
        storage=replace(storage, warm_dir=str(tmp_path / "warm")),
        seed=11,
        batch_size=4,
        prefetch_batches=2,
    )
    args.update(kw)
    return TieredReader(result.manifest.uri, **args)


def _all_rows(small_dataset, split="train") -> Counter:
    """Multiset of row contents (the stdlib repeats some text, so rows are not all distinct)."""
    result, _ = small_dataset
    m = result.manifest
    rows = [decode_shard(open(m.shard_uri(s), "rb").read(), m.row_len) for s in m.shards(split)]
    return Counter(r.astype(np.int64).tobytes() for r in np.concatenate(rows))


def _keys(batches) -> list[bytes]:
    return [row.numpy().tobytes() for b in batches for row in b]


@pytest.mark.parametrize("block", [1, 4])
def test_ranks_read_disjoint_parts_covering_the_epoch(small_dataset, tmp_path, block):
    world = 3
    readers = [
        _reader(small_dataset, tmp_path, rank=r, world_size=world, shuffle_block_shards=block)
        for r in range(world)
    ]
    parts = [_keys(list(r)) for r in readers]
    assert len({len(p) for p in parts}) == 1  # every rank takes the same number of steps
    seen = [k for p in parts for k in p]
    everything = _all_rows(small_dataset)
    assert not Counter(seen) - everything, "a sample was read twice (by two ranks)"
    n = readers[0].samples_per_epoch
    assert len(seen) == n - n % (world * 4)  # only the last partial global batch is dropped
    for r in readers:
        assert r.state_dict()["position"] == n and r.epoch == 1
        batch = next(iter(r))
        assert batch.dtype == torch.int64 and batch.shape == (4, 17)


def test_epochs_are_reshuffled_deterministically(small_dataset, tmp_path):
    a = _reader(small_dataset, tmp_path)
    e0 = _keys(a)
    e1 = _keys(a)
    dropped = a.samples_per_epoch % 4  # each epoch drops its own last partial batch
    assert e0 != e1 and sum((Counter(e0) - Counter(e1)).values()) <= dropped
    b = _reader(small_dataset, tmp_path, prefetch_batches=0)  # no hot prefetch: same stream
    assert _keys(b) == e0
    b.set_epoch(1)
    assert _keys(b) == e1
    assert _keys(_reader(small_dataset, tmp_path, seed=12)) != e0


@pytest.mark.parametrize("block", [1, 4])
@pytest.mark.parametrize("new_world", [2, 3, 1])
def test_resume_continues_at_the_exact_next_sample(small_dataset, tmp_path, new_world, block):
    """Run 2 ranks for a while, 'crash', resume with new_world ranks: the global stream is
    intact (shard by shard, and with the rows of 4 shards shuffled together)."""
    steps_before, steps_after, world = 37, 45, 2
    tmp_path = tmp_path / f"block{block}"

    def _reader(*args, **kw):
        return globals()["_reader"](*args, shuffle_block_shards=block, **kw)

    def run(world_size, state, steps):
        readers = [
            _reader(small_dataset, tmp_path, rank=r, world_size=world_size)
            for r in range(world_size)
        ]
        iters = []
        for r in readers:
            if state is not None:
                r.load_state_dict(state)
            iters.append(r.iter_steps())
        consumed = []
        for _ in range(steps):
            # global batch = rank 0's rows then rank 1's ...: the order of the global stream
            consumed += [k for it in iters for k in _keys([next(it)])]
        states = [r.state_dict() for r in readers]
        assert all(s == states[0] for s in states)
        return consumed, states[0]

    n = _reader(small_dataset, tmp_path).samples_per_epoch
    start = {"position": n - 100}  # so that the run crosses into epoch 1
    first, state = run(world, start, steps_before)
    second, _ = run(new_world, state, steps_after)
    reference = _reader(small_dataset, tmp_path, world_size=1, batch_size=1, prefetch_batches=0)
    reference.load_state_dict(start)
    expected = _keys(itertools.islice(reference.iter_steps(), len(first) + len(second)))
    assert first + second == expected
    assert state["position"] == n - 100 + steps_before * world * 4 and state["epoch"] == 1
    # the canonical stream itself: each epoch is a permutation of the split
    whole = _reader(small_dataset, tmp_path, world_size=1, batch_size=1, prefetch_batches=0)
    assert Counter(_keys(itertools.islice(whole.iter_steps(), n))) == _all_rows(small_dataset)


def test_state_of_another_dataset_or_seed_is_refused(small_dataset, tmp_path):
    r = _reader(small_dataset, tmp_path)
    with pytest.raises(ValueError, match="dataset_digest"):
        r.load_state_dict({"position": 5, "dataset_digest": "x" * 64})
    with pytest.raises(ValueError, match="seed"):
        r.load_state_dict({**r.state_dict(), "seed": 99})


def test_eval_reads_the_same_rows_at_any_rank_split(small_dataset, tmp_path):
    val = [_reader(small_dataset, tmp_path, split="val", rank=r, world_size=2) for r in range(2)]
    a = [list(v.iter_eval(max_batches=3)) for v in val]
    b = [list(v.iter_eval(max_batches=3)) for v in val]
    assert all(len(x) == 3 for x in a)
    assert all(torch.equal(x, y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    assert not Counter(_keys(a[0]) + _keys(a[1])) - _all_rows(small_dataset, "val")
    assert val[0].state_dict()["position"] == 0
    # one global batch of 8 split over 2 ranks = the same 8 rows as one rank reading 8
    one = _reader(small_dataset, tmp_path, split="val", batch_size=8)
    whole = [torch.cat([x, y]) for x, y in zip(*a)]
    assert all(torch.equal(x, y) for x, y in zip(whole, one.iter_eval(max_batches=3)))


def test_eval_sample_spans_every_validation_shard(small_dataset, tmp_path):
    """Issue 16: the held-out sample was the split's first rows (its first shard or two, a few
    documents), and both models' loss on them rose once training moved on to other shards. The
    sample must draw from every shard of the split, in stored order."""
    result, _ = small_dataset
    m = result.manifest
    shards = m.shards("val")
    assert len(shards) >= 4  # else this test could not tell a spread from the first rows
    per_shard = [
        decode_shard(open(m.shard_uri(s), "rb").read(), m.row_len).astype(np.int64) for s in shards
    ]
    where = {row.tobytes(): i for i, rows in enumerate(per_shard) for row in rows}
    val = _reader(small_dataset, tmp_path, split="val", batch_size=2)
    n = len(shards)
    sample = _keys(val.iter_eval(max_batches=n))  # 2n rows
    hit = [where[k] for k in sample]
    assert set(hit) == set(range(n)) and hit == sorted(hit)
    # the whole split (no max_batches): every row once, in stored order
    everything = _keys(val.iter_eval())
    stored = [r.tobytes() for rows in per_shard for r in rows]
    assert everything == stored[: len(everything)] and len(stored) - len(everything) < 2


def test_spread_order_maps_evenly_and_repeats():
    from components.data.sampler import SpreadOrder

    order = SpreadOrder([10, 10, 10, 10], 4)  # one row from the middle of each shard
    epochs, shards, rows = order.locate(np.arange(8))
    assert shards.tolist() == [0, 1, 2, 3] * 2 and rows.tolist() == [5] * 8
    assert epochs.tolist() == [0] * 4 + [1] * 4
    assert order.shards_from(1, 2) == [1, 2] and order.shards_from(0, 9, end=2) == [0, 1]
    full = SpreadOrder([3, 2], 100)  # larger than the split: the split itself
    assert full.epoch_size == 5 and full.positions(np.arange(5)).tolist() == [0, 1, 2, 3, 4]


def test_stats_and_flow_report(small_dataset, tmp_path):
    r = _reader(small_dataset, tmp_path)
    list(r)
    s = r.stats()
    n_shards = len(r.shards)
    assert s["cold_fills"] == n_shards and s["warm_hit_rate"] == 0.0 and s["bytes_cold"] > 0
    assert s["bytes_hot"] == s["steps"] * 4 * 17 * 8 and s["data_wait_s"] >= 0
    list(r)  # second epoch: all from the warm (or hot) tier
    s2 = r.stats()
    assert (
        s2["cold_fills"] == n_shards and s2["warm_hits"] >= n_shards - 3
    )  # a few still hot in memory
    assert s2["warm_hit_rate"] == s2["warm_hits"] / (s2["warm_hits"] + n_shards)
    report = r.flow_report()
    assert (
        report[0]["kind"] == "reader" and report[0]["dataset_digest"] == r.manifest.dataset_digest
    )
    flow = [e for e in report if e["kind"] == "shard"]
    assert {e["epoch"] for e in flow} == {0, 1}
    assert {e["tier"] for e in flow if e["epoch"] == 0} == {"cold"}
    assert {e["tier"] for e in flow if e["epoch"] == 1} <= {"warm", "hot"}
    by_name = {s.name: s.sha256 for s in r.shards}
    assert all(by_name[e["shard"]] == e["sha256"] and e["rank"] == 0 for e in flow)
    assert sum(e["rows_used"] for e in flow) == s2["steps"] * 4


def test_bad_arguments_are_named(small_dataset, tmp_path):
    with pytest.raises(ValueError, match="rank=2"):
        _reader(small_dataset, tmp_path, rank=2, world_size=2)
    with pytest.raises(KeyError, match="split 'test'"):
        _reader(small_dataset, tmp_path, split="test")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _reader(small_dataset, tmp_path, split="val", batch_size=100_000)


def test_a_shuffle_block_mixes_its_shards_and_keeps_the_epoch_a_permutation():
    """Issue 16: one shard at a time, a run's batches for a shard's worth of steps came from a few
    documents. With blocks of 4 shards every batch draws on the block's shards, each epoch is
    still every (shard, row) once, and prefetching names the whole block first."""
    from components.data.sampler import GlobalOrder

    shard_rows = [50, 64, 7, 64, 64, 30, 64, 64, 64, 11]
    epoch = sum(shard_rows)
    sequential = GlobalOrder(shard_rows, seed=3)
    blocked = GlobalOrder(shard_rows, seed=3, block_shards=4)
    for order in (sequential, blocked):
        _, shards, rows = order.locate(np.arange(2 * epoch))
        pairs = set(zip(shards[:epoch].tolist(), rows[:epoch].tolist()))
        assert len(pairs) == epoch and all(r < shard_rows[s] for s, r in pairs)
        assert (shards[:epoch] != shards[epoch:]).any()  # the next epoch is reshuffled
    first_block = blocked.shards_from(0, 4)
    _, shards, _ = blocked.locate(np.arange(16 * 8))  # 16 batches of 8 rows
    per_batch = [len(set(shards[i : i + 8].tolist())) for i in range(0, 128, 8)]
    assert set(shards.tolist()) <= set(first_block) and min(per_batch) >= 2
    assert sum(per_batch) / len(per_batch) > 2.5  # ~3 of the block's 4 shards in 8 rows
    _, shards, _ = sequential.locate(np.arange(16 * 8))
    assert max(len(set(shards[i : i + 8].tolist())) for i in range(0, 128, 8)) <= 2
    # prefetch order: the rest of the current block before the next block
    position = sum(shard_rows[s] for s in first_block) - 1  # the first block's last row
    assert blocked.shards_from(position, 5)[:4] == first_block
    assert blocked.shards_from(position + 1, 1) == [blocked.shards_from(0, 5)[4]]
    assert GlobalOrder(shard_rows, 3, shuffle=False, block_shards=4).block_shards == 1
