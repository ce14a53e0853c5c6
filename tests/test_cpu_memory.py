"""Trimming freed CPU memory: glibc gives holes in its heap back to the OS, and the trainer does it on CPU only."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import tiny_llama
from test_trainer import make_args, token_dataset

from hf_lorafa import LoRAFATrainer
from hf_lorafa.memory.measure import current_rss_bytes
from hf_lorafa.training.cpu_memory import TrimCallback, malloc_trim

glibc = pytest.mark.skipif(not sys.platform.startswith("linux") or malloc_trim() is None, reason="glibc only")


@glibc
def test_trim_returns_the_holes_a_freed_step_leaves_in_the_heap():
    # 64 KiB blocks live on glibc's heap (below its mmap threshold); freeing every other one leaves holes that glibc
    # keeps, since they are not at the heap's top.
    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 256 MiB
    del blocks[::2]
    before = current_rss_bytes()
    malloc_trim()()
    assert before - current_rss_bytes() > 64 * 2**20
    assert all(torch.equal(b, torch.ones(16 * 1024)) for b in blocks)  # what is in use is untouched


@glibc
@pytest.mark.parametrize("trim", [True, False])
def test_trainer_trims_after_every_step_on_cpu_unless_asked_not_to(tmp_path, trim):
    trainer = LoRAFATrainer(
        model=tiny_llama(), args=make_args(tmp_path, trim_cpu_memory=trim), train_dataset=token_dataset()
    )
    callbacks = [c for c in trainer.callback_handler.callbacks if isinstance(c, TrimCallback)]
    assert len(callbacks) == int(trim)
    if trim:
        calls = []
        callbacks[0].trim = lambda: calls.append(trainer.state.global_step)
        trainer.train()
        # once when training starts, then after each optimizer step
        assert calls == list(range(trainer.state.max_steps + 1))


MMAPPED = """
import ctypes, sys, torch
sys.path[:0] = sys.argv[2:]
from conftest import tiny_llama
from hf_lorafa import LoRAFATrainer, LoRAFATrainingArguments

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
big = torch.empty(4 * 2**20, dtype=torch.uint8)
del big  # glibc's own threshold now rises to 4 MiB: smaller blocks go to the heap from here on
threshold = None if sys.argv[1] == "None" else int(sys.argv[1])
LoRAFATrainer(model=tiny_llama(), args=LoRAFATrainingArguments(
    output_dir="unused", cpu_mmap_threshold=threshold, report_to="none", use_cpu=True))
before = libc.mallinfo2().hblkhd
block = torch.empty(3 * 2**19, dtype=torch.uint8)  # 1.5 MiB
print(libc.mallinfo2().hblkhd - before >= 3 * 2**19)
"""


@glibc
@pytest.mark.parametrize("threshold, mapped", [(2**20, True), (None, False)], ids=["1 MiB (default)", "None"])
def test_trainer_maps_blocks_above_its_cpu_mmap_threshold(tmp_path, threshold, mapped):
    """In a fresh process (the setting is process-wide): a 1.5 MiB block is mapped on its own under the default
    threshold, and stays on the heap under glibc's own once a 4 MiB block was freed."""
    import subprocess
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    out = subprocess.run(
        [sys.executable, "-c", MMAPPED, str(threshold), str(tests), str(tests.parent)],
        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=True,
    )  # fmt: skip
    assert out.stdout.strip().splitlines()[-1] == str(mapped)


def test_cpu_mmap_threshold_names_its_range():
    from hf_lorafa import LoRAFATrainingArguments

    with pytest.raises(ValueError, match="`cpu_mmap_threshold` must be a byte count from 0 to 33554432"):
        LoRAFATrainingArguments(output_dir="unused", cpu_mmap_threshold=2**30)
