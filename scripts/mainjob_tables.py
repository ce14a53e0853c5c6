"""The main job side by side (benchmarks/mainjob*.json): BENCHMARKS.md's section, its frontier plot, README's table,
and where the default's peak goes (mainjob-breakdown.json).

Used by make_benchmarks_md.py; nothing is measured here.
"""

from __future__ import annotations

import re
from pathlib import Path

from hf_lorafa.cli.bench_mainjob import peak_of

GiB = 2**30
README_BLOCK = re.compile(r"(<!-- mainjob:start -->\n).*?(<!-- mainjob:end -->)", re.S)
# What each variant is, in the words a user of that tool would use.
DESCRIPTION = {
    "ours": 'hf-lorafa LoRA-FA, defaults (`block_recompute="all"`)',
    "ours with attention replay only": 'hf-lorafa LoRA-FA, `block_recompute="attention"`',
    "ours without block recompute": 'hf-lorafa LoRA-FA, `block_recompute="none"`',
    "ours without padding removal": "hf-lorafa LoRA-FA, `remove_padding=False`",
    "ours + malloc_trim": "hf-lorafa LoRA-FA, `trim_cpu_memory=True`",
    "ours + GC": "hf-lorafa LoRA-FA + gradient checkpointing",
    "ours + GC + 4-bit base": "hf-lorafa LoRA-FA + gradient checkpointing, 4-bit base",
    "ours + bf16 weights": "hf-lorafa LoRA-FA, base loaded in bf16",
    "ours + GC + bf16 weights": "hf-lorafa LoRA-FA + gradient checkpointing, base loaded in bf16",
    "PEFT LoRA": "PEFT LoRA, stock `Trainer`",
    "PEFT LoRA + GC": "PEFT LoRA + gradient checkpointing",
    "PEFT LoRA-FA optimizer": "PEFT LoRA + PEFT's LoRA-FA optimizer",
    "PEFT LoRA, padding-free collator": "PEFT LoRA, transformers' `DataCollatorWithFlattening`",
    "TRL SFTTrainer (PEFT LoRA)": "TRL `SFTTrainer` defaults (GC, bf16) + PEFT LoRA",
    "LoRAFASFTTrainer": "hf-lorafa `LoRAFASFTTrainer` defaults (GC, bf16)",
    "LoRAFASFTTrainer without GC": "hf-lorafa `LoRAFASFTTrainer`, `gradient_checkpointing=False` (bf16)",
}

# README's short table: ours' default, its speed and memory settings, and what users of each other tool run.
README_ROWS = [
    "ours",
    "ours with attention replay only",
    "ours without block recompute",
    "ours + GC + bf16 weights",
    "PEFT LoRA",
    "PEFT LoRA + GC",
    "PEFT LoRA-FA optimizer",
    "TRL SFTTrainer (PEFT LoRA)",
    "LoRAFASFTTrainer",
]


def _rows(report: dict) -> dict[str, dict]:
    return {r["variant"]: r for r in report["results"] if "error" not in r}


def _table(report: dict, columns: str = "full") -> list[str]:
    rows = _rows(report)
    gc, peft = rows.get("PEFT LoRA + GC"), rows.get("PEFT LoRA")
    out = [
        "| variant | peak GiB | / PEFT LoRA + GC | s/step | / PEFT LoRA | train loss | held-out loss |",
        "|---|---|---|---|---|---|---|",
    ]
    if columns == "readme":
        out = ["| variant | peak GiB | s/step |", "|---|---|---|"]
    if columns == "readme":
        rows = {name: rows[name] for name in README_ROWS if name in rows}
    for name, r in rows.items():
        peak, step = peak_of(r) / GiB, r["step_seconds"]
        label = DESCRIPTION.get(name, name)
        if columns == "readme":
            out.append(f"| {label} | {peak:.2f} | {step:.2f} |")
            continue
        over_gc = f"{peak_of(r) / peak_of(gc):.2f}" if gc else "–"
        over_peft = f"{step / peft['step_seconds']:.2f}" if peft else "–"
        out.append(
            f"| {label} | {peak:.2f} | {over_gc} | {step:.2f} | {over_peft} | {r['train_loss']:.4f} | "
            f"{r['eval_loss']:.4f} |"
        )
    out += [f"| {r['variant']} | failed: {r['error']} | | | | | |" for r in report["results"] if "error" in r]
    return out


def frontier_plot(report: dict, save_figure) -> str:
    """Peak against median step time, one point per variant."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, r in _rows(report).items():
        ours = name.startswith(("ours", "LoRAFA"))
        ax.scatter(r["step_seconds"], r["peak_rss_bytes"] / GiB, marker="o" if ours else "s", label=name)
    ax.set_xlabel("median seconds per step")
    ax.set_ylabel("whole-training peak resident memory (GiB)")
    ax.set_title("Main job on CPU: memory against speed (lower left is better)")
    ax.grid(alpha=0.3)
    return save_figure(fig, ax, "mainjob-frontier.png", "peak memory against step time per variant", legend_size=7)


def _most_frugal(*reports: dict | None) -> float | None:
    """PEFT LoRA + GC's peak over ours' lowest, the best any one run (default allocator) measured."""
    found = [
        v
        for report in reports
        if report
        for k, v in report["ratios"].items()
        if k.startswith("default: PEFT LoRA + GC peak / ours at its most")
    ]
    return max(found, default=None)


def _ratios_json(report: dict) -> list[str]:
    """A run's ratios as a JSON-looking block, one `"question": value` per line."""
    return ["```json", *[f'"{k}": {v}' for k, v in report["ratios"].items()], "```"]


def _goals(report: dict, mmap: dict | None, frugal: dict | None, speed: dict | None, goal) -> list[str]:
    """The targets the main job's default is held to, against the runs' ratios (the step ratio from the speed
    pass where there is one)."""
    r, m = report["ratios"], (mmap or {}).get("ratios", {})
    step = "default: ours median step / PEFT LoRA median step"
    return [
        "| goal (main job, CPU) | target | measured | |",
        "|---|---|---|---|",
        goal("ours' default peak / PEFT LoRA + GC's", r.get("default: ours peak / PEFT LoRA + GC peak"), 0.75, False),
        goal(
            "ours' default median step / PEFT LoRA's (no GC)" + (", speed pass" if speed else ""),
            (speed or report)["ratios"].get(step),
            1.0,
            False,
        ),  # fmt: skip
        goal(
            "the same peak ratio, `MALLOC_MMAP_THRESHOLD_=65536`",
            m.get("mmap: ours peak / PEFT LoRA + GC peak"),
            0.75,
            False,
        ),  # fmt: skip
        goal("PEFT LoRA + GC's peak / ours at its most frugal", _most_frugal(report, frugal), 2.0, True),
        goal(
            "held-out loss identical with and without block recompute (1 = yes)",
            r.get("default: held-out loss equal with and without block recompute"),
            1.0,
            True,
            "{:.0f}",
        ),  # fmt: skip
        goal(
            "held-out loss difference with and without padding removal (the same dropout masks)",
            r.get("default: held-out loss |difference| with and without padding removal"),
            1e-4,
            False,
            "{:.1e}",
        ),  # fmt: skip
    ]


def mainjob_section(
    report: dict, mmap: dict | None, frugal: dict | None, speed: dict | None, save_figure, goal
) -> list[str]:
    s, dev = report["settings"], report["device"]
    out = [
        "## Main job side by side (what users run)",
        "",
        f"SmolLM2-135M-Instruct (fp32) on chatterbot-corpus, batch {s['batch']} × up to {s['max_length']} tokens, "
        f"r={s['r']}, LoRA dropout {s['dropout']}, learning rate {s['lr']} (cosine), seed {s['seed']}, "
        f"{s['steps']} steps; every variant in its own process, {s['repeats']} runs each, alternating. Peak = the "
        "child's resident memory sampled every 2 ms by the parent over training (the whole run: the trainer's "
        "memory log resets the kernel's high-water mark, so VmHWM at the end would hold only the last interval), "
        "the highest of the runs; s/step = the median of the runs' median step times (first step left out); "
        f"held-out loss on {s['eval_rows']} rows after training. {dev.get('cpu')} ({dev['cores']} cores), torch "
        f"{dev['torch']}, load average at the end {', '.join(dev.get('load_average', []))}. Command: "
        f"`{report['command']}` ({report['seconds']:.0f} s).",
        "",
        *_goals(report, mmap, frugal, speed, goal),
        "",
        *_table(report),
        "",
        "TRL's variants train in bf16 autocast (SFTConfig's default; on CPU TRL asks for `use_cpu`) on the chat "
        "template of the same pairs, so their losses are not comparable with the others'; PEFT's and ours read the "
        "same tokenized rows (loss on the answer). Block recompute (`attention`, `none` against the default's `all`) "
        "changes no loss, bit for bit (goal table); padded batches (`remove_padding=False`) draw the dropout masks "
        "of their padding-free form token for token, so those runs differ only by the matrix products' rounding "
        "over the other layout.",
        "",
        frontier_plot(report, save_figure),
        "",
        "Ratios (from the JSON):",
        "",
        *_ratios_json(report),
    ]
    if speed:
        out += [
            "",
            f"Speed pass: ours' default and PEFT LoRA alone, {speed['settings']['repeats']} runs each, one after "
            "the other (so the machine's drift between runs falls on both alike): "
            f"`{speed['command']}` ({speed['seconds']:.0f} s). Each run's median step, in order: "
            + "; ".join(f"{r['variant']} {r['step_seconds']:.2f} s" for r in speed["runs"] if "error" not in r)
            + ".",
            "",
            *_table(speed),
            "",
            *_ratios_json(speed),
        ]
    if mmap:
        out += [
            "",
            "With `MALLOC_MMAP_THRESHOLD_=65536` (every large allocation mapped and returned on free, so the peak "
            "is live memory; steps are slower for it): "
            f"`{mmap['command']}`.",
            "",
            *_table(mmap),
            "",
            *_ratios_json(mmap),
        ]
    if frugal:
        out += [
            "",
            f"The frugal settings beside PEFT LoRA + GC, in one run of their own, for memory (its step times are "
            f"not for comparing: other work ran beside some of its variants): `{frugal['command']}`.",
            "",
            *_table(frugal),
            "",
            *_ratios_json(frugal),
        ]
    return out + [""]


def update_readme(readme: Path, report: dict) -> None:
    """Replace the table between README's `<!-- mainjob:start/end -->` markers with this run's."""
    text = readme.read_text()
    table = "\n".join(_table(report, "readme")) + "\n"
    new = README_BLOCK.sub(lambda m: m.group(1) + table + m.group(2), text)
    if new == text and table not in text:
        raise SystemExit(f"{readme} has no <!-- mainjob:start --> ... <!-- mainjob:end --> block")
    readme.write_text(new)


def breakdown_section(report: dict) -> list[str]:
    """The subsection "Where the default's peak goes": the parts of one run's highest sampled resident memory."""
    peak, where, dev, s = report["peak_rss_bytes"], report["peak"], report["device"], report["settings"]
    batch = "×".join(str(n) for n in where["batch_shape"] or []) or "?"
    place = f" of `{where['where']}`" if where["where"] else ""
    parts = report["components"]
    rows = [f"| {p['what']} | {p['bytes'] / 2**20:.1f} | {p['bytes'] / peak:.1%} |" for p in parts if p["bytes"]]
    zero = "; ".join(p["what"] for p in parts if not p["bytes"])
    after = report.get("saved_after_forward") or {}
    kept = ", ".join(f"{kind.replace('_', ' ')} {n / 2**20:.1f}" for kind, n in after.items() if n)
    replays = ", ".join(f"{kind} {n / 2**20:.1f}" for kind, n in report["replay_max_bytes"].items() if n)
    return [
        "### Where the default's peak goes",
        "",
        f"One run of the default variant ({DESCRIPTION.get(s['variant'], s['variant'])}) on the same job for "
        f"{s['steps']} steps, in its own process with glibc's default allocator. Its resident memory (VmRSS) is read "
        "at every module's forward entry and exit (backward's replays included), when backward reaches each module's "
        "output, at each trained parameter's gradient and around the optimizer step; at the highest reading it is "
        f"taken apart. That reading, {peak / GiB:.2f} GiB, came at step {where['step']}, {where['phase']} phase "
        f"({where['event']}{place}), batch {batch} tokens; the kernel's high-water mark over the same steps was "
        f"{report['vmhwm_bytes'] / GiB:.2f} GiB (what came and went between two readings). {dev.get('cpu')} "
        f"({dev['cores']} cores), torch {report['torch']}, transformers {report['transformers']}. Command: "
        f"`{report['command']}` ({report['seconds']:.0f} s, {report['samples']:,} readings).",
        "",
        "| part of the peak | MiB | share |",
        "|---|---|---|",
        *rows,
        f"| **VmRSS at the peak** | **{peak / 2**20:.1f}** | 100% |",
        "",
        *([f"Nothing at that moment: {zero}.", ""] if zero else []),
        "Weights are the parameters' and buffers' storages (of which "
        f"{report['weights_file_mapped_bytes'] / 2**20:.1f} MiB mapped from the safetensors file, resident as file "
        "pages); gradients and optimizer state are the trained parameters' `.grad` and AdamW's moments then. Saved "
        "activations are the storages autograd held for backward at that moment, each under the module that saved "
        "it (`saved_tensors_hooks`, counted once per storage, dropped when autograd lets go); what a checkpoint's "
        "replay holds in backward is read from the checkpoint's frame. The rest comes from glibc's `mallinfo2()`: the "
        "live heap (`uordblks` + `hblkhd`) less the tensors above is the heap already live at the first step's start "
        "plus the step's transients; the allocator's slack is the heap's free bytes (`fordblks`, which also counts "
        "pages `malloc_trim` gave back, so the base reads low by those); the base is VmRSS less the heap (`arena` + "
        "`hblkhd`) and the file-mapped weights, split into mapped files (libraries' code) and the rest. The parts "
        "sum to the reading exactly (the code asserts it).",
        "",
        f"After that step's forward autograd held (MiB): {kept or 'nothing'}. The most a block's replay held at a "
        f"reading in backward (MiB): {replays or 'none seen'}; a replay's whole set (attention's q, k, v and output, "
        "SwiGLU's gate, up and activation) is alive only between two readings, since no module runs after its last "
        "saved tensor.",
        *[f"Note: {note}" for note in report["notes"]],
        "",
    ]


def climb(memory: dict) -> list[tuple[int, float, float, float]]:
    """Per log of the main job's memory.json: (step, peak MiB, largest step's activations MiB, excess), the excess
    being how far the peak rose since the first log beyond the rise of the activations, as a share of the first
    log's peak."""
    history = [h for h in memory["history"] if "memory/activation_mib" in h]
    if not history:
        return []
    peak0, act0 = history[0]["memory/peak_mib"], history[0]["memory/activation_mib"]
    return [
        (
            h["step"],
            h["memory/peak_mib"],
            h["memory/activation_mib"],
            ((h["memory/peak_mib"] - peak0) - (h["memory/activation_mib"] - act0)) / peak0,
        )
        for h in history
    ]


def intervals_section(memory: dict, goal) -> list[str]:
    """The main job's peak per logging interval against the activations of the interval's largest step."""
    rows = climb(memory)
    if not rows:
        return []
    worst = max(rows, key=lambda row: row[3])
    return [
        "### Across the main job's logging intervals",
        "",
        "`make train` (`hf-lorafa train`, the main job: 40 steps, a log every 5) on the same machine, its "
        "`memory.json` copied to benchmarks/mainjob-memory.json. Each log's peak is the process's resident "
        "high-water mark since the previous log; its activations are the largest saved-for-backward bytes of a "
        "step since the previous log (batches differ in tokens, and the largest step sets the interval's peak). "
        "Excess = how far the peak rose since the first log beyond the rise of those activations, as a share of "
        "the first log's peak.",
        "",
        "| goal (main job, CPU) | target | measured | |",
        "|---|---|---|---|",
        goal("largest excess over the logs", worst[3], 0.10, False, "{:.1%}"),
        "",
        "| step | peak MiB | largest step's activations MiB | excess |",
        "|---|---|---|---|",
        *(f"| {step} | {peak:.0f} | {act:.1f} | {excess:.1%} |" for step, peak, act, excess in rows),
        "",
    ]


def gpu_section(report: dict | None) -> list[str]:
    """The main job's variants on a lent GPU (`--preset mainjob-gpu`), or how to run it where none has been."""
    if report is None:
        return [
            "### On a GPU",
            "",
            "No GPU run yet (no device was lent to the sessions so far): on a lent GPU, `hf-lorafa bench --preset "
            "mainjob-gpu --output benchmarks/mainjob-gpu.json` (TinyLlama-1.1B's architecture with SmolLM2's "
            "tokenizer, random init, bf16 weights, batch 2 × 2048 tokens of the same pairs packed end to end; peak = "
            "`torch.cuda.max_memory_allocated()` over training), then rerun this script. Until then the README's "
            "choices are the CPU's.",
            "",
        ]
    settings, device = report["settings"], report.get("device", {})
    return [
        "### On a GPU",
        "",
        f"{device.get('gpu', 'GPU')}, torch {device.get('torch', '?')}: TinyLlama-1.1B's architecture with SmolLM2's "
        f"tokenizer (random init, seed {settings['seed']}), {settings['dtype']} weights, batch {settings['batch']} × "
        f"{settings['max_length']} tokens of the pairs packed end to end, {settings['steps']} steps, "
        f"{settings['repeats']} run(s) per variant, alternating; peak = the largest "
        "`torch.cuda.max_memory_allocated()` at a step's end over training. "
        f"Command: `{report['command']}` ({report['seconds']:.0f} s).",
        "",
        *_table(report),
        "",
        *_ratios_json(report),
        "",
    ]
