"""Trainer callbacks on step boundaries: LaMDA's schedule, memory sampling, and a check of the warmup's length."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from ..tuners.lamda import LaMDALayer, lamda_schedule_step
from .memory_logging import MemoryTracker

logger = logging.getLogger(__name__)
# Schedules that ignore `warmup_steps`.
NO_WARMUP = ("constant", "reduce_lr_on_plateau")


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


class WarmupCheckCallback(TrainerCallback):
    """Warns once at the start when the warmup lasts the whole run: the rate never reaches `learning_rate`."""

    def on_train_begin(self, args, state, control, **kwargs):
        warmup = args.get_warmup_steps(state.max_steps)
        if str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) in NO_WARMUP:
            return
        if state.is_world_process_zero and 0 < state.max_steps <= warmup:
            # Every warmup schedule of transformers rises linearly: step i trains at lr × i / warmup.
            peak = args.learning_rate * (state.max_steps - 1) / warmup
            logger.warning(
                "hf-lorafa: the warmup (%d steps, from `warmup_steps`=%s) is not shorter than the run (%d steps): "
                "the learning rate rises for the whole run and peaks at %.3g, never reaching `learning_rate`=%g. "
                "Set `warmup_steps` below %d (or a fraction such as 0.1), or train for more steps.",
                warmup,
                args.warmup_steps,
                state.max_steps,
                peak,
                args.learning_rate,
                state.max_steps,
            )
