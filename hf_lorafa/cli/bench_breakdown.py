"""`hf-lorafa bench --preset mainjob --breakdown`: where the default's whole-step peak goes on the main job (CPU).

One worker process (the benchmark's environment, glibc's default allocator, as users run) trains the main job's
"ours" variant (`bench_mainjob._trainer`, LoRAFATrainer at its defaults) for `--steps` steps under
`memory.peak_breakdown.PeakBreakdown`: VmRSS sampled at every module boundary, in forward and backward, and around the
optimizer step; at the highest sample, the weights, gradients, optimizer state, saved activations by kind, the heap's
transients, the allocator's slack and the process's base (the module docstrings say how each is measured).

    hf-lorafa bench --preset mainjob --breakdown --output benchmarks/mainjob-breakdown.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from ..memory.measure import format_bytes

VARIANT = "ours"


def measure_training(trainer) -> dict[str, Any]:
    """Train `trainer` under a `PeakBreakdown` (steps from `begin_step` to `end_step`); returns its report."""
    from transformers import TrainerCallback

    from ..memory.peak_breakdown import PeakBreakdown

    breakdown = PeakBreakdown(trainer.model)

    class Steps(TrainerCallback):
        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            breakdown.watch_optimizer(optimizer)

        def on_step_begin(self, args, state, control, **kwargs):
            breakdown.begin_step(state.global_step + 1)

        def on_step_end(self, args, state, control, **kwargs):
            breakdown.end_step()

    trainer.add_callback(Steps())
    try:
        trainer.train()
    finally:
        breakdown.remove()
    return breakdown.report()


def run_worker(steps: int, output_dir: str) -> dict[str, Any]:
    """Train the main job's default variant in this process; returns the breakdown and the versions it ran with."""
    import torch
    import transformers

    from .bench_mainjob import _trainer

    started = time.time()
    report = measure_training(_trainer(VARIANT, steps, output_dir))
    return {**report, "torch": torch.__version__, "transformers": transformers.__version__,
            "train_seconds": round(time.time() - started, 1)}  # fmt: skip


def run(steps: int, output_dir: str) -> dict[str, Any]:
    """The worker in a fresh process (`bench.worker_env`, glibc's default allocator); its report or `{"error"}`."""
    from .bench import worker_env

    command = [sys.executable, "-m", "hf_lorafa.cli.bench_breakdown", "--worker", str(steps), output_dir]
    proc = subprocess.run(command, capture_output=True, text=True, env=worker_env())
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {' | '.join(proc.stderr.strip().splitlines()[-3:])}"}
    return json.loads(lines[-1])


def table(report: dict[str, Any]) -> str:
    """The parts of the peak, one a line, with their share of it."""
    peak, where = report["peak_rss_bytes"], report["peak"]
    lines = [
        f"peak {format_bytes(peak)} at step {where['step']}, {where['phase']} ({where['event']}: {where['where']}), "
        f"batch {where['batch_shape']}; kernel high-water mark {format_bytes(report['vmhwm_bytes'])}",
        "-" * 96,
    ]
    for part in report["components"]:
        lines.append(f"{part['what']:<72}{format_bytes(part['bytes']):>14}{100 * part['bytes'] / peak:>9.1f}%")
    return "\n".join(lines + [f"note: {n}" for n in report["notes"]])


def main(steps: int, output_dir: str) -> dict[str, Any]:
    """Run the breakdown; returns the report `hf-lorafa bench --preset mainjob --breakdown` writes."""
    from .bench_mainjob import JOB

    started = time.time()
    result = run(steps, output_dir)
    report = {
        "preset": "mainjob",
        "breakdown": True,
        "settings": {**JOB, "steps": steps, "variant": VARIANT, "allocator": "default", "model": "smollm2"},
        "seconds": round(time.time() - started, 1),
        **result,
    }
    print(report["error"] if "error" in report else table(report))
    return report


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(json.dumps(run_worker(int(sys.argv[2]), sys.argv[3])), flush=True)
