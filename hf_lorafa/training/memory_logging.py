"""Memory figures during training: peak since the last log, sampled activation bytes, the end-of-run report.

- Peak since the last log: on CUDA the allocator's `max_memory_allocated` (reset at each log); on CPU the
  process's resident high-water mark `VmHWM`, reset at each log through `/proc/self/clear_refs` (Linux), else the
  lifetime `ru_maxrss`.
- Activation bytes: every `sample_every` steps (default: every step), the training forward runs under
  `saved_tensors_hooks` (docs/memory.md: unique non-parameter storages), entered by a forward pre-hook and
  left by a forward hook, so the training loop itself is untouched. The cost is one set lookup per saved tensor. A
  log gives the largest count since the previous log, so each interval's peak can be read against the activations
  of its largest step (batches differ in tokens).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_io.output_folder import atomic_write
from ..memory.measure import SavedTensorCounter, format_bytes, process_peak_since_reset, reset_process_peak


class MemoryTracker:
    """Collects peak memory and activation bytes for `Trainer.log`; writes `memory.json` and `memory.png`."""

    def __init__(self, model: nn.Module, sample_every: int = 1) -> None:
        self.model = model
        self.sample_every = max(1, sample_every)
        self.cuda = torch.cuda.is_available() and next(model.parameters()).is_cuda
        self.history: list[dict[str, Any]] = []
        self.activation_bytes: int | None = None  # the largest count of the run
        self.interval_activation_bytes: int | None = None  # the largest since the last log
        self.overall_peak = 0
        self._sampling = False
        self._counter: SavedTensorCounter | None = None
        self._hooks_ctx = None
        self._handles = [
            model.register_forward_pre_hook(self._enter),
            model.register_forward_hook(self._exit),
        ]
        self.reset_peak()

    # -- activation sampling -------------------------------------------------------------------------------------
    def sample_next_forward(self) -> None:
        if not torch.is_grad_enabled():
            return
        self._sampling = True

    def _enter(self, module, args) -> None:
        if not self._sampling or not torch.is_grad_enabled() or self._hooks_ctx is not None:
            return
        self._counter = SavedTensorCounter(self.model)
        self._hooks_ctx = torch.autograd.graph.saved_tensors_hooks(self._counter.pack, lambda t: t)
        self._hooks_ctx.__enter__()

    def _exit(self, module, args, output) -> None:
        if self._hooks_ctx is None:
            return
        self._hooks_ctx.__exit__(None, None, None)
        self._hooks_ctx = None
        self._sampling = False
        nbytes = self._counter.nbytes
        self.activation_bytes = max(self.activation_bytes or 0, nbytes)
        self.interval_activation_bytes = max(self.interval_activation_bytes or 0, nbytes)

    # -- peaks ---------------------------------------------------------------------------------------------------
    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        reset_process_peak()

    def peak_since_reset(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        return process_peak_since_reset()

    @property
    def peak_kind(self) -> str:
        return "cuda_allocated" if self.cuda else "process_rss"

    def metrics(self, step: int, trainable: int) -> dict[str, float]:
        """Figures for this log entry; resets the peak so the next entry covers the next interval."""
        peak = self.peak_since_reset()
        self.overall_peak = max(self.overall_peak, peak)
        entry = {"memory/peak_mib": round(peak / 2**20, 2), "trainable_params": trainable}
        if self.interval_activation_bytes is not None:
            entry["memory/activation_mib"] = round(self.interval_activation_bytes / 2**20, 3)
            self.interval_activation_bytes = None
        if not self.history or self.history[-1]["step"] != step:  # the end-of-training summary repeats the last step
            self.history.append({"step": step, **entry})
        self.reset_peak()
        return entry

    # -- report --------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {
            "device": "cuda" if self.cuda else "cpu",
            "peak_kind": self.peak_kind,
            "peak_bytes": max(self.overall_peak, self.peak_since_reset()),
            "activation_bytes": self.activation_bytes,
            "history": self.history,
        }

    def table(self) -> str:
        s = self.summary()
        rows = [
            ("peak memory" + (" (CUDA allocator)" if self.cuda else " (process RSS)"), format_bytes(s["peak_bytes"])),
            ("activations kept for backward", format_bytes(s["activation_bytes"] or 0)),
            ("trainable parameters", f"{self.history[-1]['trainable_params']:,}" if self.history else "n/a"),
        ]
        width = max(len(r[0]) for r in rows)
        return "\n".join(["Memory summary", "-" * (width + 16)] + [f"{k:<{width}}  {v:>12}" for k, v in rows])

    def write(self, output_dir: str | os.PathLike) -> dict[str, Any]:
        """Write `memory.json` and `memory.png` into `output_dir`; returns the summary."""
        directory = Path(output_dir)
        directory.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        atomic_write(directory / "memory.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        if self.history:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            steps = [h["step"] for h in self.history]
            fig, ax = plt.subplots(figsize=(6, 3.2))
            ax.plot(steps, [h["memory/peak_mib"] for h in self.history], marker="o", label=f"peak ({self.peak_kind})")
            acts = [(h["step"], h["memory/activation_mib"]) for h in self.history if "memory/activation_mib" in h]
            if acts:
                ax.plot(*zip(*acts), marker="s", label="activations kept for backward")
            ax.set_xlabel("step")
            ax.set_ylabel("MiB")
            ax.set_title("hf-lorafa training memory")
            ax.legend()
            fig.tight_layout()
            atomic_write(directory / "memory.png", lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
            plt.close(fig)
        return summary

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
