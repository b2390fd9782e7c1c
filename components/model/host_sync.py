"""Count the operations that make the host wait for the device (a GPU "host sync").

A CUDA host sync stalls the Python thread until every queued kernel has finished, so the GPU
runs dry while the host catches up. On this CPU-only machine nothing stalls, but the same ops
run, so counting them here tells how many syncs the code would make on a GPU.

Counted (``torch.utils._python_dispatch.TorchDispatchMode`` sees every aten op):

* ``_local_scalar_dense`` — ``.item()``, ``int(t)``, ``float(t)``, ``bool(t)``, ``if t:``;
* ops whose output size depends on values: ``nonzero``, ``masked_select``, ``unique*``,
  boolean-mask indexing (``x[mask]``, ``x[mask] = v``), ``repeat_interleave`` without
  ``output_size``;
* ``bincount`` and ``histc``: their CUDA kernels read ``max()`` back to size the output;
* a device -> host copy (``.cpu()``, ``.to("cpu")`` of a CUDA tensor);
* ``Tensor.tolist()`` / ``Tensor.numpy()``: on CPU they read memory directly without any aten
  op, so the counter wraps them while it is active (on CUDA the device -> host copy inside is
  not counted a second time).

``torch.cuda.set_sync_debug_mode`` is the GPU's own detector. The syncs the code makes on
purpose are each wrapped in :func:`documented_sync` under a name listed in docs/model.md ("Host
syncs"): ``infra/gpu_check.py`` runs a bf16 training step under
``set_sync_debug_mode("error")``, which the documented syncs switch off for their own duration, so
any other sync raises where it happens; :class:`HostSyncCounter` files the syncs it counts under
the documented name they happen in (``documented``) or as ``undocumented``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator

import torch

# Private module on purpose: TorchDispatchMode is the documented way to see every aten op
# (torch's __torch_dispatch__ guide), but torch 2.13 exports it only from this private module;
# TorchFunctionMode (public, torch.overrides) sees Python calls, not the ops a sync comes from.
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# the documented syncs this thread is inside (innermost last)
_inside = threading.local()


def _stack() -> list[str]:
    if not hasattr(_inside, "names"):
        _inside.names = []
    return _inside.names


@contextlib.contextmanager
def documented_sync(name: str, device: torch.device) -> Iterator[None]:
    """Marks one of the host syncs the code makes on purpose (``name``: its entry in docs/model.md
    "Host syncs"). On CUDA, a sync debug mode in force (``torch.cuda.set_sync_debug_mode``) is
    set to "default" for the duration and restored after, so the GPU check's "error" mode raises
    only at syncs that are not documented."""
    names = _stack()
    names.append(name)
    restore = 0
    if device.type == "cuda":
        restore = torch.cuda.get_sync_debug_mode()
        if restore:
            torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        if restore:
            torch.cuda.set_sync_debug_mode(restore)
        names.pop()


SIZE_FROM_VALUES = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten._local_scalar_dense.default,
    aten.bincount.default,
    aten.histc.default,
    aten.is_nonzero.default,
    aten.equal.default,
}
# aten ops of the wrapped Tensor methods: torch.Tensor.tolist / numpy run none on CPU
WRAPPED_METHODS = ("tolist", "numpy")


def _has_bool_index(indices) -> bool:
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
        for i in indices
        if i is not None
    )


def _is_device_to_host(func, args, kwargs) -> bool:
    if func in (aten._to_copy.default,):
        src, dst = args[0], kwargs.get("device")
        return src.device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
    if func is aten.copy_.default:
        dst, src = args[0], args[1]
        return src.device.type != "cpu" and dst.device.type == "cpu"
    return False


def sync_op_name(func, args, kwargs) -> str | None:
    """The name under which ``func(*args, **kwargs)`` is counted, or None when it needs no sync."""
    if func in SIZE_FROM_VALUES:
        return func.name()
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave (no output_size)"
    if func in (
        aten.index.Tensor,
        aten.index_put_.default,
        aten.index_put.default,
    ) and _has_bool_index(args[1]):
        return f"{func.name()} (boolean mask)"
    if _is_device_to_host(func, args, kwargs):
        return "device-to-host copy"
    return None


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.total`` and ``syncs.by_op``."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self.documented: Counter[str] = Counter()  # per documented_sync name
        self.undocumented: Counter[str] = Counter()  # per op, outside any documented_sync
        self._saved: dict[str, object] = {}
        self._in_method = (
            False  # inside a wrapped tolist()/numpy(): its own copy is already counted
        )

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = sync_op_name(func, args, kwargs)
        if name is not None and not self._in_method:
            self._count(name)
        return func(*args, **kwargs)

    def _count(self, op: str) -> None:
        self.by_op[op] += 1
        names = _stack()
        if names:
            self.documented[names[-1]] += 1
        else:
            self.undocumented[op] += 1

    def __enter__(self):
        for method in WRAPPED_METHODS:
            # remember whether torch.Tensor defines it itself or inherits it from the C base
            self._saved[method] = torch.Tensor.__dict__.get(method)
            setattr(torch.Tensor, method, self._counting(method, getattr(torch.Tensor, method)))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, own in self._saved.items():
                if own is None:
                    delattr(torch.Tensor, method)
                else:
                    setattr(torch.Tensor, method, own)
            self._saved.clear()

    def _counting(self, method: str, original):
        def wrapper(tensor, *args, **kwargs):
            self._count(f"Tensor.{method}")
            outer, self._in_method = self._in_method, True
            try:
                return original(tensor, *args, **kwargs)
            finally:
                self._in_method = outer

        return wrapper
