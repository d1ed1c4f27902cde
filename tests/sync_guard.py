"""``forbid_host_syncs()``: every usual host-device synchronisation raises inside the block, the CPU stand-in for
``torch.cuda.set_sync_debug_mode("error")``.

Two layers, because either alone misses some: a ``TorchFunctionMode`` sees Python-level calls (``item``, ``tolist``,
``cpu``, ``numpy``, truth values, ``int``/``float``, boolean-mask indexing), and a ``TorchDispatchMode`` sees the
aten ops that read values or make data-dependent shapes (also inside autograd's backward, which Python never sees).
Patching ``torch.Tensor`` attributes instead would leave CPython's sequence slot set after ``__getitem__`` is
restored, which breaks ``torch.tensor([0-d tensors])`` for the rest of the session.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
                 torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.nonzero,
                 torch.nonzero, torch.argwhere, torch.masked_select, torch.unique}
_SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "argwhere", "nonzero_static")


def _is_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class _Found:
    """What to do with a sync: raise (``forbid_host_syncs``) or record it (``count_host_syncs``)."""

    def __init__(self, record: list[str] | None):
        self.record = record

    def __call__(self, what: str) -> None:
        if self.record is None:
            raise AssertionError(f"host sync: {what}")
        self.record.append(what)


class _FunctionGuard(TorchFunctionMode):
    def __init__(self, found: _Found):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_METHODS:
            self.found(getattr(func, "__name__", str(func)))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1 and _is_mask(args[1]):
            self.found("boolean-mask indexing")
        return func(*args, **(kwargs or {}))


class _DispatchGuard(TorchDispatchMode):
    def __init__(self, found: _Found):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self.found(f"aten.{name}")
        elif name in ("index", "index_put", "index_put_") and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.found(f"aten.{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forbid_host_syncs():
    found = _Found(None)
    with _FunctionGuard(found), _DispatchGuard(found):
        yield


@contextlib.contextmanager
def count_host_syncs():
    """Yields a list that collects one entry per sync (a Python-level call such as ``item`` can also show up as
    ``aten._local_scalar_dense`` underneath: compare counts of one kind, e.g. ``tolist``)."""
    record: list[str] = []
    found = _Found(record)
    with _FunctionGuard(found), _DispatchGuard(found):
        yield record
