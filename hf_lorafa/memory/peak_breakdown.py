"""Where a CPU training run's resident peak goes: sampled at every module boundary, taken apart at the highest sample.

`PeakBreakdown` reads the process's resident memory (VmRSS) at each module's forward entry and exit (replays inside
backward included), when backward reaches each module's output, when each trained parameter's gradient is accumulated
and around the optimizer step. At each new highest sample it records what that memory is made of:

- weights: parameter and buffer storages (frozen, trainable); those mapped from a file (safetensors loads map the
  checkpoint) are resident as file pages, the rest live on the C heap;
- gradients and optimizer state: the trained parameters' `.grad` and the optimizer's state tensors;
- saved activations by kind, alive then (`saved_by_kind.SavedByKind`), and what a checkpoint replay keeps;
- from glibc's `mallinfo2()`: the heap's live bytes (`uordblks` + `hblkhd`) not explained above, split into the heap
  already live when training started (interpreter objects and libraries' allocations on the C heap, measured at the
  first step's start) and the rest, the step's transients (forward intermediates, backward's gradient buffers, loss
  chunks); the free bytes the heap holds (`fordblks`, allocator slack); and the process's base, VmRSS − (`arena` +
  `hblkhd`) − file-mapped weights, split into mapped files (`RssFile` + `RssShmem` less those weights: libraries'
  code and data) and the rest (Python's own object arenas, thread stacks, other allocators' memory).

Each part is clamped at zero where the counts exceed the heap's live bytes, the excess taken from the base, so the
parts always sum to the sampled peak (`components` asserts it). Caveats: the peak between two hooks is not seen
(compare `vmhwm_bytes`, the kernel's high-water mark over the same steps); `fordblks` counts free pages `malloc_trim`
returned to the OS too (then the base comes out low); another allocator (jemalloc, tcmalloc) makes `mallinfo2`
meaningless. Without glibc's `mallinfo2` everything past the tensors is one part, "rest".
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..compat import libc_function
from .measure import proc_status_bytes, reset_process_peak
from .saved_by_kind import KINDS, REPLAYED, SavedByKind

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
HEAP_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()  # mallinfo2's


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in HEAP_FIELDS]


@functools.cache
def _mallinfo2() -> Callable[[], _MallInfo2] | None:
    function = libc_function("mallinfo2")
    if function is None:
        return None
    function.restype = _MallInfo2
    return function


def heap_info() -> dict[str, int] | None:
    """glibc's `mallinfo2()` (glibc ≥ 2.33) as a dict of bytes, or None where the C library has none."""
    function = _mallinfo2()
    if function is None:
        return None
    info = function()
    return {name: getattr(info, name) for name in HEAP_FIELDS}


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def _file_mapped(pointers: set[int]) -> set[int]:
    """The addresses among `pointers` that lie in a file mapping (/proc/self/maps)."""
    found = set()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) < 6 or fields[5].startswith("["):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found |= {p for p in pointers if start <= p < end}
    return found


class PeakBreakdown:
    """Samples a model's training (CPU) at module boundaries and takes the highest sample apart; see the module doc.

    Call `begin_step(n)` / `end_step()` around each optimizer step (samples are taken only between them) and
    `watch_optimizer(optimizer)` once it exists; `report()` gives the result, `remove()` takes the hooks off.

    Example:

    ```python
    >>> breakdown = PeakBreakdown(model)  # doctest: +SKIP
    >>> breakdown.watch_optimizer(optimizer); breakdown.begin_step(1)  # doctest: +SKIP
    >>> model(**batch).loss.backward(); optimizer.step(); breakdown.end_step()  # doctest: +SKIP
    >>> breakdown.report()["components"]  # doctest: +SKIP
    ```
    """

    def __init__(self, model: nn.Module) -> None:
        self.model, self.saved = model, SavedByKind(model)
        self.names = {module: name or type(module).__name__ for name, module in model.named_modules()}
        self.trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        storages = {}
        for tensor in [*model.parameters(), *model.buffers()]:
            key = tensor.untyped_storage().data_ptr()
            storages[key] = (
                tensor.untyped_storage().nbytes(),
                isinstance(tensor, nn.Parameter) and tensor.requires_grad,
            )
        mapped = _file_mapped(set(storages))
        self.weights = {
            "frozen": sum(n for n, trained in storages.values() if not trained),
            "trainable": sum(n for n, trained in storages.values() if trained),
            "file_mapped": sum(storages[p][0] for p in mapped),
        }
        self.optimizer = None
        self.step, self.phase, self.active, self.batch_shape = 0, "forward", False, None
        self.samples, self.vmhwm, self.resting_heap, self.peak = 0, 0, None, None
        self.after_forward: dict[int, dict[str, int]] = {}
        self.replay_max = dict.fromkeys((*REPLAYED, "other"), 0)
        self._handles = []
        for module in model.modules():
            self._handles += [
                module.register_forward_pre_hook(self._before, with_kwargs=True),
                module.register_forward_hook(self._after),
            ]
        for name, param in self.trained.items():
            self._handles.append(
                param.register_post_accumulate_grad_hook(lambda _, n=name: self.sample("gradient", n))
            )

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module is self.model and self.active and torch.is_grad_enabled():
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.batch_shape = list(ids.shape) if isinstance(ids, torch.Tensor) else None
        self.sample("replay entry" if self.phase == "backward" else "forward entry", self.names.get(module))

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        replay, name = self.phase == "backward", self.names.get(module)
        self.sample("replay exit" if replay else "forward exit", name)
        if not self.active or replay or not torch.is_grad_enabled():
            return
        if module is self.model:  # the forward is over: what it left for backward, then backward
            self.after_forward[self.step] = self.saved.alive()
            self.phase = "backward"
            return
        first = output[0] if isinstance(output, (tuple, list)) and output else output
        if isinstance(first, torch.Tensor) and first.requires_grad:
            first.register_hook(lambda grad: self.sample("output gradient", name))

    def watch_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Sample around `optimizer.step` (an accelerate wrapper is looked through)."""
        self.optimizer = getattr(optimizer, "optimizer", optimizer)

        def before(*_):
            self.phase = "optimizer"
            self.sample("optimizer step entry", None)

        self._handles += [
            self.optimizer.register_step_pre_hook(before),
            self.optimizer.register_step_post_hook(lambda *_: self.sample("optimizer step exit", None)),
        ]

    # -- steps -------------------------------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        """Start sampling step `step` (the kernel's high-water mark is reset, so `end_step` reads this step's)."""
        self.step, self.phase, self.active = step, "forward", True
        reset_process_peak()
        if self.resting_heap is None:
            heap = heap_info()
            if heap is not None:
                self.resting_heap = max(0, heap["uordblks"] + heap["hblkhd"] - self._tensor_bytes()[0])
        self.sample("step start", None)

    def end_step(self) -> None:
        self.sample("step end", None)
        self.vmhwm = max(self.vmhwm, proc_status_bytes("VmHWM") or 0)
        self.active = False

    def sample(self, event: str, where: str | None) -> None:
        """Read VmRSS; at a new highest value, record what it is made of (`where`: the module or parameter the event
        belongs to, if any)."""
        if not self.active:
            return
        self.samples += 1
        if self.phase == "backward":
            for kind, n in self.saved.recomputed().items():
                self.replay_max[kind] = max(self.replay_max[kind], n)
        rss = _rss()
        if self.peak is not None and rss <= self.peak["rss"]:
            return
        heap_bytes, grads, optimizer = self._tensor_bytes()
        self.peak = {
            "rss": rss,
            "step": self.step,
            "phase": self.phase,
            "event": event,
            "where": where,
            "batch_shape": self.batch_shape,
            "gradients": grads,
            "optimizer_state": optimizer,
            "saved": self.saved.alive(),
            "recomputed": self.saved.recomputed(),
            "heap": heap_info(),
            "status": {k: proc_status_bytes(k) for k in ("RssAnon", "RssFile", "RssShmem")},
        }

    def _tensor_bytes(self) -> tuple[int, int, int]:
        """(weights on the heap + gradients + optimizer state, gradients, optimizer state) in bytes now."""
        grads = _unique_bytes(p.grad for p in self.trained.values() if p.grad is not None)
        state = getattr(self.optimizer, "state", {}).values()
        optimizer = _unique_bytes(t for s in state for t in s.values() if isinstance(t, torch.Tensor))
        heap_weights = self.weights["frozen"] + self.weights["trainable"] - self.weights["file_mapped"]
        return heap_weights + grads + optimizer, grads, optimizer

    # -- result ------------------------------------------------------------------------------------------------------
    def components(self) -> list[tuple[str, str, int]]:
        """`(key, what it is, bytes)` of each part of the peak; they sum to the peak's VmRSS."""
        p, w = self.peak, self.weights
        parts = [
            ("weights_frozen", "weights, frozen (parameters and buffers)", w["frozen"]),
            ("weights_trainable", "weights, trainable (adapters)", w["trainable"]),
            ("gradients", "gradients", p["gradients"]),
            ("optimizer_state", "optimizer state (Adam moments)", p["optimizer_state"]),
        ]
        parts += [(f"saved_{kind}", f"saved: {what}", p["saved"][kind]) for kind, what in KINDS.items()]
        parts += [
            (f"replay_{kind}", f"held by a replay in backward: {KINDS[kind] if kind in REPLAYED else 'other'}", n)
            for kind, n in p["recomputed"].items()
        ]
        counted = sum(n for _, _, n in parts)
        heap = p["heap"]
        if heap is None:
            parts.append(("rest", "rest (no mallinfo2: heap, slack and base not split)", p["rss"] - counted))
        else:
            live = heap["uordblks"] + heap["hblkhd"]
            in_heap = counted - w["file_mapped"]
            resting = min(self.resting_heap or 0, max(0, live - in_heap))
            transients = max(0, live - in_heap - resting)
            excess = in_heap + resting + transients - live  # > 0 only where the counts exceed the live heap
            parts += [
                ("heap_at_start", "other live heap, as at the first step's start (interpreter, libraries)", resting),
                ("transients", "transients (forward intermediates, gradient buffers, loss chunks)", transients),
                ("allocator_slack", "allocator slack (free bytes the heap holds)", heap["fordblks"]),
            ]
            base = p["rss"] - heap["arena"] - heap["hblkhd"] - w["file_mapped"] - excess
            status = p["status"]
            files = max(0, min(base, (status["RssFile"] or 0) + (status["RssShmem"] or 0) - w["file_mapped"]))
            parts += [
                ("base_files", "process base: mapped files (libraries' code and data)", files),
                ("base_anonymous", "process base: other memory (Python's object arenas, thread stacks)", base - files),
            ]
        total = sum(n for _, _, n in parts)
        assert total == p["rss"], f"the parts sum to {total} bytes, not the peak's {p['rss']}"
        return parts

    def report(self) -> dict[str, Any]:
        """The peak, where it was, its parts and the run's readings, JSON-ready."""
        if self.peak is None:
            raise RuntimeError("No step was sampled: call begin_step()/end_step() around the training steps.")
        p = self.peak
        notes = []
        if p["heap"] is None:
            notes.append("glibc's mallinfo2() is missing here (another C library, or glibc < 2.33): no heap split.")
        if not any(self.replay_max.values()):
            notes.append("No checkpoint replay was seen in backward (none ran, or this torch hides its frames).")
        return {
            "peak_rss_bytes": p["rss"],
            "vmhwm_bytes": self.vmhwm,
            "samples": self.samples,
            "peak": {k: p[k] for k in ("step", "phase", "event", "where", "batch_shape")},
            "components": [{"key": k, "what": what, "bytes": n} for k, what, n in self.components()],
            "weights_file_mapped_bytes": self.weights["file_mapped"],
            "heap": p["heap"],
            "status": p["status"],
            "saved_after_forward": self.after_forward.get(p["step"]),
            "replay_max_bytes": self.replay_max,
            "notes": notes,
        }

    def remove(self) -> None:
        self.saved.remove()
        for handle in self._handles:
            handle.remove()
