"""The hot tier: a bounded background thread that produces the next batches while the model
computes.

``Prefetcher(make_iter, depth)`` runs ``make_iter()`` on a daemon thread and keeps at most ``depth``
items ready in a queue (depth 0 = no thread: items are produced on demand).  Errors raised by the
producer re-raise in the consumer; ``close()`` stops the producer promptly.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


class _Failed:
    """The producer's exception, on its way to the consumer."""

    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher(Iterator[T]):
    def __init__(self, make_iter: Callable[[], Iterator[T]], depth: int):
        self.depth = depth
        self._stop = threading.Event()
        if depth <= 0:
            self._iter: Iterator[T] | None = make_iter()
            self._thread = None
            return
        self._iter = None
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(
            target=self._produce, args=(make_iter,), name="moeops-hot-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, make_iter: Callable[[], Iterator[T]]) -> None:
        try:
            for item in make_iter():
                if not self._put(item):
                    return
        except BaseException as exc:
            self._put(_Failed(exc))
            return
        self._put(_END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> T:
        if self._thread is None:
            assert self._iter is not None
            return next(self._iter)
        item = self._queue.get()
        if item is _END:
            self._queue.put(_END)  # stay exhausted
            raise StopIteration
        if isinstance(item, _Failed):
            raise item.exc
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
