"""The warm tier: a local disk cache of whole shards, shared by every process on the node.

Layout of ``cache_dir``::

    .lock            flock'ed around every change of the resident set (fills, evictions)
    index.json       resident shards {sha256: bytes}, reservations of fills in flight, counters
                     (rebuilt from shards/ if a crash ever leaves it unreadable)
    shards/<sha256>.parquet          mtime = last use (LRU order)
    pins/<sha256>                    shared flock held by every process while it reads the shard
    tmp/<sha256>.<pid>.<random>      downloads in flight (renamed into shards/ when verified)

Rules that make it safe to share (the fsspec caching filesystems' known bugs are the anti-goals):

- A fill reserves its bytes first (evicting least-recently-used shards nobody is reading), so the
  directory never holds more than ``limit_bytes`` of shards plus reservations.
- One process fills a shard; others asking for it wait for the reservation to go away.
- A fill is written to ``tmp/``, its sha256 checked, then renamed into ``shards/``: no reader can
  ever open a partial file.
- A reader holds a shared ``flock`` on the shard's pin file while it reads; eviction takes the
  exclusive lock without blocking and skips the shard if it cannot.  The kernel drops the locks of
  a process that dies, and reservations of dead processes are dropped, so nothing leaks.
  A hit needs no global lock and writes nothing but the file's mtime.
- Size is checked on every open (and sha256 too with ``verify_on_open``); a bad file is discarded
  and refetched.  Parquet page CRCs catch flipped bytes when the shard is decoded.

Hits are memory-mapped (:meth:`WarmCache.pinned`), so decoding reads the page cache in place; a fill
hands back the bytes it just verified, so the new file is not read again.  The bookkeeping (pins,
the LRU touch, the index under the lock on fills and evictions) runs on whichever thread asks for a
shard: the reader does that on its fetch threads, never on the thread that hands out batches.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import pyarrow as pa

from components.data.manifest import ShardInfo
from components.data.shards import CorruptShardError


class WarmCacheError(IOError):
    """The warm cache cannot make room or a shard's bytes are wrong at the source."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class WarmRead:
    data: bytes | pa.Buffer  # the fetched bytes (fill) or the memory-mapped warm file (hit)
    tier: str  # "warm": was resident; "cold": this call fetched it from the cold tier
    cold_bytes: int  # bytes downloaded by this call


class WarmCache:
    def __init__(
        self,
        directory: str,
        limit_bytes: int,
        verify_on_open: bool = False,
        wait_timeout_s: float = 300.0,
        poll_s: float = 0.02,
    ):
        if limit_bytes <= 0:
            raise ValueError(f"warm cache limit must be > 0 bytes, got {limit_bytes}")
        self.dir = os.path.abspath(directory)
        self.limit = int(limit_bytes)
        self.verify_on_open = verify_on_open
        self.wait_timeout_s = wait_timeout_s
        self.poll_s = poll_s
        self._thread_lock = threading.Lock()
        for sub in ("shards", "pins", "tmp"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        self._lock_path = os.path.join(self.dir, ".lock")
        self._index_path = os.path.join(self.dir, "index.json")

    # ---- paths, pins and the index ---------------------------------------------------------
    def shard_path(self, sha256: str) -> str:
        return os.path.join(self.dir, "shards", f"{sha256}.parquet")

    def _pin(self, sha256: str) -> IO:
        """A shared lock on the shard's pin file: eviction leaves the shard alone while we hold
        it."""
        handle = open(os.path.join(self.dir, "pins", sha256), "a+")
        fcntl.flock(handle, fcntl.LOCK_SH)
        return handle

    def _try_lock_for_eviction(self, sha256: str) -> IO | None:
        handle = open(os.path.join(self.dir, "pins", sha256), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return handle
        except BlockingIOError:
            handle.close()
            return None

    @contextmanager
    def _locked(self) -> Iterator[dict]:
        """The index, exclusively, across threads and processes; saved on exit if changed."""
        with self._thread_lock, open(self._lock_path, "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                index = self._load_index()
                before = json.dumps(index, sort_keys=True)
                self._drop_dead(index)
                yield index
                after = json.dumps(index, sort_keys=True)
                if after != before:
                    # In place, under the lock (a rename costs ~10x more on overlay filesystems);
                    # a crash mid-write is healed by _load_index rebuilding from shards/.
                    with open(self._index_path, "a+") as f:
                        f.seek(0)
                        f.truncate()
                        f.write(after)
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _load_index(self) -> dict:
        try:
            with open(self._index_path) as f:
                index = json.loads(f.read())
        except FileNotFoundError:
            index = {}
        except json.JSONDecodeError:  # torn write of a crashed process: the files are the truth
            index = {"entries": self._scan_shards()}
        for key in ("entries", "reserved", "fills", "evictions"):
            index.setdefault(key, {})
        index.setdefault("max_used", 0)
        return index

    def _scan_shards(self) -> dict[str, int]:
        shard_dir = os.path.join(self.dir, "shards")
        return {
            name[: -len(".parquet")]: os.path.getsize(os.path.join(shard_dir, name))
            for name in os.listdir(shard_dir)
            if name.endswith(".parquet")
        }

    def _drop_dead(self, index: dict) -> None:
        for sha, res in list(index["reserved"].items()):
            if not _pid_alive(res["pid"]):
                del index["reserved"][sha]
                for name in os.listdir(os.path.join(self.dir, "tmp")):
                    if name.startswith(f"{sha}.{res['pid']}."):
                        _unlink(os.path.join(self.dir, "tmp", name))

    @staticmethod
    def _used(index: dict) -> int:
        return sum(index["entries"].values()) + sum(r["bytes"] for r in index["reserved"].values())

    def _forget(self, index: dict, sha: str) -> None:
        index["entries"].pop(sha, None)
        index["evictions"][sha] = index["evictions"].get(sha, 0) + 1
        _unlink(self.shard_path(sha))

    # ---- public ----------------------------------------------------------------------------
    @contextmanager
    def pinned(self, shard: ShardInfo, fetch: Callable[[], bytes]) -> Iterator[WarmRead]:
        """The shard's bytes, from the cache or filled from ``fetch`` (the cold tier) first; nobody
        can evict the shard inside the ``with`` block.  A hit is a zero-copy memory map."""
        for _ in range(3):
            tier, cold_bytes, pin, data = self._pin_or_fill(shard, fetch)
            try:
                if data is None:
                    data = self._map_pinned(shard)
                if data is not None:
                    yield WarmRead(data, tier, cold_bytes)
                    return
            finally:
                pin.close()
            self.discard(shard.sha256)  # corrupt or truncated: drop and refetch
        raise WarmCacheError(
            f"shard {shard.name}: warm copy in {self.dir} kept failing verification"
        )

    def read(self, shard: ShardInfo, fetch: Callable[[], bytes]) -> WarmRead:
        """The shard's bytes (a copy), from the cache or filled from ``fetch`` first."""
        with self.pinned(shard, fetch) as read:
            return WarmRead(bytes(read.data), read.tier, read.cold_bytes)

    def ensure(self, shard: ShardInfo, fetch: Callable[[], bytes]) -> tuple[str, int]:
        """Make the shard resident without reading it (prefetch). Returns (tier, cold bytes)."""
        tier, cold_bytes, pin, _ = self._pin_or_fill(shard, fetch)
        pin.close()
        return tier, cold_bytes

    def discard(self, sha256: str) -> None:
        """Drop a bad copy now (other readers of a corrupt file would discard it too)."""
        with self._locked() as index:
            if sha256 in index["entries"]:
                self._forget(index, sha256)

    def usage(self) -> dict:
        with self._locked() as index:
            return {
                "used_bytes": self._used(index),
                "limit_bytes": self.limit,
                "max_used_bytes": index["max_used"],
                "resident": sorted(index["entries"]),
                "fills": dict(index["fills"]),
                "evictions": dict(index["evictions"]),
            }

    # ---- internals -------------------------------------------------------------------------
    def _pin_or_fill(
        self, shard: ShardInfo, fetch: Callable[[], bytes]
    ) -> tuple[str, int, IO, bytes | None]:
        """(tier, cold bytes, pin, the verified bytes when this call filled the shard)."""
        if shard.bytes > self.limit:
            raise WarmCacheError(
                f"shard {shard.name} ({shard.bytes} bytes) is larger than the whole warm "
                f"cache limit ({self.limit} bytes): raise storage.warm_limit_bytes"
            )
        sha, path = shard.sha256, self.shard_path(shard.sha256)
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            # Hit: pin first, then look; an eviction racing us either saw the pin or already
            # unlinked.
            pin = self._pin(sha)
            if os.path.exists(path):
                _touch(path)  # LRU recency
                return "warm", 0, pin, None
            pin.close()
            with self._locked() as index:
                if os.path.exists(path):
                    continue
                index["entries"].pop(sha, None)  # a vanished file is not resident
                if sha not in index["reserved"] and self._make_room(index, shard.bytes):
                    token = uuid.uuid4().hex[:8]
                    index["reserved"][sha] = {
                        "pid": os.getpid(),
                        "bytes": shard.bytes,
                        "token": token,
                    }
                    break
            if time.monotonic() > deadline:
                raise WarmCacheError(
                    f"shard {shard.name}: no room in the warm cache {self.dir} after "
                    f"{self.wait_timeout_s:.0f}s "
                    f"(limit {self.limit} bytes, every resident shard is being read): raise "
                    "storage.warm_limit_bytes"
                )
            time.sleep(self.poll_s)
        return self._fill(shard, fetch, token)

    def _make_room(self, index: dict, need: int) -> bool:
        """Evict least-recently-used shards nobody is reading until ``need`` more bytes fit."""
        if self._used(index) + need <= self.limit:
            return True
        by_age = sorted(index["entries"], key=lambda sha: _mtime(self.shard_path(sha)))
        for sha in by_age:
            handle = self._try_lock_for_eviction(sha)
            if handle is None:
                continue  # being read
            try:
                self._forget(index, sha)
            finally:
                handle.close()
            if self._used(index) + need <= self.limit:
                return True
        return False

    def _fill(
        self, shard: ShardInfo, fetch: Callable[[], bytes], token: str
    ) -> tuple[str, int, IO, bytes]:
        sha = shard.sha256
        tmp = os.path.join(self.dir, "tmp", f"{sha}.{os.getpid()}.{token}")
        committed = False
        try:
            data = fetch()
            if len(data) != shard.bytes or hashlib.sha256(data).hexdigest() != sha:
                raise CorruptShardError(
                    f"shard {shard.name}: cold copy has {len(data)} bytes / sha256 "
                    f"{hashlib.sha256(data).hexdigest()[:12]}..., manifest says {shard.bytes} / "
                    f"{sha[:12]}..."
                )
            with open(tmp, "wb") as f:
                f.write(data)
            # Renamed outside the lock (slow on overlay filesystems): until the entry below exists
            # no one can evict it, and our reservation still counts its bytes.
            os.replace(tmp, self.shard_path(sha))
            _touch(self.shard_path(sha))
            with self._locked() as index:
                pin = self._pin(sha)  # before anyone can evict it
                index["reserved"].pop(sha, None)
                index["entries"][sha] = shard.bytes
                index["fills"][sha] = index["fills"].get(sha, 0) + 1
                index["max_used"] = max(index["max_used"], self._used(index))
                committed = True
            return "cold", len(data), pin, data
        finally:
            if not committed:
                _unlink(tmp)
                with self._locked() as index:
                    if (
                        sha not in index["entries"]
                    ):  # renamed but never recorded: only we could fill it
                        _unlink(self.shard_path(sha))
                    if index["reserved"].get(sha, {}).get("token") == token:
                        del index["reserved"][sha]

    def _map_pinned(self, shard: ShardInfo) -> pa.Buffer | None:
        """The pinned file memory-mapped, or None if its size (or sha256 with verify_on_open) is
        wrong.

        The map lives as long as any buffer made from it, even after the file is evicted
        (unlinked)."""
        try:
            with pa.memory_map(self.shard_path(shard.sha256), "r") as mapped:
                data = mapped.read_buffer()
        except FileNotFoundError:
            return None
        if data.size != shard.bytes:
            return None
        if self.verify_on_open and hashlib.sha256(data).hexdigest() != shard.sha256:
            return None
        return data


def _touch(path: str) -> None:
    """Set the mtime from the fine-grained clock: the kernel stamps files with a coarse,
    jiffy-resolution clock, so fills and hits a few ms apart would tie and scramble LRU order."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except FileNotFoundError:
        return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
