"""Accuracy at equal budgets: hf-lorafa's methods against PEFT LoRA and full fine-tuning, on real offline data.

Tasks: all-MiniLM-L6-v2 on the drug-review set (3-class accuracy and macro-F1 on the 379-row test split) and
SmolLM2-135M-Instruct on chatterbot pairs (held-out loss). Every run has the same data, steps, batch, rank and
learning rate (full fine-tuning gets the usual 10x lower rate); one JSON per run under `benchmarks/accuracy/`.

    python scripts/accuracy.py run --task drugreview --impl ours --method lorafa --seed 0
    python scripts/accuracy.py sweep --plan design       # the runs BENCHMARKS.md reports, skipping finished ones
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
)

from hf_lorafa import LoRAFAConfig, LoRAFATrainer, LoRAFATrainingArguments
from hf_lorafa.data import resolve_model
from hf_lorafa.dataprep import (
    classification_metrics,
    load_raw_dataset,
    pad_collator,
    tokenize_for_causal_lm,
    tokenize_for_classification,
)
from hf_lorafa.injection import count_parameters

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "accuracy"
# The shared budget: the reference protocol for the drug-review task (BENCHMARKS.md) (8 epochs, 3 seeds, r=8, lr 5e-4).
# On an idle 2-core machine one MiniLM epoch takes ~40 s, so a run is ~6 minutes; SmolLM2 takes ~3.5 s a step.
TASKS = {
    "drugreview": {"model": "minilm", "epochs": 8, "max_steps": -1, "lr": 5e-4, "batch": 16, "max_length": 128},
    "chatterbot": {"model": "smollm2", "epochs": 1, "max_steps": 15, "lr": 5e-4, "batch": 8, "max_length": 128},
}
RANK, ALPHA = 8, 16
FULL_LR_FACTOR = 0.1  # full fine-tuning diverges at an adapter learning rate; 10x lower is the usual choice
DEFAULT_RATIO = LoRAFAConfig.lorafa_lr_ratio
# LoRA-FA runs always name their B learning-rate ratio, so a change of the default never mixes results.
_PAIR = [("ours", "lorafa", DEFAULT_RATIO), ("ours", "lora", None), ("peft", "lora", None)]
_LAMDA_FULL = [("ours", "lamda", None), ("ours", "lamda++", None), ("full", "full", None)]
PLANS = {
    # (task, impl, method, seed, lorafa_lr_ratio) in priority order: the comparison that matters most comes first
    # (LoRA-FA against LoRA, the check of LoRA-FA's learning-rate multiplier, more seeds, then LaMDA).
    "design": [
        *[("drugreview", impl, method, 0, ratio) for impl, method, ratio in _PAIR],
        *[("drugreview", "ours", "lorafa", 0, ratio) for ratio in (1.0, 4.0)],
        *[("chatterbot", impl, method, 0, ratio) for impl, method, ratio in _PAIR],
        ("chatterbot", "ours", "lorafa", 0, 4.0),
        *[("drugreview", impl, method, seed, ratio) for seed in (1, 2) for impl, method, ratio in _PAIR],
        *[("drugreview", impl, method, 0, ratio) for impl, method, ratio in _LAMDA_FULL],
        *[("chatterbot", impl, method, 0, ratio) for impl, method, ratio in _LAMDA_FULL],
        *[("drugreview", impl, method, seed, ratio) for seed in (1, 2) for impl, method, ratio in _LAMDA_FULL],
        *[("drugreview", "ours", "lorafa", seed, ratio) for seed in (1, 2) for ratio in (1.0, 4.0)],
    ],
}


def run_name(task: str, impl: str, method: str, seed: int, ratio: float | None) -> str:
    suffix = f"-ratio{ratio:g}" if ratio is not None else ""
    return f"{task}-{impl}-{method.replace('+', 'p')}{suffix}-seed{seed}"


def _data(task: str, tokenizer, spec: dict):
    raw = load_raw_dataset(task, seed=42)
    if task == "drugreview":
        data = tokenize_for_classification(raw, tokenizer, "text", "label", spec["max_length"])
        return data["train"], data["test"], DataCollatorWithPadding(tokenizer)
    data = tokenize_for_causal_lm(raw, tokenizer, None, spec["max_length"])
    return data["train"], data["test"].select(range(min(64, len(data["test"])))), pad_collator(tokenizer)


def run(task: str, impl: str, method: str, seed: int, ratio: float | None, out_dir: Path) -> dict:
    """Train one configuration and write its JSON (metrics, loss curve, parameters, wall time)."""
    spec = TASKS[task]
    torch.manual_seed(seed)
    path = resolve_model(spec["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train, test, collator = _data(task, tokenizer, spec)
    if task == "drugreview":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3, use_safetensors=True)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    head = ["classifier"] if task == "drugreview" else None
    lr = spec["lr"] * (FULL_LR_FACTOR if impl == "full" else 1.0)
    common = dict(
        output_dir=str(out_dir / "tmp" / run_name(task, impl, method, seed, ratio)),
        num_train_epochs=spec["epochs"],
        max_steps=spec["max_steps"],
        per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=32,
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=5,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        seed=seed,
        disable_tqdm=True,
    )
    metrics = classification_metrics if task == "drugreview" else None
    if impl == "ours":
        extra = {"lorafa_lr_ratio": ratio} if ratio is not None else {}
        args = LoRAFATrainingArguments(
            **common,
            adapter_method=method,
            lora_r=RANK,
            lora_alpha=ALPHA,
            lora_modules_to_save=",".join(head) if head else None,
            log_memory=False,
            **extra,
        )
        trainer = LoRAFATrainer(model=model, args=args, train_dataset=train, eval_dataset=test,
                                data_collator=collator, compute_metrics=metrics)
    else:
        from transformers import TrainingArguments

        if impl == "peft":
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear",
                                modules_to_save=head, task_type="SEQ_CLS" if head else "CAUSAL_LM")
            model = get_peft_model(model, config)
        trainer = Trainer(model=model, args=TrainingArguments(**common), train_dataset=train, eval_dataset=test,
                          data_collator=collator, compute_metrics=metrics)
    started = time.time()
    trainer.train()
    wall = time.time() - started
    final = trainer.evaluate()
    trainable, total = count_parameters(trainer.model)
    history = trainer.state.log_history
    result = {
        "task": task, "impl": impl, "method": method, "seed": seed, "lorafa_lr_ratio": ratio,
        "effective_lorafa_lr_ratio": getattr(trainer.args, "lorafa_lr_ratio", None),
        "model": spec["model"], "r": RANK, "alpha": ALPHA, "learning_rate": lr, "epochs": spec["epochs"],
        "max_steps": trainer.state.max_steps, "batch": spec["batch"], "max_length": spec["max_length"],
        "train_rows": len(train), "eval_rows": len(test), "train_seconds": round(wall, 1),
        "trainable_parameters": trainable, "total_parameters": total,
        "train_loss": next((h["train_loss"] for h in history if "train_loss" in h), None),
        **{k: v for k, v in final.items() if k in ("eval_loss", "eval_accuracy", "eval_macro_f1")},
        "loss_curve": [[h["step"], h["loss"]] for h in history if "loss" in h],
        "torch_threads": torch.get_num_threads(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{run_name(task, impl, method, seed, ratio)}.json").write_text(json.dumps(result, indent=1))
    return result


def sweep(plan: str, out_dir: Path) -> None:
    """Each run in a fresh subprocess (independent memory and RNG), skipping runs whose JSON already exists."""
    for task, impl, method, seed, ratio in PLANS[plan]:
        name = run_name(task, impl, method, seed, ratio)
        if (out_dir / f"{name}.json").exists():
            continue
        argv = [sys.executable, __file__, "run", "--task", task, "--impl", impl, "--method", method,
                "--seed", str(seed), "--out", str(out_dir)]
        if ratio is not None:
            argv += ["--lorafa-lr-ratio", str(ratio)]
        started = time.time()
        code = subprocess.call(argv, env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
        print(f"[accuracy] {name}: exit {code} after {time.time() - started:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run", help="one configuration")
    one.add_argument("--task", choices=sorted(TASKS), required=True)
    one.add_argument("--impl", choices=["ours", "peft", "full"], required=True)
    one.add_argument("--method", default="lorafa", help="lora, lorafa, lamda, lamda++ (ours); lora (peft); full")
    one.add_argument("--seed", type=int, default=0)
    one.add_argument("--lorafa-lr-ratio", type=float, default=None, help="LoRA-FA's B lr multiplier (default: ours)")
    one.add_argument("--out", type=Path, default=RESULTS)
    many = sub.add_parser("sweep", help="a plan of runs, one subprocess each")
    many.add_argument("--plan", choices=sorted(PLANS), default="design")
    many.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.command == "sweep":
        sweep(args.plan, args.out)
    else:
        result = run(args.task, args.impl, args.method, args.seed, args.lorafa_lr_ratio, args.out)
        print(json.dumps({k: v for k, v in result.items() if k != "loss_curve"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
