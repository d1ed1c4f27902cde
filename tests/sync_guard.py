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


class _FunctionGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _SYNC_METHODS:
            raise AssertionError(f"host sync: {getattr(func, '__name__', func)}")
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and len(args) > 1 and _is_mask(args[1]):
            raise AssertionError("host sync: boolean-mask indexing")
        return func(*args, **(kwargs or {}))


class _DispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            raise AssertionError(f"host sync: aten.{name}")
        if name in ("index", "index_put", "index_put_") and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            raise AssertionError(f"host sync: aten.{name} with a boolean mask")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def forbid_host_syncs():
    with _FunctionGuard(), _DispatchGuard():
        yield
