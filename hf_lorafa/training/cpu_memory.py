"""Give the memory a training step freed back to the operating system after every step (glibc's `malloc_trim`).

glibc keeps freed blocks for reuse: once a step has freed its activations, the pages stay in the process, and over
the first steps the heap settles at the step's footprint plus its fragmentation, so the resident peak of a CPU run
is the allocator's cache, not what training holds (BENCHMARKS.md, "Main job side by side"). `malloc_trim(0)` after
each optimizer step returns every free page, from the middle of the heap too, at the cost of faulting them in again
in the next step. Tensors in use are untouched, so training computes exactly the same.

Other C libraries (musl, macOS) and GPU memory are left alone: the trainer only trims when training on CPU with
glibc (`trim_cpu_memory`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

from transformers import TrainerCallback


@functools.cache
def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


class TrimCallback(TrainerCallback):
    """Returns freed memory to the OS when training starts, after every optimizer step and after evaluations."""

    def __init__(self, trim: Callable[[], int]) -> None:
        self.trim = trim

    def on_train_begin(self, args, state, control, **kwargs):
        self.trim()

    def on_step_end(self, args, state, control, **kwargs):
        self.trim()

    def on_evaluate(self, args, state, control, **kwargs):
        self.trim()
