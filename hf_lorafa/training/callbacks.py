"""Trainer callbacks on step boundaries: LaMDA's schedule and memory sampling."""

from __future__ import annotations

from transformers import TrainerCallback

from ..tuners.lamda import LaMDALayer, lamda_schedule_step
from .memory_logging import MemoryTracker


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
