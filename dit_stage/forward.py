"""The one DiT forward: validate, host-side batch, device-side run — eagerly, as CUDA graphs, or compiled.

A 1.3B forward launches a few thousand small kernels; on a fast GPU the host cannot launch them as quickly as the
GPU runs them, so an eager forward is launch-bound (76.9 ms eager vs 21.8 ms graph+compile at 1.3B 512², 2 steps,
BENCHMARKS.md). Every caller (the stage worker, the single-process runner, the benchmark) goes through ``Forward``
so that the fast path is the one the stage pods run.

Modes:

* ``eager``: ``CausalWanDiT.run`` as is.
* ``graph``: ``run`` is captured once per batch *signature* (item layout, shapes, the stream states' storage) and
  replayed; when to capture is ``CapturePolicy``'s (the second sighting, within a time budget, a failed one not again
  for two minutes). A replay leaves the host only validating the items, updating the ring counters and copying a
  handful of numbers into the graph's static inputs. Replaying is exactly the eager computation (same kernels, same
  inputs). Capture needs an eager warm-up; it runs the real step, so the capturing call is eager and its result is
  returned. That warm-up and the capture see the same ring writes, which are idempotent (a frame already in the ring
  is overwritten in place), so nothing is applied twice. The last ``max_graphs`` signatures are kept (LRU). The stage
  service captures in a worker thread while its event loop goes on with CUDA work (pinned copies of arriving chunks,
  noise draws), so capture errors are thread-local: another thread's call no longer invalidates the capture. A capture
  that fails anyway costs only its graph: the step's eager result stands, and that signature runs eagerly for a while.
* ``compile``: ``graph`` over ``compile_pieces()`` (torch.compile of the attention-free block pieces; it compiles
  the model's pieces in place, so the model's own calls use them too). A call with input shapes not seen before
  compiles inside it, so like a capture it counts in ``warmups``.
* ``auto``: ``compile`` on CUDA, else ``eager``.

Graphs and compiled pieces are CUDA-only here: off CUDA every mode runs eagerly, and the Forward says so once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch

from dit_stage.state import SlotItem
from dit_stage.timing import BlockTimer

if TYPE_CHECKING:
    from dit_stage.model import BatchInputs, CausalWanDiT

__all__ = ["MODES", "CapturePolicy", "Forward", "ForwardMode", "make_forward"]

log = logging.getLogger(__name__)

ForwardMode = Literal["auto", "eager", "graph", "compile"]
MODES: tuple[str, ...] = get_args(ForwardMode)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    noisy: torch.Tensor | None
    batch: BatchInputs
    out: torch.Tensor
    keep: list  # the stream states whose storage the graph reads and writes (alive: the key's ids stay theirs)


class CapturePolicy:
    """When graph mode captures a batch signature: the ``after``-th time it is seen, and only while captures have
    taken at most ``budget`` of the last ``window_s`` seconds; a signature whose capture failed not again for
    ``retry_s`` (the failure may have been passing, out of memory say, and pooled state storage outlives streams,
    so its signature recurs).

    Why not at once: several streams batch in ever new compositions (the signature names the streams' states), a
    composition seen once may never recur, and a capture stalls every stream for a few eager steps (an eager run,
    the recording, the instantiation). Why a budget: past it, a new signature runs eagerly, which costs one eager
    step; a capture storm would cost every stream its deadline. Pure bookkeeping (a clock, no torch): tested on CPU."""

    def __init__(self, after: int = 2, budget: float = 0.1, window_s: float = 20.0,
                 clock: Callable[[], float] = time.monotonic, remember: int = 256, retry_s: float = 120.0) -> None:
        self.after, self.budget, self.window_s, self.clock, self.remember = after, budget, window_s, clock, remember
        self.retry_s = retry_s
        self._seen: OrderedDict[tuple, int] = OrderedDict()  # sightings of signatures not captured yet
        self._failed: dict[tuple, float] = {}  # signature → when its capture failed
        self._spent: collections.deque[tuple[float, float]] = collections.deque()  # (end, seconds) of captures
        self.deferred = 0  # captures put off by the budget

    def sighted(self, key: tuple) -> bool:
        """``key`` is about to run without a graph: whether to capture it now."""
        failed = self._failed.get(key)
        if failed is not None:
            if self.clock() - failed < self.retry_s:
                return False
            del self._failed[key]
        seen = self._seen.pop(key, 0) + 1
        if seen >= self.after and self._within_budget():
            return True
        self._seen[key] = seen
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        if seen >= self.after:
            self.deferred += 1
        return False

    def spent(self, seconds: float) -> None:
        self._spent.append((self.clock(), seconds))

    def failed(self, key: tuple) -> None:
        if len(self._failed) < self.remember:
            self._failed[key] = self.clock()

    def clear(self) -> None:
        self._seen.clear()
        self._failed.clear()

    def _within_budget(self) -> bool:
        now = self.clock()
        while self._spent and self._spent[0][0] < now - self.window_s:
            self._spent.popleft()
        return sum(s for _, s in self._spent) < self.budget * self.window_s


class Forward:
    """``forward(x, items, grid, noisy, sigmas, timer)`` over one model (the arguments of ``CausalWanDiT.forward``).

    ``timer`` gets per-block marks in eager mode. A graph replay is one unit, so there its time is spread evenly
    over the owned blocks (per-block timing is not available; Wan blocks are identical, so the controller's
    per-block costs stay right but for the small embed/head share)."""

    def __init__(self, model: CausalWanDiT, mode: ForwardMode = "eager", max_graphs: int = 16,
                 policy: CapturePolicy | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"forward mode {mode!r} is not one of {', '.join(MODES)}")
        self.model = model
        self.requested: ForwardMode = mode
        self.max_graphs = max_graphs
        self.policy = policy if policy is not None else CapturePolicy()
        cuda = model.device.type == "cuda"
        self.mode: ForwardMode = "eager" if not cuda else ("compile" if mode == "auto" else mode)
        if mode != "eager" and not cuda:
            log.info("forward mode %r needs CUDA; %s runs eagerly", mode, model.device)
        if self.mode == "compile" and "_compiled" not in model.__dict__:
            model.compile_pieces()
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self._compiled_shapes: set[tuple] = set()
        self.warmups = 0  # calls that paid a one-off cost (a capture, a compile): warm-up time, not a step's cost

    def follow(self, model: CausalWanDiT) -> Forward:
        """This Forward for ``model`` (the same mode): itself, or a new one when the model changed (epoch switch)."""
        return self if model is self.model else Forward(model, self.requested, self.max_graphs, self.policy)

    @torch.no_grad()
    def __call__(
        self,
        x: torch.Tensor,
        items: Sequence[SlotItem],
        grid: tuple[int, int, int],
        noisy: torch.Tensor | None = None,
        sigmas: Sequence[float] | None = None,
        timer: BlockTimer | None = None,
    ) -> torch.Tensor:
        model = self.model
        model.check_input(x, len(items), grid)
        batch = model.prepare_batch(items, grid, sigmas)
        # the model's GPU current in this (worker) thread: a capture's stream, a replay and the timer's events are
        # made on the current device, which is cuda:0 in a fresh thread whatever device the model is on
        with torch.cuda.device(model.device) if model.device.type == "cuda" else contextlib.nullcontext():
            if timer is not None:
                timer.start()  # the device work only, as in eager per-block marks
            if self.mode == "eager":
                return model.run(x, batch, noisy, timer)
            out = self._replay(x, batch, noisy, items)
            if timer is not None:
                timer.mark_blocks(model.block_ids)
            return out

    def _replay(
        self, x: torch.Tensor, batch: BatchInputs, noisy: torch.Tensor | None, items: Sequence[SlotItem]
    ) -> torch.Tensor:
        key = (
            batch.signature(),
            tuple(x.shape),
            x.dtype,
            None if noisy is None else (tuple(noisy.shape), noisy.dtype),
        )
        compiles = self._first_of_shapes(_compiled_shapes(key))
        entry = self._graphs.get(key)
        if entry is None:
            capture = self.policy.sighted(key)
            self.warmups += capture or compiles
            if not capture:
                return self.model.run(x, batch, noisy)
            t0 = time.perf_counter()
            try:
                return self._capture(key, x, batch, noisy, items)
            finally:
                self.policy.spent(time.perf_counter() - t0)
        self._graphs.move_to_end(key)
        entry.x.copy_(x, non_blocking=True)
        if noisy is not None and entry.noisy is not None:
            entry.noisy.copy_(noisy, non_blocking=True)
        entry.batch.copy_(batch)
        entry.graph.replay()
        return entry.out.clone()

    def _capture(
        self, key: tuple, x: torch.Tensor, batch: BatchInputs, noisy: torch.Tensor | None, items: Sequence[SlotItem]
    ) -> torch.Tensor:
        model = self.model
        static_x = x.clone()
        static_noisy = None if noisy is None else noisy.clone()
        side = torch.cuda.Stream(device=model.device)
        side.wait_stream(torch.cuda.current_stream(model.device))
        with torch.cuda.stream(side):
            result = model.run(static_x, batch, static_noisy)  # the real step, eagerly
        torch.cuda.current_stream(model.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = model.run(static_x, batch, static_noisy)  # recorded only: repeats the idempotent writes
        except RuntimeError as e:  # (torch.AcceleratorError is one) nothing ran during the capture: result stands
            self.policy.failed(key)
            log.warning("CUDA-graph capture failed (%s); this batch signature runs eagerly for %.0f s",
                        str(e).splitlines()[0], self.policy.retry_s)
            return result
        states = list({id(it.state): it.state for it in items}.values())
        self._graphs[key] = _Captured(graph, static_x, static_noisy, batch, out, states)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return result

    def _first_of_shapes(self, shapes: tuple) -> bool:
        """Whether compile mode sees these input shapes for the first time: torch.compile then (re)compiles the
        pieces inside the call (sizes 0 and 1 are specialised even with ``dynamic``), seconds that a latency model
        must not learn as the cost of a step."""
        if self.mode != "compile" or shapes in self._compiled_shapes:
            return False
        self._compiled_shapes.add(shapes)
        return True

    def clear(self) -> None:
        """Drop every captured graph (and the storage it pins)."""
        self._graphs.clear()
        self.policy.clear()


def _compiled_shapes(key: tuple) -> tuple:
    """What a compile specialises on in a replay key: shapes and dtypes, with the batch size only as 1 or more (the
    pieces compile ``dynamic``, and sizes 0 and 1 are specialised)."""
    _, x_shape, dtype, noisy = key

    def batch(shape: tuple) -> tuple:
        return (min(shape[0], 2), *shape[1:])

    return batch(x_shape), dtype, None if noisy is None else (batch(noisy[0]), noisy[1])


def make_forward(model: CausalWanDiT, mode: ForwardMode = "auto", capture_budget: float = 0.1) -> Forward:
    """The forward a caller should use for ``model``: ``auto`` is graph+compile on CUDA, eager elsewhere;
    ``capture_budget``: ``CapturePolicy``'s share of time for captures."""
    return Forward(model, mode, policy=CapturePolicy(budget=capture_budget))
