"""Would a better frozen A close the same-r gap? LoRA-FA and LaMDA over the row space LoRA itself learned.

LoRA-FA and LaMDA freeze A, so the update `ΔW = s·B A` can use only A's r input directions for the whole run. On
drug-review they stay 1-2 points below LoRA at the same r (RESULTS.md), and every data-chosen A tried there (W's
top singular vectors, the first gradient's, the inputs') did no better than a random one. This asks the question
from the other end: per seed, train ours LoRA, take the row space of each layer's final A (the directions LoRA
chose with all 304 steps of hindsight: no frozen-A method could know them at step 0), and train LoRA-FA and LaMDA
at the same seed with A frozen to it (an orthonormal basis of it, each row scaled as `frozen_a_init` scales its
rows). LoRA's final update `B A` is then within reach of B alone.

- If the oracle A closes the gap, the gap is the choice of A, and a better data-chosen A could close it.
- If it does not, no frozen A can: the gap is B alone training (with A fixed, and so with half LoRA's adapter
  parameters), and equal trainable parameters (twice the rank) is what closes it (RESULTS.md).

The control (`--a init`) freezes each method's own random A's row space, orthonormalised and rescaled the same way,
so that the basis and scale are not mistaken for the subspace. Each LoRA run also records how far its A's row space
moved from its init (the random A LoRA-FA keeps at the same seed): `‖Q_final Q_initᵀ‖²_F / r` per layer, 1 for the
same space, about r/d_in for unrelated ones.

    python -m research.oracle_a --seeds 0 1 2          # one process; two at a time: --seeds 0 1 & --seeds 2
    python -m research.oracle_a --seeds 0 1 2 --a init # the control: each method's own random A, rescaled alike
    python -m research.oracle_a --seeds 0 1 2 --methods lorafa --opt lorafa_lr_ratio=1  # B at LoRA's own pace

A LoRA run's initial and final row spaces are kept in `OUT/tmp/` (safetensors), so a later call at the same seed
(another method or option) reuses them instead of training LoRA again; its JSON must still be there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hf_lorafa import adapter_layers
from research import accuracy
from research.probes import frozen_a_batches, set_frozen_a_directions

OUT = accuracy.RESULTS / "oracle-a"
# The A each variant freezes: LoRA's final row space, or (the control) the method's own random one, rescaled.
TAGS = {"final": "a-lora-final", "init": "a-random-rescaled"}
METHODS = ("lorafa", "lamda")


def _model(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


def row_spaces(trainer) -> dict[str, torch.Tensor]:
    """Each adapter layer's A row space: r orthonormal rows (fp64), the top right singular vectors of A."""
    return {
        name: torch.linalg.svd(layer.lora_A.weight.detach().double(), full_matrices=False)[2][: layer.r]
        for name, layer in adapter_layers(_model(trainer)).items()
    }


def overlaps(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    """`‖Q_a Q_bᵀ‖²_F / r` per layer: the mean squared cosine of the principal angles between the two row spaces."""
    return {name: float((a[name] @ b[name].t()).square().sum() / a[name].shape[0]) for name in a}


def summary(values: dict[str, float]) -> dict:
    v = sorted(values.values())
    return {"median": v[len(v) // 2], "min": v[0], "max": v[-1], "layers": len(v)}


def seed_runs(
    task: str,
    seed: int,
    methods: tuple[str, ...],
    out: Path = OUT,
    spec_changes: tuple = (),
    a_from: str = "final",
    options: tuple = (),
) -> None:
    """One seed: ours LoRA, then each method over LoRA's final row space (`a_from="final"`); or, the control, each
    method over its own random A's row space, orthonormalised and scaled the same way (`"init"`, no LoRA run).
    `options` ((key, value) pairs, as `accuracy.py run --opt`) go to every method's run, not to LoRA's."""
    command = " ".join(
        ["python -m research.oracle_a --task", task, "--seeds", str(seed), "--methods", *methods]
        + (["--a", a_from] if a_from != "final" else [])
        + [f"--opt {k}={v}" for k, v in options]
        + [f"--spec {k}={v}" for k, v in spec_changes]
    )
    init: dict[str, torch.Tensor] = {}
    learned: dict[str, torch.Tensor] = {}
    lora_name = accuracy.run_name(task, "ours", "lora", seed, (), spec_changes)
    cache = out / "tmp" / f"{lora_name}-row-spaces.safetensors"

    def keep_init(trainer) -> dict:
        init.update(row_spaces(trainer))
        return {"layers": len(init)}

    def keep_final(trainer) -> dict:
        learned.update(row_spaces(trainer))
        moved = overlaps(learned, init)
        return {"a_overlap_with_init": summary(moved), "a_overlap_with_init_per_layer": moved}

    if a_from == "final" and cache.exists() and (out / f"{lora_name}.json").exists():
        kept = load_file(str(cache))
        init.update({k.removeprefix("init/"): v for k, v in kept.items() if k.startswith("init/")})
        learned.update({k.removeprefix("final/"): v for k, v in kept.items() if k.startswith("final/")})
        print(f"seed {seed}: ours LoRA's row spaces from {cache}", flush=True)
    elif a_from == "final":
        lora = accuracy.run(
            task, "ours", "lora", seed, (), out, spec_changes, prepare=keep_init, finish=keep_final, command=command
        )
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial")  # renamed when whole: a killed run leaves no half-written cache
        save_file(
            {
                **{f"init/{k}": v.contiguous() for k, v in init.items()},
                **{f"final/{k}": v.contiguous() for k, v in learned.items()},
            },
            str(partial),
        )
        partial.replace(cache)
        print(f"seed {seed}: ours LoRA {lora.get('eval_accuracy')} / {lora.get('eval_macro_f1')}", flush=True)
    for method in methods:

        def set_a(trainer) -> dict:
            model = _model(trainer)
            before = row_spaces(trainer)
            directions = learned if a_from == "final" else before
            set_frozen_a_directions(model, frozen_a_batches(trainer), directions)
            after = row_spaces(trainer)
            if a_from != "final":
                return {"a_overlap_with_own_random_a": summary(overlaps(after, before))}
            return {
                "random_a_overlap_with_lora_init": summary(overlaps(before, init)),
                "a_overlap_with_lora_final": summary(overlaps(after, learned)),
            }

        result = accuracy.run(
            task, "ours", method, seed, options, out, spec_changes, prepare=set_a, tag=TAGS[a_from], command=command
        )
        print(f"seed {seed}: {method} over {a_from} A {result.get('eval_accuracy')} / {result.get('eval_macro_f1')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(accuracy.TASKS), default="drugreview")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--a",
        choices=sorted(TAGS),
        default="final",
        help="final: LoRA's learned row space; init: the control, the method's own random A rescaled the same way",
    )
    parser.add_argument(
        "--opt", type=accuracy.parse_option, action="append", default=[], help="a method option, as accuracy.py's"
    )
    parser.add_argument("--spec", type=accuracy.parse_spec, action="append", default=[], help="a protocol variant")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    for seed in args.seeds:
        seed_runs(args.task, seed, tuple(args.methods), args.out, tuple(args.spec), args.a, tuple(args.opt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
