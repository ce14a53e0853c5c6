"""Keep a CPU run's resident memory to what training holds: glibc's mmap threshold and `malloc_trim`.

`cpu_mmap_threshold` (default 1 MiB): `mallopt(M_MMAP_THRESHOLD)` when the trainer is built on CPU, so every block of
at least that size (a tensor of a few hundred tokens' hidden states or more) is mapped on its own and unmapped when
freed. glibc's own threshold starts at 128 KiB and rises to the largest block freed so far (up to 32 MiB), after
which a step's activations live in the heap, where a larger batch leaves its freed blocks resident for the rest of
the run: the per-interval peak then follows the largest batch so far rather than the batch in hand. The setting is
process-wide (it stays after training) and makes each such allocation fault fresh pages in.

`trim_cpu_memory`: after each optimizer step, give back every free page of the heap.

glibc keeps freed blocks for reuse: once a step has freed its activations, the pages stay in the process, and over
the first steps the heap settles at the step's footprint plus its fragmentation, so the resident peak of a CPU run
is the allocator's cache, not what training holds (BENCHMARKS.md, "Main job side by side"). `malloc_trim(0)` after
each optimizer step returns every free page, from the middle of the heap too, at the cost of faulting them in again
in the next step. Tensors in use are untouched, so training computes exactly the same.

Other C libraries (musl, macOS) and GPU memory are left alone: the trainer only acts when training on CPU with glibc.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

from transformers import TrainerCallback

from ..compat import libc_function


@functools.cache
def malloc_trim() -> Callable[[], int] | None:
    """glibc's `malloc_trim(0)`, or None where the C library has none."""
    trim = libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc's `mallopt(M_MMAP_THRESHOLD, nbytes)`; False where the C library has no `mallopt` or refuses."""
    mallopt = libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, nbytes) == 1


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
