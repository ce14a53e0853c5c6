"""`hf-lorafa bench`: memory and speed of hf-lorafa's methods against PEFT LoRA, PEFT's LoRA-FA and full FT.

Follows the protocol in docs/memory.md. Each configuration runs in a fresh subprocess (env
`MALLOC_MMAP_THRESHOLD_=65536`, so freed tensors go back to the OS) that builds a randomly initialised
Llama-architecture model, takes one warm step (optimizer states now exist), then measures one step:
saved-for-backward bytes (`saved_tensor_bytes`), retained resident memory over the forward (VmRSS after − before),
the step's peak (VmHWM, reset through `/proc/self/clear_refs` just before the step; `ru_maxrss` if that fails), or
`torch.cuda.max_memory_allocated` on GPU; then the median time of a few more steps (on CPU in a second process with
the default allocator: see `run_configuration`). The floor is the same model
with no adapters, every weight frozen and gradient flowing to the input embeddings.

    hf-lorafa bench --preset cpu --output benchmarks/cpu.json

`--preset mainjob` is the main job side by side with what users run (`bench_mainjob`); `--preset mainjob-gpu` the
same on a lent GPU with a ≥1B Llama at 2048 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

# What the cpu and gpu presets compare: the frozen floor, full fine-tuning, PEFT's two, and ours.
COMPARED = ["floor", "full", "peft-lora", "peft-lorafa", "lora", "lorafa", "lamda", "lamda++", "lorafa+savers"]
PRESETS = {
    # Seconds: the test's preset. A tiny Llama, the methods that matter for the invariants.
    "cpu-small": {
        "model": {
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        "batch": 2,
        "seq": 32,
        "r": 4,
        "steps": 2,
        "dtype": "bfloat16",
        "device": "cpu",
        "methods": ["floor", "peft-lora", "lorafa", "lorafa+savers"],
        "dropouts": [0.05],
        "quant": [False],
        "seq_sweep": [],
        "jobs": 3,
    },
    # Minutes on 2 cores: a 32k-vocabulary Llama (33M parameters), batch 4 × 256 tokens.
    "cpu": {
        "model": {
            "vocab_size": 32000,
            "hidden_size": 384,
            "intermediate_size": 1024,
            "num_hidden_layers": 6,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
        },
        "batch": 4,
        "seq": 256,
        "r": 16,
        "steps": 7,
        "dtype": "bfloat16",
        "device": "cpu",
        "methods": COMPARED,
        "dropouts": [0.0, 0.05],
        "quant": [False, True],
        "seq_sweep": [64, 128, 256, 512],
        "jobs": 1,
        # 2 cores: dropout 0 and 4-bit only for the configurations the goals compare.
        "dropout0_methods": ["peft-lora", "peft-lorafa", "lora", "lorafa"],
        "quant_methods": ["floor", "peft-lora", "lora", "lorafa"],
    },
    # A lent H100/H200: TinyLlama-1.1B's architecture, random init, bf16, 2 × 2048 tokens, plus 4-bit.
    "gpu": {
        "model": {
            "vocab_size": 32000,
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_hidden_layers": 22,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
        },
        "batch": 2,
        "seq": 2048,
        "r": 16,
        "steps": 5,
        "dtype": "bfloat16",
        "device": "cuda",
        "methods": COMPARED,
        "dropouts": [0.0, 0.05],
        "quant": [False, True],
        "seq_sweep": [512, 1024, 2048, 4096],
        "jobs": 1,
    },
}
NO_DROPOUT = ("floor", "full")  # configurations without adapters measure once, at "dropout 0"
# The configurations `--lorafa-r` sets the rank of: every frozen-A method, ours and PEFT's.
FROZEN_A_METHODS = ("peft-lorafa", "lorafa", "lorafa+savers", "lamda", "lamda++")


def configurations(preset: dict) -> list[dict]:
    """Every (method, dropout, quantization) the preset measures; full fine-tuning cannot train 4-bit weights."""
    out = []
    for quant in preset["quant"]:
        for method in preset["methods"]:
            if quant and (method == "full" or method not in preset.get("quant_methods", [method])):
                continue
            for dropout in [0.0] if method in NO_DROPOUT else preset["dropouts"]:
                if dropout == 0 and method not in NO_DROPOUT + tuple(preset.get("dropout0_methods", [method])):
                    continue
                if not quant or dropout > 0 or method in NO_DROPOUT:
                    out.append({"method": method, "dropout": dropout, "load_in_4bit": quant})
    return out


def device_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        info["cpu"] = platform.processor()
    try:
        with open("/proc/loadavg") as f:
            info["load_average"] = f.read().split()[:3]
    except OSError:
        pass
    import torch

    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _worker(spec: dict, timeout: float, env: dict, *extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "hf_lorafa.cli.bench_worker", json.dumps(spec), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def worker_env(mmap_threshold: str | None = None) -> dict[str, str]:
    """A benchmark worker's environment: offline, quiet tokenizers, and glibc's mmap threshold where one is given."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return {**env, "MALLOC_MMAP_THRESHOLD_": mmap_threshold} if mmap_threshold else env


def run_configuration(spec: dict, timeout: float = 1800) -> dict:
    """Measure one configuration in fresh interpreters; returns its result, or `{"error": ...}`.

    Memory is measured with `MALLOC_MMAP_THRESHOLD_=65536` (freed tensors leave the resident set at once), which
    makes every large CPU allocation an mmap with fresh page faults, so its steps are slower than with glibc's
    default. So on CPU the step time comes from a second process with
    the default allocator, as users run; on GPU the caching allocator makes one process enough.
    """
    started = time.time()
    result = {**spec, **_worker(spec, timeout, worker_env("65536"))}
    if spec["device"] == "cpu" and "error" not in result:
        timing = _worker(spec, timeout, worker_env(), "--timing")
        result.update(timing if "error" not in timing else {"error": f"timing: {timing['error']}"})
        result["tokens_per_second"] = spec["batch"] * spec["seq"] / result["step_seconds"]
    return {**result, "wall_seconds": round(time.time() - started, 1)}


def _find(results: list[dict], method: str, dropout: float, quant: bool) -> dict | None:
    dropout = 0.0 if method in NO_DROPOUT else dropout
    for r in results:
        if r["method"] == method and r["dropout"] == dropout and r["load_in_4bit"] == quant and "error" not in r:
            return r
    return None


def worker_specs(preset: dict) -> list[dict]:
    """One worker spec per configuration of `preset`: the frozen-A methods at `lorafa_r` where it is set."""
    specs = []
    for config in configurations(preset):
        sweep = not config["load_in_4bit"] and (config["dropout"] > 0 or config["method"] in NO_DROPOUT)
        wide = config["method"] in FROZEN_A_METHODS and preset.get("lorafa_r")
        specs.append(
            {
                **{k: preset[k] for k in ("model", "batch", "seq", "r", "steps", "dtype", "device")},
                **config,
                **({"r": preset["lorafa_r"]} if wide else {}),
                "seq_sweep": preset["seq_sweep"] if sweep else [],
            }
        )
    return specs


def ratios(results: list[dict], preset: dict) -> dict:
    """Headline ratios per (precision, dropout): LoRA-FA against the floor, PEFT LoRA, PEFT's LoRA-FA, full FT."""
    out = {}
    peak = "peak_cuda_bytes" if preset["device"] == "cuda" else "peak_rss_bytes"

    def peak_over(a: dict, b: dict) -> float:
        """`a`'s step peak over `b`'s, each less its process overhead."""
        return (a[peak] - a.get("overhead_bytes", 0)) / max(b[peak] - b.get("overhead_bytes", 0), 1)

    for quant in preset["quant"]:
        for dropout in preset["dropouts"]:
            ours, floor = _find(results, "lorafa", dropout, quant), _find(results, "floor", dropout, quant)
            peft, peft_fa = _find(results, "peft-lora", dropout, quant), _find(results, "peft-lorafa", dropout, quant)
            lora, lamda = _find(results, "lora", dropout, quant), _find(results, "lamda", dropout, quant)
            if ours is None:
                continue
            key = f"{'4bit' if quant else preset['dtype']}-dropout{dropout:g}"
            r = {}
            if floor:
                r["lorafa_saved_over_floor"] = ours["saved_bytes"] / floor["saved_bytes"]
            if peft:
                r["lorafa_saved_over_peft_lora"] = ours["saved_bytes"] / peft["saved_bytes"]
                r["peft_lora_peak_over_lorafa"] = peak_over(peft, ours)
                r["peft_lora_step_time_over_lorafa"] = peft["step_seconds"] / ours["step_seconds"]
            savers = _find(results, "lorafa+savers", dropout, quant)
            if peft and savers:  # LoRA-FA as LoRAFATrainer runs it by default (activation_savers=True)
                r["lorafa_savers_saved_over_peft_lora"] = savers["saved_bytes"] / peft["saved_bytes"]
                r["peft_lora_peak_over_lorafa_savers"] = peak_over(peft, savers)
                r["peft_lora_step_time_over_lorafa_savers"] = peft["step_seconds"] / savers["step_seconds"]
            if peft_fa:
                r["peft_lorafa_step_time_over_lorafa"] = peft_fa["step_seconds"] / ours["step_seconds"]
            if lora:
                r["lora_saved_over_lorafa"] = lora["saved_bytes"] / ours["saved_bytes"]
            if lamda and peft:
                r["lamda_saved_over_peft_lora"] = lamda["saved_bytes"] / peft["saved_bytes"]
                r["peft_lora_peak_over_lamda"] = peak_over(peft, lamda)
            if lamda and lora:
                r["lora_over_lamda_updated_parameters"] = lora["trainable_parameters"] / max(
                    lamda.get("trainable_parameters_after_freeze", lamda["trainable_parameters"]), 1
                )
            full = _find(results, "full", 0.0, False)
            if full:
                r["full_peak_over_lorafa"] = peak_over(full, ours)
            out[key] = {k: round(v, 4) for k, v in r.items()}
    return out


def _table(results: list[dict], device: str) -> str:
    from ..memory.measure import format_bytes

    peak = "peak_cuda_bytes" if device == "cuda" else "peak_rss_bytes"
    head = (
        f"{'method':<14}{'drop':>5}{'quant':>6}{'saved':>12}{'retained':>12}{'peak':>12}{'est. peak':>12}"
        f"{'step s':>9}{'tok/s':>9}{'trainable':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['method']:<14}{r['dropout']:>5g}{'4bit' if r['load_in_4bit'] else '-':>6}  {r['error']}")
            continue
        lines.append(
            f"{r['method']:<14}{r['dropout']:>5g}{'4bit' if r['load_in_4bit'] else '-':>6}"
            f"{format_bytes(r['saved_bytes']):>12}{format_bytes(r.get('retained_rss_bytes', 0)):>12}"
            f"{format_bytes(r[peak]):>12}{format_bytes(r['estimate']['peak']) if r.get('estimate') else '-':>12}"
            f"{r['step_seconds']:>9.3f}{r['tokens_per_second']:>9.0f}{r['trainable_parameters']:>12,}"
        )
    return "\n".join(lines)


def _mainjob(args: argparse.Namespace, argv: list[str] | None) -> int:
    from . import bench_breakdown, bench_mainjob

    variants = args.variants.split(",") if args.variants else None
    unknown = set(variants or []) - set(bench_mainjob.VARIANTS)
    if unknown:
        raise SystemExit(f"--variants {', '.join(sorted(unknown))}: not one of {', '.join(bench_mainjob.VARIANTS)}")
    if args.breakdown and variants:
        raise SystemExit(f"--breakdown measures the default variant ({bench_breakdown.VARIANT!r}); drop --variants.")
    with tempfile.TemporaryDirectory(prefix="hf-lorafa-bench-") as output_dir:  # the runs save nothing worth keeping
        if args.breakdown:
            report = bench_breakdown.main(args.steps, output_dir)
        else:
            # On a GPU the peak is the CUDA allocator's: glibc's settings change nothing it measures.
            allocators = ["default"] if args.preset == "mainjob-gpu" else args.allocators.split(",")
            report = bench_mainjob.main(variants, args.steps, args.repeats, allocators, output_dir, args.preset)
    report.update(
        device=device_info(), command="hf-lorafa bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.output}")
    return 1 if "error" in report or any("error" in r for r in report.get("results", [])) else 0


def main(argv: list[str] | None = None) -> int:
    """`hf-lorafa bench --preset cpu-small|cpu|gpu|mainjob|mainjob-gpu [--output FILE] [--methods a,b] ...`."""
    parser = argparse.ArgumentParser(prog="hf-lorafa bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS) + ["mainjob", "mainjob-gpu"], default="cpu-small")
    parser.add_argument("--output", default=None, help="Write the JSON results here (e.g. benchmarks/cpu.json).")
    parser.add_argument("--methods", default=None, help="Comma-separated subset of the preset's methods.")
    parser.add_argument("--no-4bit", action="store_true", help="Skip the 4-bit configurations.")
    parser.add_argument("--seq", type=int, default=None, help="Override the preset's sequence length.")
    parser.add_argument("--batch", type=int, default=None, help="Override the preset's batch size.")
    parser.add_argument("--jobs", type=int, default=None, help="Configurations measured at once (timings skew).")
    parser.add_argument(
        "--lorafa-r",
        type=int,
        default=None,
        help="Rank of the frozen-A configurations (LoRA-FA, ours and PEFT's, LaMDA and LaMDA++; LoRA's stays the "
        "preset's r). Twice the preset's r gives LoRA-FA LoRA's trainable parameters.",
    )
    parser.add_argument("--variants", default=None, help="mainjob: comma-separated subset of its variants.")
    parser.add_argument("--steps", type=int, default=12, help="mainjob: training steps per variant.")
    parser.add_argument("--repeats", type=int, default=2, help="mainjob: runs per variant, alternating.")
    parser.add_argument("--allocators", default="default,mmap", help="mainjob: glibc default and/or mmap.")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="mainjob: instead of the side by side, where the default's peak goes (one run of 'ours', default "
        "allocator; --steps applies, --variants, --repeats and --allocators do not).",
    )
    args = parser.parse_args(argv)
    if args.breakdown and args.preset != "mainjob":
        parser.error("--breakdown takes the main job apart: use it with --preset mainjob")
    if args.preset in ("mainjob", "mainjob-gpu"):
        return _mainjob(args, argv)
    if args.lorafa_r is not None and args.lorafa_r < 1:
        parser.error(f"--lorafa-r must be a positive rank, got {args.lorafa_r}")
    preset = dict(PRESETS[args.preset])
    if args.methods:
        unknown = set(args.methods.split(",")) - set(preset["methods"])
        if unknown:
            parser.error(f"--methods {', '.join(sorted(unknown))} not in this preset: {', '.join(preset['methods'])}")
        preset["methods"] = [m for m in preset["methods"] if m in args.methods.split(",")]
    if args.no_4bit:
        preset["quant"] = [False]
    preset.update({k: v for k, v in (("seq", args.seq), ("batch", args.batch), ("lorafa_r", args.lorafa_r)) if v})
    notes = []
    if True in preset["quant"]:
        try:
            from ..data import base_model  # noqa: F401  (4-bit needs the bitsandbytes loader)
        except ImportError as err:
            preset["quant"] = [False]
            notes.append(f"4-bit skipped: hf_lorafa.data.base_model is not importable ({err})")
    specs = worker_specs(preset)
    started = time.time()
    # Parallel workers only where timings are not the point (the test's preset): memory is per process anyway.
    with ThreadPoolExecutor(max_workers=args.jobs or preset["jobs"]) as pool:
        results = list(pool.map(run_configuration, specs))
    for r in results:
        print(
            f"[bench] {r['method']} dropout={r['dropout']:g} 4bit={r['load_in_4bit']}: "
            f"{r.get('error') or 'ok'} ({r.get('wall_seconds', 0)} s)",
            flush=True,
        )
    report = {
        "preset": args.preset,
        "settings": preset,
        "device": device_info(),
        "notes": notes,
        "command": "hf-lorafa bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "seconds": round(time.time() - started, 1),
        "jobs": args.jobs or preset["jobs"],
        "results": results,
        "ratios": ratios(results, preset),
    }
    print(_table(results, preset["device"]))
    print(json.dumps(report["ratios"], indent=1))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.output}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
