"""How large an update each method makes to fit: the adapters' `‖s·B A‖_F` over training, LoRA against LoRA-FA.

LoRA-FA reaches LoRA's training loss on drug-review at B's learning rate ×2 and a lower one at ×4 (its default), yet
stays 1-2 accuracy points below LoRA at the same r (RESULTS.md). This records, every 19 steps of one run, per
adapted layer: the size of the update the adapter adds to W (`‖ΔW‖_F`, and relative to `‖W‖_F`), and for A
(which trains in LoRA only) how far its norm and its row space moved from the init: `‖A‖_F / ‖A₀‖_F` and the share
of `‖A‖²_F` inside A₀'s row space. Medians over the adapted layers; the run's metrics as `accuracy.py run`'s.

    python -m research.update_norms --method lora --seed 0
    python -m research.update_norms --method lorafa --seed 0 --opt lorafa_lr_ratio=1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_lorafa import adapter_layers
from research import accuracy
from research.oracle_a import row_spaces

OUT = accuracy.RESULTS / "update-norms"
TAG = "norms"
EVERY = 19  # steps between records (16 records over drug-review's 304 steps)


def layer_norms(layers: dict, a0: dict[str, torch.Tensor], q0: dict[str, torch.Tensor]) -> dict[str, float]:
    """Medians over the layers: `‖ΔW‖_F`, `‖ΔW‖_F / ‖W‖_F`, `‖A‖_F / ‖A₀‖_F`, A's energy share in A₀'s row space."""
    dw, rel, a_ratio, inside = [], [], [], []
    with torch.no_grad():
        for name, layer in layers.items():
            delta = layer.delta_weight().double()
            a = layer.lora_A.weight.double()
            dw.append(float(delta.norm()))
            rel.append(float(delta.norm() / layer.base_layer.weight.double().norm()))
            a_ratio.append(float(a.norm() / a0[name].norm()))
            inside.append(float((a @ q0[name].t()).square().sum() / a.square().sum()))
    med = statistics.median
    return {
        "delta_w_norm": med(dw),
        "delta_w_relative": med(rel),
        "a_norm_ratio": med(a_ratio),
        "a_energy_in_init_row_space": med(inside),
    }


def trace(
    task: str, method: str, seed: int, options: tuple = (), out: Path = OUT, spec_changes: tuple = (), every=EVERY
) -> dict:
    """Train one run (as `accuracy.py run`) and record `layer_norms` at step 0, every `every` steps and the last."""
    records: list[dict] = []

    def prepare(trainer) -> dict:
        layers = adapter_layers(trainer.accelerator.unwrap_model(trainer.model))
        a0 = {name: layer.lora_A.weight.detach().double().clone() for name, layer in layers.items()}
        q0 = row_spaces(trainer)

        class Record(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step % every == 0 or state.global_step == state.max_steps:
                    records.append({"step": state.global_step, **layer_norms(layers, a0, q0)})

        records.append({"step": 0, **layer_norms(layers, a0, q0)})
        trainer.add_callback(Record())
        return {"layers": len(layers), "every": every}

    command = " ".join(
        ["python -m research.update_norms --task", task, "--method", method, "--seed", str(seed)]
        + [f"--opt {k}={v}" for k, v in options]
        + [f"--spec {k}={v}" for k, v in spec_changes]
    )
    return accuracy.run(
        task,
        "ours",
        method,
        seed,
        options,
        out,
        spec_changes,
        prepare=prepare,
        finish=lambda trainer: {"norms": records},
        tag=TAG,
        command=command,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(accuracy.TASKS), default="drugreview")
    parser.add_argument("--method", choices=("lora", "lorafa", "lamda", "lamda++"), default="lorafa")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--opt", type=accuracy.parse_option, action="append", default=[], help="a method option, as accuracy.py's"
    )
    parser.add_argument("--spec", type=accuracy.parse_spec, action="append", default=[], help="a protocol variant")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    result = trace(args.task, args.method, args.seed, tuple(args.opt), args.out, tuple(args.spec))
    last = result["finished"]["norms"][-1]
    print(
        f"{args.method} seed {args.seed}: accuracy {result.get('eval_accuracy')} / macro-F1 "
        f"{result.get('eval_macro_f1')}, train loss {result['train_loss']:.3f}, "
        f"median ‖ΔW‖_F {last['delta_w_norm']:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
