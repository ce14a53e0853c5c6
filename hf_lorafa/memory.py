"""Measure what training keeps in memory: saved-for-backward bytes and process / CUDA peaks.

The saved-for-backward count follows DESIGN.md's protocol: the unique storages autograd saves during one forward
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
    storage = tensor.untyped_storage()
    return str(tensor.device), storage.data_ptr()


def _storage_bytes(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().nbytes()


def saved_tensor_bytes(model: nn.Module, forward: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes of unique non-parameter storages autograd keeps for backward while `forward()` runs.

    Returns `(bytes, forward's result)`; keep the result alive until you call backward, or drop it.

    Example:

    ```python
    >>> nbytes, out = saved_tensor_bytes(model, lambda: model(input_ids=ids, labels=ids))  # doctest: +SKIP
    ```
    """
    owned = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers()) if t.device.type != "meta"}
    seen: dict[tuple[str, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type != "meta" and not getattr(tensor, "is_sparse", False):
            key = _storage_key(tensor)
            if key not in owned:
                seen[key] = max(seen.get(key, 0), _storage_bytes(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = forward()
    return sum(seen.values()), result


def process_peak_bytes() -> int:
    """Peak resident memory of this process so far (`ru_maxrss`), in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    """Resident memory of this process now (VmRSS), in bytes; 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"
