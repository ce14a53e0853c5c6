"""Trainer callbacks on step boundaries (LaMDA's schedule, memory sampling) and checkpoint bookkeeping."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerCallback

from ..tuners.lamda import LaMDALayer, lamda_schedule_step
from .memory_logging import MemoryTracker

TRAINING_STATE_FILE = "hf_lorafa_state.safetensors"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders whose save finished (trainer state written last), oldest first."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if step.isdigit() and (folder / "trainer_state.json").exists() and (folder / TRAINING_STATE_FILE).exists():
            found.append((int(step), folder))
    return [folder for _, folder in sorted(found)]


class LaMDAScheduleCallback(TrainerCallback):
    """Advances LaMDA's freezing of B after every optimizer step (and restores it on resume)."""

    def _advance(self, state, model) -> None:
        if model is not None and any(isinstance(m, LaMDALayer) for m in model.modules()):
            lamda_schedule_step(model, min(1.0, state.global_step / max(state.max_steps, 1)))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._advance(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._advance(state, model)


class MemoryCallback(TrainerCallback):
    """Asks the tracker to sample the step before each log, and writes the report at the end."""

    def __init__(self, tracker: MemoryTracker) -> None:
        self.tracker = tracker

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % self.tracker.sample_every == 0:
            self.tracker.sample_next_forward()

    def on_train_end(self, args, state, control, **kwargs):
        if args.should_save:
            self.tracker.write(args.output_dir)
        if state.is_world_process_zero:
            print(self.tracker.table())
