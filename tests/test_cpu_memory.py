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
