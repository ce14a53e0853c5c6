"""Measure what training keeps in memory: saved-for-backward bytes and process / CUDA peaks.

The saved-for-backward count follows docs/memory.md: the unique storages autograd saves during one forward
(seen through `torch.autograd.graph.saved_tensors_hooks`), leaving out the storages of parameters and buffers,
which existed before the forward (frozen weights kept for the input gradient are not activations).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


class SavedTensorCounter:
    """A `saved_tensors_hooks` pack hook counting unique non-parameter storages (docs/memory.md).

    Example:

    ```python
    >>> counter = SavedTensorCounter(model)  # doctest: +SKIP
    >>> with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):  # doctest: +SKIP
    ...     loss = model(input_ids=ids, labels=ids).loss
    >>> counter.nbytes  # doctest: +SKIP
    ```
    """

    def __init__(self, model: nn.Module) -> None:
        tensors = list(model.parameters()) + list(model.buffers())
        self.owned = {_storage_key(t) for t in tensors if t.device.type != "meta"}
        self.seen: dict[tuple[str, int], int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta" and not getattr(tensor, "is_sparse", False):
            key = _storage_key(tensor)
            if key not in self.owned:
                self.seen[key] = max(self.seen.get(key, 0), tensor.untyped_storage().nbytes())
        return tensor

    @property
    def nbytes(self) -> int:
        return sum(self.seen.values())


def saved_tensor_bytes(model: nn.Module, forward: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes of unique non-parameter storages autograd keeps for backward while `forward()` runs.

    Returns `(bytes, forward's result)`; keep the result alive until you call backward, or drop it.

    Example:

    ```python
    >>> nbytes, out = saved_tensor_bytes(model, lambda: model(input_ids=ids, labels=ids))  # doctest: +SKIP
    ```
    """
    counter = SavedTensorCounter(model)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
        result = forward()
    return counter.nbytes, result


def process_peak_bytes() -> int:
    """Peak resident memory of this process so far (`ru_maxrss`), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def proc_status_bytes(key: str) -> int | None:
    """A `/proc/self/status` memory field (`VmRSS`, `VmHWM`, ...) in bytes; None where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    """Resident memory of this process now (VmRSS), in bytes; 0 where /proc is missing."""
    return proc_status_bytes("VmRSS") or 0


def reset_process_peak() -> bool:
    """Reset this process's resident high-water mark `VmHWM` (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def process_peak_since_reset() -> int:
    """`VmHWM` (peak since the last `reset_process_peak`), or the lifetime `ru_maxrss` without /proc."""
    return proc_status_bytes("VmHWM") or process_peak_bytes()


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
