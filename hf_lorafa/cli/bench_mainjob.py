"""`hf-lorafa bench --preset mainjob`: the main job side by side with what users already run, as they run it.

Every variant trains the main job's model (SmolLM2-135M-Instruct, offline) on its data (chatterbot pairs, ≤256
tokens, batch 8, seed 42) for the same steps, each in its own process. The parent samples the child's resident
memory every 2 ms (whole-training peak: the trainer's memory logging resets the kernel's high-water mark, so VmHWM at
the end would show only the last interval), the child reports the median step time (the first step left out), the
train loss of the last step and the held-out loss (64 rows) after training.

    hf-lorafa bench --preset mainjob --output benchmarks/mainjob.json

`--preset mainjob-gpu` (for a lent GPU) runs the same variants on a ≥1B Llama at 2048 tokens: TinyLlama-1.1B's
architecture with SmolLM2's tokenizer, randomly initialised (seed 42) and saved once as safetensors, bf16 weights,
batch 2 × 2048 tokens of the chatterbot pairs' text packed end to end; the peak is the worker's
`torch.cuda.max_memory_allocated()` over training.

    hf-lorafa bench --preset mainjob-gpu --output benchmarks/mainjob-gpu.json
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

# name: (trainer, settings). "ours" = LoRAFATrainer; "peft" = transformers' Trainer on a PEFT LoRA model;
# "trl" = TRL's SFTTrainer (PEFT LoRA) and "ours-trl" = LoRAFASFTTrainer, both at their SFTConfig defaults.
VARIANTS = {
    "ours": ("ours", {}),
    "ours with attention replay only": ("ours", {"block_recompute": "attention"}),
    "ours without block recompute": ("ours", {"block_recompute": "none"}),
    "ours without padding removal": ("ours", {"remove_padding": False}),
    "ours + malloc_trim": ("ours", {"trim_cpu_memory": True}),
    "ours + GC": ("ours", {"gradient_checkpointing": True}),
    "ours + GC + 4-bit base": ("ours", {"gradient_checkpointing": True, "load_in_4bit": True}),
    "ours + bf16 weights": ("ours", {"dtype": "bfloat16"}),
    "ours + GC + bf16 weights": ("ours", {"gradient_checkpointing": True, "dtype": "bfloat16"}),
    "PEFT LoRA": ("peft", {}),
    "PEFT LoRA + GC": ("peft", {"gradient_checkpointing": True}),
    "PEFT LoRA-FA optimizer": ("peft", {"lorafa_optimizer": True}),
    "PEFT LoRA, padding-free collator": ("peft", {"flatten": True}),
    "TRL SFTTrainer (PEFT LoRA)": ("trl", {}),
    "LoRAFASFTTrainer": ("ours-trl", {}),
    "LoRAFASFTTrainer without GC": ("ours-trl", {"gradient_checkpointing": False}),
}
# Settings that change no result, and the variants that differ from the default by them alone.
EXACT = {
    "block recompute": ("ours with attention replay only", "ours without block recompute"),
    "malloc_trim": ("ours + malloc_trim",),
}
JOB = {"batch": 8, "max_length": 256, "r": 16, "dropout": 0.05, "lr": 5e-4, "seed": 42, "eval_rows": 64}
# The GPU side by side: `model_config` over SmolLM2's (random init), bf16 weights, rows of packed text.
GPU_JOB = {
    **JOB,
    "batch": 2,
    "max_length": 2048,
    "eval_rows": 8,
    "dtype": "bfloat16",
    "model_config": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "tie_word_embeddings": False,
    },
}
GPU_VARIANTS = [
    "ours",
    "ours without block recompute",
    "ours with attention replay only",
    "ours + GC",
    "PEFT LoRA",
    "PEFT LoRA + GC",
    "PEFT LoRA-FA optimizer",
    "TRL SFTTrainer (PEFT LoRA)",
    "LoRAFASFTTrainer",
]
# The worker reads its job here (JSON) when the parent runs another than `JOB`.
JOB_ENV = "HF_LORAFA_BENCH_JOB"


def current_job() -> dict:
    """The job this worker runs: `JOB`, or the one the parent passed in `JOB_ENV`."""
    return json.loads(os.environ[JOB_ENV]) if os.environ.get(JOB_ENV) else JOB


def build_model(job: dict, folder: str) -> str:
    """Save `job`'s randomly initialised model (SmolLM2's configuration and tokenizer, `model_config` over it) as
    safetensors in `folder`, once; returns the folder. Every variant then loads it as a user loads a model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..data.offline import resolve_model

    if not os.path.exists(os.path.join(folder, "config.json")):
        path = resolve_model("smollm2")
        config = AutoConfig.from_pretrained(path)
        for key, value in job["model_config"].items():
            setattr(config, key, value)
        torch.manual_seed(job["seed"])
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, job.get("dtype", "float32")))
        model.save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(path).save_pretrained(folder)
    return folder


def packed_rows(raw, tokenizer, length: int):
    """Every split's pairs as text ("question answer", EOS after each) packed end to end into rows of `length`
    tokens; labels are the tokens (every row full, so no padding)."""
    from datasets import Dataset, DatasetDict

    def pack(split):
        ids = []
        for row in split:
            ids += tokenizer(f"{row['question']} {row['answer']}")["input_ids"] + [tokenizer.eos_token_id]
        rows = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)]
        return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * length] * len(rows), "labels": rows})

    return DatasetDict({name: pack(split) for name, split in raw.items()})


def _peft_config(job: dict = JOB):
    from peft import LoraConfig

    from ..tuners.config import LoRAFAConfig

    return LoraConfig(
        r=job["r"], lora_alpha=LoRAFAConfig().alpha, lora_dropout=job["dropout"], target_modules="all-linear"
    )


def _common(steps: int, output_dir: str, job: dict = JOB) -> dict:
    return {
        "output_dir": output_dir,
        "max_steps": steps,
        "per_device_train_batch_size": job["batch"],
        "per_device_eval_batch_size": 16 if job["max_length"] <= 256 else job["batch"],
        "learning_rate": job["lr"],
        "lr_scheduler_type": "cosine",
        "warmup_steps": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": job["seed"],
    }


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _trainer(name: str, steps: int, output_dir: str, job: dict | None = None):
    """The variant's trainer, built as a user of that tool builds it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from ..data.offline import resolve_model
    from ..data.preprocessing import load_raw_dataset, pad_collator, tokenize_for_causal_lm

    job = job or current_job()
    kind, settings = VARIANTS[name]
    path = job.get("model_path") or resolve_model("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    raw = load_raw_dataset("chatterbot", seed=job["seed"])
    packed = "model_config" in job  # the GPU job: rows of packed text, the same for every variant
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    common = _common(steps, output_dir, job)
    if kind in ("trl", "ours-trl"):
        from trl import SFTConfig, SFTTrainer

        from ..trl import LoRAFASFTConfig, LoRAFASFTTrainer

        def messages(row):
            turns = [("user", row["question"]), ("assistant", row["answer"])]
            return {"messages": [{"role": role, "content": content} for role, content in turns]}

        if packed:  # TRL takes already tokenized rows as they are
            data = packed_rows(raw, tokenizer, job["max_length"]).remove_columns(["attention_mask", "labels"])
        else:
            data = raw.map(messages, remove_columns=raw["train"].column_names)
        held_out = data["test"].select(range(min(job["eval_rows"], len(data["test"]))))
        # TRL trains in bf16 by default; on a machine without a GPU it asks for `use_cpu` to do so on the CPU.
        sft = {**common, "max_length": job["max_length"], "use_cpu": not _has_gpu(), **settings}
        if kind == "trl":
            args = SFTConfig(**sft)
            return SFTTrainer(
                model=path, args=args, train_dataset=data["train"], eval_dataset=held_out,
                processing_class=tokenizer, peft_config=_peft_config(job),
            )  # fmt: skip
        args = LoRAFASFTConfig(**sft, lora_dropout=job["dropout"])
        return LoRAFASFTTrainer(
            model=path, args=args, train_dataset=data["train"], eval_dataset=held_out, processing_class=tokenizer
        )
    if packed:
        data = packed_rows(raw, tokenizer, job["max_length"])
    else:
        data = tokenize_for_causal_lm(raw, tokenizer, None, job["max_length"])
    held_out = data["test"].select(range(min(job["eval_rows"], len(data["test"]))))
    collator = pad_collator(tokenizer)
    if kind == "ours":
        from ..training.arguments import LoRAFATrainingArguments
        from ..training.trainer import LoRAFATrainer

        settings = dict(settings)
        dtype = settings.pop("dtype", job.get("dtype", "float32"))
        if settings.get("load_in_4bit"):
            from ..data.base_model import load_base_model

            model = load_base_model(path, load_in_4bit=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=dtype)
        args = LoRAFATrainingArguments(**common, **settings, lora_dropout=job["dropout"])
        return LoRAFATrainer(
            model=model, args=args, train_dataset=data["train"], eval_dataset=held_out, data_collator=collator,
            processing_class=tokenizer,
        )  # fmt: skip
    from peft import get_peft_model

    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, dtype=job.get("dtype", "float32"))
    model = get_peft_model(model, _peft_config(job))
    optimizers = (None, None)
    if settings.get("lorafa_optimizer"):
        from peft.optimizers import create_lorafa_optimizer

        lora_alpha = _peft_config(job).lora_alpha
        optimizer = create_lorafa_optimizer(model, r=job["r"], lora_alpha=lora_alpha, lr=job["lr"])
        optimizers = (optimizer, None)
    if settings.get("flatten"):  # transformers' padding-free collator (what a PEFT user may pick to drop padding)
        from transformers import DataCollatorWithFlattening

        collator = DataCollatorWithFlattening()
    args = TrainingArguments(**common, gradient_checkpointing=settings.get("gradient_checkpointing", False))
    return Trainer(
        model=model, args=args, train_dataset=data["train"], eval_dataset=held_out, data_collator=collator,
        processing_class=tokenizer, optimizers=optimizers,
    )  # fmt: skip


def run_worker(name: str, steps: int, output_dir: str) -> dict:
    """Train the variant in this process; returns its times, losses and the wall-clock span of training (on a GPU
    also its peak: the largest `torch.cuda.max_memory_allocated()` at a step's end, read before a log resets it)."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.started, self.peak = [], None, 0

        def on_train_begin(self, *args, **kwargs):
            if cuda:
                torch.cuda.reset_peak_memory_stats()

        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            if cuda:
                torch.cuda.synchronize()
                self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            self.times.append(time.perf_counter() - self.started)

    trainer = _trainer(name, steps, output_dir)
    timer = StepTimes()
    trainer.add_callback(timer)
    started = time.time()
    trainer.train()
    ended = time.time()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    held_out = trainer.evaluate()["eval_loss"]
    model = trainer.model
    return {
        "train_start": started,
        "train_end": ended,
        "step_seconds": statistics.median(timer.times[1:]),
        "train_loss": losses[-1],
        "eval_loss": held_out,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "activation_savers": getattr(model, "hf_lorafa_savers", None),
        **({"peak_cuda_bytes": timer.peak} if cuda else {}),
    }


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def run_variant(name: str, steps: int, allocator: str, output_dir: str, job: dict | None = None) -> dict:
    """Run one variant in a fresh process, sampling its resident memory every 2 ms from here (`job`: another than
    `JOB`, passed to the worker in `JOB_ENV`)."""
    from .bench import worker_env

    # "mmap" = a 64 KiB threshold, "mmap:BYTES" another one; "default" leaves glibc's.
    env = worker_env((allocator.partition(":")[2] or "65536") if allocator.startswith("mmap") else None)
    if job is not None:
        env[JOB_ENV] = json.dumps(job)
    command = [sys.executable, "-m", "hf_lorafa.cli.bench_mainjob", "--worker", name, str(steps), output_dir]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    samples: list[tuple[float, int]] = []

    def sample():
        while proc.poll() is None:
            try:
                samples.append((time.time(), _rss(proc.pid)))
            except (OSError, StopIteration):
                break
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"variant": name, "error": f"exit {proc.returncode}: {' | '.join(err.strip().splitlines()[-3:])}"}
    result = json.loads(lines[-1])
    during = [rss for t, rss in samples if result["train_start"] <= t <= result["train_end"]]
    return {"variant": name, "allocator": allocator, "peak_rss_bytes": max(during), "samples": len(during), **result}


def peak_of(row: dict) -> int:
    """A run's or row's peak: the GPU allocator's where the worker ran on one, else the sampled resident memory."""
    return row.get("peak_cuda_bytes") or row["peak_rss_bytes"]


def summarise(runs: list[dict]) -> list[dict]:
    """One row per variant and allocator: the highest peak and the median of the runs' median step times."""
    rows = {}
    for run in runs:
        if "error" in run:
            rows.setdefault((run["variant"], run.get("allocator")), {"variant": run["variant"], "error": run["error"]})
            continue
        rows.setdefault((run["variant"], run["allocator"]), []).append(run)
    out = []
    for group in rows.values():
        if isinstance(group, dict):
            out.append(group)
            continue
        out.append(
            {
                **{k: group[0][k] for k in ("variant", "allocator", "trainable_parameters", "activation_savers")},
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in group),
                **(
                    {"peak_cuda_bytes": max(r["peak_cuda_bytes"] for r in group)}
                    if "peak_cuda_bytes" in group[0]
                    else {}
                ),
                "step_seconds": statistics.median(r["step_seconds"] for r in group),
                "train_loss": group[0]["train_loss"],
                "eval_loss": group[0]["eval_loss"],
                "runs": len(group),
            }
        )
    return out


def run_all(
    variants: list[str], steps: int, repeats: int, allocators: list[str], output_dir: str, job: dict | None = None
) -> list[dict]:
    """Each allocator, each repeat, each variant in turn (alternating, so drift hits every variant alike)."""
    runs = []
    for allocator in allocators:
        for repeat in range(repeats):
            for name in variants:
                started = time.time()
                runs.append(run_variant(name, steps, allocator, os.path.join(output_dir, "mainjob-run"), job))
                print(
                    f"[bench] {name} ({allocator} allocator, run {repeat + 1}/{repeats}): "
                    f"{runs[-1].get('error') or 'ok'} ({time.time() - started:.0f} s)",
                    flush=True,
                )
    return runs


def ratios(rows: list[dict]) -> dict:
    """The issue's questions, answered from one run: ours against PEFT LoRA + GC (memory) and PEFT LoRA (speed)."""
    out = {}
    for allocator in sorted({r.get("allocator") for r in rows if "error" not in r}):
        got = {r["variant"]: r for r in rows if r.get("allocator") == allocator and "error" not in r}
        gc, peft, ours = got.get("PEFT LoRA + GC"), got.get("PEFT LoRA"), got.get("ours")
        if ours and gc:
            out[f"{allocator}: ours peak / PEFT LoRA + GC peak"] = peak_of(ours) / peak_of(gc)
            frugal = min((r for n, r in got.items() if n.startswith("ours")), key=peak_of)
            out[f"{allocator}: PEFT LoRA + GC peak / ours at its most frugal ({frugal['variant']})"] = peak_of(
                gc
            ) / peak_of(frugal)
        if ours and peft:
            out[f"{allocator}: ours median step / PEFT LoRA median step"] = ours["step_seconds"] / peft["step_seconds"]
        # Exact settings: the same held-out loss, bit for bit, for every variant of the setting measured.
        for setting, names in EXACT.items():
            others = [got[name] for name in names if name in got]
            if ours and others:
                out[f"{allocator}: held-out loss equal with and without {setting}"] = float(
                    all(other["eval_loss"] == ours["eval_loss"] for other in others)
                )
        padded = got.get("ours without padding removal")
        if ours and padded:  # the same dropout masks, but products over another layout: close, not bit for bit
            out[f"{allocator}: held-out loss |difference| with and without padding removal"] = abs(
                ours["eval_loss"] - padded["eval_loss"]
            )
    return {k: float(f"{v:.4g}") for k, v in out.items()}


def table(rows: list[dict]) -> str:
    head = f"{'variant':<30}{'allocator':>10}{'peak GiB':>10}{'s/step':>8}{'train loss':>12}{'held-out':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:<30}  {r['error']}")
            continue
        lines.append(
            f"{r['variant']:<30}{r['allocator']:>10}{peak_of(r) / 2**30:>10.2f}{r['step_seconds']:>8.2f}"
            f"{r['train_loss']:>12.4f}{r['eval_loss']:>10.4f}"
        )
    return "\n".join(lines)


def main(
    variants: list[str] | None,
    steps: int,
    repeats: int,
    allocators: list[str],
    output_dir: str,
    preset: str = "mainjob",
) -> dict:
    """Run the comparison; returns the report `hf-lorafa bench --preset mainjob|mainjob-gpu` writes."""
    started = time.time()
    job = None
    if preset == "mainjob-gpu":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--preset mainjob-gpu measures GPU memory: run it on a machine with a CUDA GPU.")
        job = {**GPU_JOB, "model_path": build_model(GPU_JOB, os.path.join(output_dir, "model"))}
    runs = run_all(variants or (GPU_VARIANTS if job else list(VARIANTS)), steps, repeats, allocators, output_dir, job)
    rows = summarise(runs)
    print(table(rows))
    settings = {k: v for k, v in (job or JOB).items() if k != "model_path"}
    report = {
        "preset": preset,
        "settings": {**settings, "steps": steps, "repeats": repeats, "allocators": allocators, "model": "smollm2"},
        "seconds": round(time.time() - started, 1),
        "results": rows,
        "runs": runs,
        "ratios": ratios(rows),
    }
    print(json.dumps(report["ratios"], indent=1))
    return report


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(json.dumps(run_worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])), flush=True)
