"""SIGTERM during training (Slurm preemption, Kubernetes eviction, spot reclaim): save a checkpoint, then exit.

Python's default SIGTERM ends the process at once, losing every step since the last `save_steps`. While
[`LoRAFATrainer.train`] runs, SIGTERM instead lets the current optimizer step finish, saves a full `checkpoint-N`
(adapter, optimizer, scheduler, RNG and trainer state, `trainer_state.json` last, so a save cut short by a later
SIGKILL is never taken for a complete one) and raises [`TrainingPreempted`], a `SystemExit` with status 143
(128 + SIGTERM): the process ends without a traceback, and a scheduler sees that the run did not finish. In a
distributed run every rank stops at the same step and the process group is destroyed before the exit.
`train(resume_from_checkpoint=True)` (`--resume_from_checkpoint last`) continues exactly where it stopped.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers import TrainerCallback

from .checkpoints import complete_checkpoints

PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM


class TrainingPreempted(SystemExit):
    """SIGTERM arrived during training; a complete checkpoint was saved. Exit status 143 unless caught."""


class PreemptionCallback(TrainerCallback):
    """Turns a received SIGTERM into "save now, then stop" at the next optimizer-step boundary."""

    def __init__(self) -> None:
        self.received = False

    def on_step_end(self, args, state, control, **kwargs):
        if self.any_rank_received(args):
            control.should_save = True
            control.should_training_stop = True

    def any_rank_received(self, args) -> bool:
        """Whether SIGTERM reached this process or, in a distributed run, any other (a collective: call on all)."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.received
        # Every rank must stop at the same step, or the ones still training wait forever on the others' gradients.
        flag = torch.tensor([float(self.received)], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


@contextmanager
def preemptible(trainer: Any) -> Iterator[None]:
    """Within this block SIGTERM saves a checkpoint and stops training; on leaving it, raise `TrainingPreempted`.

    Only in the main thread (the only one Python delivers signals to); elsewhere the block changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    callback = PreemptionCallback()

    def received(signum: int, frame: Any) -> None:
        callback.received = True
        # os.write, not print: a handler that interrupts a print to the same stream would raise a reentrant call.
        os.write(2, b"hf-lorafa: SIGTERM received; saving a checkpoint after this step, then exiting.\n")

    previous = signal.signal(signal.SIGTERM, received)
    trainer.add_callback(callback)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        trainer.remove_callback(callback)
    # Asked on every rank at the same point: the rank that got the signal and the ones it stopped all exit alike.
    if callback.any_rank_received(trainer.args):
        _raise_preempted(trainer)


def _raise_preempted(trainer: Any) -> None:
    saved = complete_checkpoints(trainer.args.output_dir)
    if not saved or saved[-1].name != f"checkpoint-{trainer.state.global_step}":
        # SIGTERM after the last step ended (during the final callbacks): that step has no checkpoint yet.
        trainer._save_checkpoint(trainer.model, trial=None)
        saved = complete_checkpoints(trainer.args.output_dir)
    if trainer.is_world_process_zero():
        os.write(
            2,
            f"hf-lorafa: training stopped by SIGTERM at step {trainer.state.global_step} of "
            f"{trainer.state.max_steps}; saved {saved[-1]}. Resume with --resume_from_checkpoint last "
            "(train(resume_from_checkpoint=True)).\n".encode(),
        )
    _leave_process_group()
    raise TrainingPreempted(PREEMPTED_EXIT_STATUS)


def _leave_process_group() -> None:
    """In a distributed run, wait for every rank's save and destroy the process group before the exit: left to the
    interpreter's shutdown, its communication threads can abort the process (`terminate called without an active
    exception`, status -6 instead of 143)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
