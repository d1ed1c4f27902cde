"""CUDA graphs for fixed-shape work: one capture per input signature, then one launch per call.

A detector forward at batch 1 issues hundreds of small kernels; on a GPU the host's launch overhead, not the
arithmetic, sets the speed. A CUDA graph records the kernels once and replays them with one launch, which needs the
same shapes, no host synchronisation and no new allocations in the captured region - what the inference forward
(normalize, backbone, neck, head) and the training step already guarantee.

``GraphedFunction`` wraps a function of tensors: calls with a new signature (shapes, dtypes, devices) run eagerly
for ``warmup`` calls (cuDNN / lazy initialisation), then are captured into a graph whose static input buffers the
next calls copy into. Outputs are the graph's static tensors: valid until the next call with the same signature,
which is how a stream-ordered caller uses them. Anything that fails to capture falls back to eager, with one note.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

MAX_GRAPHS = 8  # signatures captured per function; more (e.g. many image sizes) run eagerly


def graphs_supported(device: torch.device) -> bool:
    """CUDA graphs need a CUDA device (and are not used under a debugger's sync checks)."""
    return device.type == "cuda" and torch.cuda.is_available()


def signature(values: Any) -> tuple:
    """What a graph is specific to: shape, dtype, device and memory layout of every tensor, and the other values."""
    leaves, spec = tree_flatten(values)
    return (str(spec), tuple((tuple(v.shape), v.dtype, v.device, v.stride()) if isinstance(v, torch.Tensor)
                             else ("value", v) for v in leaves))


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], outputs: Any):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs

    def __call__(self, leaves: list[Any]) -> Any:
        for buf, value in zip(self.inputs, (v for v in leaves if isinstance(v, torch.Tensor))):
            buf.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.outputs


class GraphedFunction:
    """``fn(*args)`` on CUDA tensors, replayed from a CUDA graph per argument signature (see module doc).

    ``context``: a callable returning a context manager entered around the eager warm-up calls and the capture
    (e.g. autocast with its cache disabled, which capture requires). ``pool``: a memory pool shared by graphs that
    never run concurrently (``torch.cuda.graph_pool_handle()``).
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 2, context: Callable[[], Any] | None = None,
                 pool: Any = None, max_graphs: int = MAX_GRAPHS, name: str = "forward"):
        self.fn, self.warmup, self.context, self.name = fn, warmup, context, name
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: dict[tuple, int] = {}
        self.failed = False

    def _ctx(self):
        return self.context() if self.context is not None else contextlib.nullcontext()

    def __call__(self, *args: Any) -> Any:
        if self.failed:
            return self._eager(args)
        key = signature(args)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph(tree_flatten(args)[0])
        calls = self.seen.get(key, 0)
        self.seen[key] = calls + 1
        if calls < self.warmup or len(self.graphs) >= self.max_graphs:
            return self._eager(args, side_stream=calls < self.warmup)
        try:
            graph = self._capture(args)
        except Exception as exc:  # a capture failure must not stop inference or training: run eagerly instead
            self.failed = True
            ours = [f for f in traceback.extract_tb(exc.__traceback__) if "/src/detection/" in f.filename]
            where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""
            warnings.warn(f"CUDA graph capture of the {self.name} failed{where} ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); running it without CUDA graphs",
                          stacklevel=2)
            torch.cuda.synchronize()
            return self._eager(args)
        self.graphs[key] = graph
        return graph(tree_flatten(args)[0])

    def _eager(self, args: tuple, side_stream: bool = False) -> Any:
        if not side_stream:
            with self._ctx():
                return self.fn(*args)
        # warm-up on a side stream, as capture needs (autograd's and cuDNN's lazy state is made per stream); the
        # same one every time, so autograd's gradient-accumulation nodes keep one stream
        stream = self.__dict__.setdefault("_side_stream", torch.cuda.Stream())
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._ctx():
            out = self.fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, args: tuple) -> _Graph:
        leaves, spec = tree_flatten(args)
        static = [torch.empty_like(v).copy_(v) if isinstance(v, torch.Tensor) else v for v in leaves]
        static_args = tree_unflatten(static, spec)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # thread_local: loader / pipeline threads may pin memory or copy while this thread captures
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"), self._ctx():
            outputs = self.fn(*static_args)
        return _Graph(graph, [v for v in static if isinstance(v, torch.Tensor)], outputs)

    def reset(self) -> None:
        """Drop every captured graph (e.g. after the wrapped module's parameters were replaced)."""
        self.graphs.clear()
        self.seen.clear()
