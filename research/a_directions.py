"""Do the data's directions point where LoRA's A went? Overlaps of `frozen_a_init`'s directions with LoRA's A.

`research/oracle_a.py` trains ours LoRA per seed and keeps each layer's initial and final A row space (in
`research/results/accuracy/oracle-a/tmp/`). LoRA's A keeps most of its random init (about 0.9 of it) and turns a
little; LoRA-FA over that final A, at LoRA's pace, comes close to LoRA (RESULTS.md). This asks whether a frozen A
chosen from the first training batches (`frozen_a_init="gradient"` or `"activations"`, as the trainer computes them)
spans what LoRA learned. It also measures a third candidate that no option sets: LoRA's own first turn, the random A
pushed one power-iteration step along the gradient (`A₀ GᵀG`, G = Σ g xᵀ over the same batches, less its part in
A₀'s row space: the direction LoRA's A gradient `s Bᵀ G` takes once B has followed `G A₀ᵀ`). Per layer, with `Q₀`
LoRA's initial row space, `Q_f` its final one and `D` the data's top-r directions, the overlaps `‖D Q_fᵀ‖²_F / r`
and `‖D Q₀ᵀ‖²_F / r`, and the share of the part of `Q_f` outside `Q₀` (what LoRA added) that D holds,
`‖D Nᵀ‖²_F / ‖N‖²_F` with `N = Q_f − Q_f Q₀ᵀ Q₀`. A random r-dimensional space holds about r/d_in of any of
them. One step of LoRA-FA is trained to get the trainer; its metrics mean nothing.

    python -m research.a_directions --seeds 0 1 2     # after `python -m research.oracle_a --seeds 0 1 2`
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from hf_lorafa import adapter_layers
from research import accuracy, oracle_a
from research.probes import calibrating, calibration_pass, data_directions, frozen_a_batches

OUT = accuracy.RESULTS / "a-directions"
KINDS = ("gradient", "activations", "turn")


def loss(model, batch) -> torch.Tensor:
    """The training loss, as `frozen_a_init="gradient"` takes it by default."""
    return model(**batch).loss


def held(d: torch.Tensor, q: torch.Tensor) -> float:
    """The share of the rows of `q` (orthonormal, k×d) inside the row space of `d` (orthonormal, r×d)."""
    return float((d @ q.t()).square().sum() / q.square().sum())


def turn_directions(model, layers: dict, batches: list, a0: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, an orthonormal basis of `A₀ GᵀG` less its projection on A₀'s row space (`a0`: orthonormal rows)."""
    sums: dict[str, torch.Tensor] = {}

    def add(name, g, x):
        term = g.double().t() @ x.double()
        sums[name] = sums[name] + term if name in sums else term

    calibration_pass(model, layers, batches, None, loss, add)
    out = {}
    for name, g in sums.items():
        q0 = a0[name]
        turn = (q0 @ g.t()) @ g
        turn = turn - (turn @ q0.t()) @ q0
        out[name] = torch.linalg.svd(turn, full_matrices=False)[2][: q0.shape[0]]
    return out


def measure(task: str, seed: int, oracle: Path = oracle_a.OUT, out: Path = OUT, spec_changes: tuple = ()) -> dict:
    """One seed: the data's directions (each kind) against the LoRA row spaces `oracle_a.py` kept at that seed."""
    lora_name = accuracy.run_name(task, "ours", "lora", seed, (), spec_changes)
    kept = load_file(str(oracle / "tmp" / f"{lora_name}-row-spaces.safetensors"))
    init = {k.removeprefix("init/"): v for k, v in kept.items() if k.startswith("init/")}
    final = {k.removeprefix("final/"): v for k, v in kept.items() if k.startswith("final/")}

    def directions(trainer) -> dict:
        model = trainer.accelerator.unwrap_model(trainer.model)
        layers = adapter_layers(model)
        own = oracle_a.row_spaces(trainer)  # LoRA-FA's random A at this seed: LoRA's initial A
        found = {"random_a_overlap_with_lora_init": oracle_a.summary(oracle_a.overlaps(own, init))}
        batches = frozen_a_batches(trainer)  # the same batches for every kind
        with calibrating(model):
            for kind in KINDS:
                if kind == "turn":
                    data = turn_directions(model, layers, batches, own)
                else:
                    data = data_directions(model, layers, batches, kind, loss if kind == "gradient" else None)
                per_layer = {}
                for name, d in data.items():
                    q0, qf = init[name], final[name]
                    added = qf - (qf @ q0.t()) @ q0  # the part of LoRA's final rows outside its initial space
                    per_layer[name] = {
                        "final": held(d, qf),
                        "init": held(d, q0),
                        "added": held(d, added),
                        "random": d.shape[0] / d.shape[1],
                    }
                found[kind] = {
                    key: statistics.median(v[key] for v in per_layer.values())
                    for key in ("final", "init", "added", "random")
                } | {"layers": len(per_layer)}
        return found

    command = f"python -m research.a_directions --task {task} --seeds {seed}"
    return accuracy.run(
        task,
        "ours",
        "lorafa",
        seed,
        (),
        out,
        (*((k, v) for k, v in spec_changes if k != "max_steps"), ("max_steps", 1)),
        prepare=directions,
        tag="directions",
        command=command,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(accuracy.TASKS), default="drugreview")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    for seed in args.seeds:
        found = measure(args.task, seed)["prepared"]
        print(f"seed {seed}: " + "; ".join(f"{kind} {found[kind]}" for kind in KINDS), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
