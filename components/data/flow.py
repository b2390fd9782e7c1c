"""Per-batch fingerprints and the data-flow report that training writes.

**Sample digest**: the first 16 bytes of sha256 over the sample's stream position, shard index and
row (three int64, little-endian) followed by its token ids (int32, little-endian).

**Batch fingerprint** (per rank and training step, over the step's micro-batches in order):
sha256 of the sample digests one after another.  Two runs agree on it only if the rank saw the same
tokens from the same shards and rows at the same stream positions, in the same order.

**Global step fingerprint**: the sum of the digests (as 128-bit integers, mod 2**128) of every
sample any rank trained on in that step.  A sum does not care which rank held a sample, so the
global fingerprint of step ``s`` is the same at any world size as long as a step consumes the same
stream positions (``world_size * batch_size * grad_accum_steps`` samples, see
:mod:`components.data.sampler`), while the positions inside the digests keep the order.

The report is a JSON list of entries, each with ``kind`` and ``rank``:

- ``reader``: one per rank and segment (``split``, ``seed``, ``dataset_digest``, ``world_size``,
``batch_size``);
- ``shard``: one per shard load (``epoch``, ``shard``, ``sha256``, ``bytes``, ``tier``,
``rows_used``);
- ``batch``: one per rank and step (``step``, ``world_size``, ``samples``, ``positions`` as
  ``[start, count]`` runs, ``shards`` as ``{name: samples}``, ``fingerprint``, ``sample_sum``).

A resumed run carries the report of the checkpoint it started from (:func:`merge_reports`), so its
report covers every step from 1.  :func:`first_difference` compares two reports step by step.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DIGEST_BYTES = 16
SUM_MODULUS = 1 << (8 * DIGEST_BYTES)
REPORT_FILE = "flow_report.json"


@dataclass
class BatchPrint:
    """The fingerprint material of one batch handed to training (one rank, one micro-batch)."""

    start: int  # stream position of its first sample (its samples are contiguous)
    samples: int
    digest: bytes  # sha256 of its sample digests
    sample_sum: int  # sum of its sample digests mod 2**128
    shards: dict[int, int]  # shard index -> samples taken from it


def sample_digests(
    positions: np.ndarray,
    shards: np.ndarray,
    rows: np.ndarray,
    tokens: np.ndarray | Sequence[np.ndarray],
) -> list[bytes]:
    """Digest of each sample: positions/shards/rows int[n]; tokens int[n, L] or n rows of L token
    ids (what was handed out; hashed as int32, so the stored rows need no copy)."""
    header = np.stack([positions, shards, rows], axis=1).astype("<i8")  # [n, 3]
    out = []
    for i in range(len(tokens)):
        row = tokens[i]
        if row.dtype != np.dtype("<i4") or not row.flags.c_contiguous:
            row = np.ascontiguousarray(row, dtype="<i4")
        h = hashlib.sha256(header[i].tobytes())
        h.update(row)
        out.append(h.digest()[:DIGEST_BYTES])
    return out


def batch_print(
    positions: np.ndarray,
    shards: np.ndarray,
    rows: np.ndarray,
    tokens: np.ndarray | Sequence[np.ndarray],
) -> BatchPrint:
    digests = sample_digests(positions, shards, rows, tokens)
    total = sum(int.from_bytes(d, "little") for d in digests) % SUM_MODULUS
    used, counts = np.unique(shards, return_counts=True)
    return BatchPrint(
        start=int(positions[0]),
        samples=len(digests),
        digest=hashlib.sha256(b"".join(digests)).digest(),
        sample_sum=total,
        shards=dict(zip(used.tolist(), counts.tolist())),
    )


def step_entry(
    step: int, rank: int, world_size: int, prints: list[BatchPrint], shard_names: list[str]
) -> dict:
    """The ``batch`` entry of one rank's training step (its micro-batches in order)."""
    runs: list[list[int]] = []
    for p in prints:
        if runs and runs[-1][0] + runs[-1][1] == p.start:
            runs[-1][1] += p.samples
        else:
            runs.append([p.start, p.samples])
    shards: dict[str, int] = {}
    for p in prints:
        for index, count in p.shards.items():
            shards[shard_names[index]] = shards.get(shard_names[index], 0) + count
    return {
        "kind": "batch",
        "step": step,
        "rank": rank,
        "world_size": world_size,
        "samples": sum(p.samples for p in prints),
        "positions": runs,
        "shards": shards,
        "fingerprint": hashlib.sha256(b"".join(p.digest for p in prints)).hexdigest()[
            : 2 * DIGEST_BYTES
        ],
        "sample_sum": f"{sum(p.sample_sum for p in prints) % SUM_MODULUS:0{2 * DIGEST_BYTES}x}",
    }


# ----------------------------------------------------------------------------- reports


def batch_entries(report: Iterable[dict]) -> list[dict]:
    return [e for e in report if e.get("kind") == "batch"]


def merge_reports(
    prior: list[dict] | None, current: list[dict], upto_step: int | None = None
) -> list[dict]:
    """The report of a resumed run: the checkpoint's report (steps <= ``upto_step``, the step it was
    taken at) followed by this segment's entries; a (step, rank) entry of this segment wins."""
    if not prior:
        return list(current)
    new_keys = {(e["step"], e["rank"]) for e in batch_entries(current)}
    kept = [
        e
        for e in prior
        if e.get("kind") != "batch"
        or (
            (upto_step is None or e["step"] <= upto_step) and (e["step"], e["rank"]) not in new_keys
        )
    ]
    return kept + list(current)


@dataclass
class GlobalStep:
    step: int
    fingerprint: str  # sum of every rank's sample_sum, hex
    samples: int
    world_size: int
    ranks: dict[int, dict] = field(default_factory=dict)  # rank -> its batch entry


def global_steps(report: Iterable[dict]) -> dict[int, GlobalStep]:
    """Step -> the global batch of that step, combined from the ranks' entries."""
    per_step: dict[int, dict[int, dict]] = {}
    for e in batch_entries(report):
        per_step.setdefault(int(e["step"]), {})[int(e["rank"])] = e  # a later duplicate wins
    out = {}
    for step, ranks in sorted(per_step.items()):
        total = sum(int(e["sample_sum"], 16) for e in ranks.values()) % SUM_MODULUS
        out[step] = GlobalStep(
            step=step,
            fingerprint=f"{total:0{2 * DIGEST_BYTES}x}",
            samples=sum(int(e["samples"]) for e in ranks.values()),
            world_size=max(int(e["world_size"]) for e in ranks.values()),
            ranks=ranks,
        )
    return out


@dataclass
class Difference:
    step: int
    reason: str  # what differs, in words
    a: GlobalStep | None
    b: GlobalStep | None


def first_difference(a: Iterable[dict], b: Iterable[dict]) -> Difference | None:
    """The first training step whose global batch differs between reports ``a`` and ``b`` (a step
    present in only one of them counts as a difference); None when every step agrees."""
    sa, sb = global_steps(a), global_steps(b)
    for step in sorted(set(sa) | set(sb)):
        x, y = sa.get(step), sb.get(step)
        if x is None or y is None:
            which = "A" if y is None else "B"
            return Difference(step, f"step {step} is only in report {which}", x, y)
        incomplete = [(name, s) for name, s in (("A", x), ("B", y)) if len(s.ranks) != s.world_size]
        if incomplete:
            name, s = incomplete[0]
            return Difference(
                step,
                f"report {name} has {len(s.ranks)} of {s.world_size} ranks at step {step}",
                x,
                y,
            )
        if x.samples != y.samples:
            return Difference(
                step, f"global batch of {x.samples} samples in A, {y.samples} in B", x, y
            )
        if x.fingerprint != y.fingerprint:
            return Difference(step, "the global batches differ", x, y)
    return None


def describe(diff: Difference) -> str:
    """Human-readable lines naming the step, the ranks and where their samples came from."""
    lines = [f"first differing step: {diff.step} ({diff.reason})"]
    for name, side in (("A", diff.a), ("B", diff.b)):
        if side is None:
            continue
        lines.append(
            f"  {name}: fingerprint {side.fingerprint}, {side.samples} samples, world size "
            f"{side.world_size}"
        )
        other = diff.b if name == "A" else diff.a
        for rank, e in sorted(side.ranks.items()):
            twin = (
                other.ranks.get(rank)
                if other is not None and other.world_size == side.world_size
                else None
            )
            mark = (
                ""
                if twin is None
                else ("  (same)" if twin["fingerprint"] == e["fingerprint"] else "  (differs)")
            )
            shards = ", ".join(f"{k} x{v}" for k, v in sorted(e["shards"].items()))
            lines.append(
                f"    rank {rank}: {e['fingerprint']} positions {e['positions']} from "
                f"{shards}{mark}"
            )
    return "\n".join(lines)


def load_report(path: str | Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ValueError(f"{path}: not a data-flow report (a JSON list of entries)")
    return data
