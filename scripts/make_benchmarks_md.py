"""Regenerate BENCHMARKS.md and its plots from the JSON results under benchmarks/ (nothing is measured here).

python scripts/make_benchmarks_md.py  # reads benchmarks/mainjob*.json, cpu.json, gpu.json, cpu-lorafa-2r.json

mainjob-breakdown.json (`hf-lorafa bench --preset mainjob --breakdown`) adds "Where the default's peak goes" to the
main job's section.

It also writes the main job's table into README.md (between its `<!-- mainjob:start/end -->` markers).

The accuracy summary is the table research/results/accuracy-summary.json holds (written by
`python -m research.make_results_md`, which regenerates the lab's full tables in research/RESULTS.md).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from mainjob_tables import (  # noqa: E402  (a sibling module of this script)
    breakdown_section,
    gpu_section,
    intervals_section,
    mainjob_section,
    update_readme,
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
ACCURACY_SUMMARY = ROOT / "research" / "results" / "accuracy-summary.json"
WIDTH = 119
MiB = 1024 * 1024
TIMING_NOTE = (
    ", timed in a second process with glibc's default allocator (the memory process maps every large "
    "allocation afresh, see `bench.run_configuration`)"
)
CLAIMS = """\
**Against the papers.** LoRA-FA (Zhang et al., 2023) reports up to 1.4x lower memory than LoRA: it keeps r values
per token per adapted layer instead of the layer's input. The ratio a run shows depends on how much of the peak is
the adapters' share: our `saved` column isolates it (LoRA with dropout keeps `dropout(x)` and its mask for every
adapted layer; LoRA-FA keeps none of it), while the peak also holds weights, optimizer states, the logits and,
on CPU, the interpreter. LaMDA (Azizi et al., 2024) reports up to 1.32x lower peak memory and 17.7x fewer updated
parameters than LoRA; its saved bytes here equal LoRA-FA's, and the updated-parameter ratio is LoRA's trainable
count over LaMDA's after B is frozen (r² per layer)."""


def mib(n: float | None) -> str:
    return "–" if n is None else f"{n / MiB:.2f}"


def load(name: str) -> dict | None:
    path = BENCH / name
    return json.loads(path.read_text()) if path.exists() else None


def memory_section(report: dict, tag: str) -> list[str]:
    cuda = report["settings"]["device"] == "cuda"
    peak_key = "peak_cuda_bytes" if cuda else "peak_rss_bytes"
    s, dev = report["settings"], report["device"]
    ok = [r for r in report["results"] if "error" not in r]
    floor = {r["load_in_4bit"]: r for r in ok if r["method"] == "floor"}
    peft = {(r["dropout"], r["load_in_4bit"]): r for r in ok if r["method"] == "peft-lora"}
    out = [
        f"### {tag}: {dev.get('gpu') or dev.get('cpu')} ({dev['cores']} cores), torch {dev['torch']}",
        "",
        f"Llama architecture, random init: {json.dumps(s['model'])}; batch {s['batch']} × seq {s['seq']}, "
        f"r={s['r']}{f' (frozen-A methods r={lorafa_r})' if (lorafa_r := s.get('lorafa_r')) else ''}, alpha=2r, "
        "all linear "
        f"layers, AdamW, {s['dtype']}; median of {s['steps']} steps after a warm "
        f"step{'' if cuda else TIMING_NOTE}. Command: `{report['command']}` ({report['seconds']:.0f} s; "
        f"load average at the end "
        f"{', '.join(dev.get('load_average', []))}).",
        "",
        "`saved` = saved-for-backward bytes (hooks count); `retained` = VmRSS after the forward − before; "
        + (
            "`peak` = `torch.cuda.max_memory_allocated` over a warm step; "
            if cuda
            else "`peak` = resident high-water mark over one step (VmHWM reset before it) minus the process overhead "
            "(the worker's resident memory after torch has run a throwaway model, before this one is built); "
        )
        + "`est.` = `estimate_memory` for the same quantity. MiB throughout.",
        "",
        "| method | dropout | precision | saved | saved/floor | retained | peak | est. peak | est. err | "
        "step s | tok/s | PEFT LoRA step / this | trainable |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        quant = "4-bit" if r["load_in_4bit"] else s["dtype"]
        if "error" in r:
            out.append(f"| {r['method']} | {r['dropout']:g} | {quant} | error: {r['error'][:80]} |" + " |" * 9)
            continue
        overhead = 0 if cuda else r["overhead_bytes"]
        peak = r[peak_key] - overhead
        est = r.get("estimate")
        est_peak = est["peak"] - est["overhead"] if est else None
        err = f"{100 * (est_peak - peak) / peak:+.1f}%" if est else "–"
        f = floor.get(r["load_in_4bit"])
        p = peft.get((r["dropout"], r["load_in_4bit"]))
        trainable = f"{r['trainable_parameters']:,}"
        if "trainable_parameters_after_freeze" in r:
            trainable += f" → {r['trainable_parameters_after_freeze']:,}"
        over_floor = f"{r['saved_bytes'] / f['saved_bytes']:.3f}" if f else "–"
        method = r["method"] + (f" (r={r['r']})" if r.get("r", s["r"]) != s["r"] else "")
        out.append(
            f"| {method} | {r['dropout']:g} | {quant} | {mib(r['saved_bytes'])} | {over_floor} | "
            f"{mib(r['retained_rss_bytes'])} | {mib(peak)} | {mib(est_peak)} | {err} | {r['step_seconds']:.3f} | "
            f"{r['tokens_per_second']:.0f} | {p['step_seconds'] / r['step_seconds'] if p else float('nan'):.2f} | "
            f"{trainable} |"
        )
    if not cuda and ok:
        total_err = [abs(r["estimate"]["peak"] - r[peak_key]) / r[peak_key] for r in ok if r.get("estimate")]
        out += [
            "",
            f"Estimate against the whole resident peak (overhead included, as the test checks): largest "
            f"error {100 * max(total_err):.1f}% over {len(total_err)} configurations.",
        ]
    notes = report.get("notes") or []
    out += [""] + [f"Note: {n}" for n in notes]
    return out


def save_figure(fig, ax, name: str, alt: str, legend_size: int | None = None) -> str:
    """Add the legend, write benchmarks/NAME and close the figure; returns the Markdown image line."""
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(BENCH / name, dpi=110)
    plt.close(fig)
    return f"![{alt}](benchmarks/{name})"


def ratios_block(report: dict) -> list[str]:
    return ["Ratios (from the JSON):", "", "```json", json.dumps(report["ratios"], indent=1), "```", ""]


def equal_rank_section(report: dict) -> list[str]:
    """Memory with the frozen-A methods at twice LoRA's rank: LoRA's trainable parameters for LoRA-FA, the rank at
    which each of them matched LoRA's accuracy (LaMDA and LaMDA++ on the recipe the accuracy section names)."""
    s, ratios = report["settings"], report["ratios"].get(f"{report['settings']['dtype']}-dropout0.05", {})
    ok = [r for r in report["results"] if "error" not in r]
    trainable = {r["method"]: r["trainable_parameters"] for r in ok}
    lamdas = [name for method, name in (("lamda", "LaMDA"), ("lamda++", "LaMDA++")) if method in trainable]
    names = ", ".join(["LoRA-FA", *lamdas])
    out = [
        f"### Memory at the same accuracy: {names} at r={s['lorafa_r']}, LoRA at r={s['r']}",
        "",
        "The accuracy section below finds the frozen-A methods level with LoRA on drug-review at twice LoRA's rank "
        "(\"Done when, at LoRA's trainable parameters\"), where B alone has LoRA's trainable parameters. This run "
        "measures that pairing on the cpu preset's model: ours and PEFT's LoRA-FA"
        + "".join(f", ours {name}" for name in lamdas)
        + f" at r={s['lorafa_r']}, PEFT LoRA at r={s['r']}, in one run.",
    ]
    if ratios:
        out += [
            "",
            f"With dropout 0.05, LoRA-FA at r={s['lorafa_r']} keeps "
            f"{ratios['lorafa_saved_over_peft_lora']:.3f}× PEFT LoRA's saved-for-backward bytes "
            f"({ratios.get('lorafa_savers_saved_over_peft_lora', float('nan')):.3f}× with the trainer's default "
            f"activation savers) and {ratios['lorafa_saved_over_floor']:.3f}× the frozen floor's; PEFT LoRA's step "
            f"peak is {ratios['peft_lora_peak_over_lorafa']:.2f}× its own "
            f"({ratios.get('peft_lora_peak_over_lorafa_savers', float('nan')):.2f}× with the savers). Its gradients "
            f"and optimizer states are about LoRA's ({trainable['lorafa']:,} trainable against PEFT LoRA's "
            f"{trainable['peft-lora']:,}: B's 2r·d_out summed over the layers against LoRA's r·(d_in + d_out)), so "
            "the gain is the activations' share of the peak. The step times were taken beside two accuracy runs "
            "(load average in the heading): read them from the cpu table above.",
        ]
        if "lamda_saved_over_peft_lora" in ratios:
            out[-1] += (
                f" LaMDA at r={s['lorafa_r']} keeps {ratios['lamda_saved_over_peft_lora']:.3f}× PEFT LoRA's "
                f"saved-for-backward bytes, and PEFT LoRA's step peak is {ratios['peft_lora_peak_over_lamda']:.2f}× "
                f"LaMDA's; it trains {trainable['lamda']:,} parameters while B does, and r² a layer after."
            )
    return out + ["", *memory_section(report, f"cpu, frozen-A methods at r={s['lorafa_r']}"), *ratios_block(report)]


def plots(report: dict, tag: str) -> list[str]:
    ok = [r for r in report["results"] if "error" not in r and not r["load_in_4bit"]]
    cuda = report["settings"]["device"] == "cuda"
    peak_key = "peak_cuda_bytes" if cuda else "peak_rss_bytes"
    labels = [f"{r['method']}\n{r['dropout']:g}" for r in ok]
    fig, ax = plt.subplots(figsize=(11, 4))
    xs = range(len(ok))
    ax.bar([x - 0.2 for x in xs], [r["saved_bytes"] / MiB for r in ok], 0.4, label="saved for backward")
    ax.bar(
        [x + 0.2 for x in xs],
        [(r[peak_key] - (0 if cuda else r["overhead_bytes"])) / MiB for r in ok],
        0.4,
        label="step peak" + ("" if cuda else " − process overhead"),
    )
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("MiB")
    ax.set_title(f"Memory per method ({tag})")
    out = [save_figure(fig, ax, f"{tag}-memory.png", "memory per method"), ""]
    swept = [r for r in ok if r.get("saved_bytes_by_seq")]
    if swept:
        fig, ax = plt.subplots(figsize=(7, 4))
        seqs = sorted({int(k) for r in swept for k in r["saved_bytes_by_seq"]})
        head = "| method | dropout | " + " | ".join(f"seq {q}" for q in seqs) + " |"
        rows = [head, "|---|---|" + "---|" * len(seqs)]
        for r in swept:
            ys = [r["saved_bytes_by_seq"][str(q)] / MiB for q in seqs]
            ax.plot(seqs, ys, marker="o", label=f"{r['method']} (dropout {r['dropout']:g})")
            rows.append(f"| {r['method']} | {r['dropout']:g} | " + " | ".join(f"{y:.1f}" for y in ys) + " |")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("saved for backward, MiB")
        ax.set_title(f"Activation memory vs sequence length ({tag}, batch {report['settings']['batch']})")
        out += [
            "Saved-for-backward MiB by sequence length:",
            "",
            *rows,
            "",
            save_figure(fig, ax, f"{tag}-memory-vs-seq.png", "memory vs sequence length", legend_size=7),
            "",
        ]
    return out


def goal(name: str, value: float | None, target: float, higher: bool, fmt: str = "{:.3f}") -> str:
    if value is None:
        return f"| {name} | {'≥' if higher else '≤'} {target:g} | not measured | – |"
    reached = value >= target if higher else value <= target
    by = f"by {abs(value - target) / target * 100:.1f}%" if not reached else ""
    verdict = "reached" if reached else "missed " + by
    return f"| {name} | {'≥' if higher else '≤'} {target:g} | {fmt.format(value)} | {verdict} |"


def goals_section(cpu: dict | None, gpu: dict | None) -> list[str]:
    r = (cpu or {}).get("ratios", {}).get("bfloat16-dropout0.05", {})
    g = (gpu or {}).get("ratios", {}).get("bfloat16-dropout0.05", {})
    out = [
        "| goal (LoRA-FA, dropout 0.05) | target | measured | |",
        "|---|---|---|---|",
        goal("saved bytes / floor (CPU, bf16)", r.get("lorafa_saved_over_floor"), 1.03, False),
        goal("saved bytes / PEFT LoRA's", r.get("lorafa_saved_over_peft_lora"), 0.46, False),
        goal(
            "saved bytes / PEFT LoRA's, with the trainer's default activation savers",
            r.get("lorafa_savers_saved_over_peft_lora"),
            0.46,
            False,
        ),
        goal("PEFT LoRA step time / ours", r.get("peft_lora_step_time_over_lorafa"), 1.15, True),
        goal("PEFT LoRA-FA (frozen A) step time / ours", r.get("peft_lorafa_step_time_over_lorafa"), 1.0, True),
        goal("GPU peak: PEFT LoRA / ours", g.get("peft_lora_peak_over_lorafa"), 1.6, True),
        goal(
            "GPU peak: PEFT LoRA / ours with the default activation savers",
            g.get("peft_lora_peak_over_lorafa_savers"),
            1.6,
            True,
        ),
    ]
    return out


def accuracy_summary() -> list[str]:
    """Quality at the same trainable parameters: the lab's table as research/results/accuracy-summary.json holds it."""
    if not ACCURACY_SUMMARY.exists():
        return ["No accuracy summary yet: run `python -m research.make_results_md`, then this script."]
    summary = json.loads(ACCURACY_SUMMARY.read_text())
    return [
        "Each frozen-A method at twice LoRA's rank, where LoRA-FA's B alone has LoRA's trainable parameters, against "
        "LoRA (PEFT's and ours) at its own rank: all-MiniLM-L6-v2 on the drug-review set (3-class accuracy and "
        "macro-F1 on its 379 test rows) and SmolLM2-135M-Instruct on chatterbot at the main job's defaults (held-out "
        "loss). LoRA-FA at its defaults; LaMDA and LaMDA++ on the recipe research/RESULTS.md names (B trains as "
        "LoRA-FA's for the first 3/4 of the steps, then S alone). Mean gap over the seeds listed, with its standard "
        "error; a gap within about twice its s.e. of the target is not evidence that it differs from it.",
        "",
        *summary["table"],
        "",
        "Every run's command, the same table at the same rank (where the frozen-A methods stay behind LoRA on "
        "drug-review), the ablations and the experiments that ask why are in "
        "[research/RESULTS.md](research/RESULTS.md); how to rerun them in [research/README.md](research/README.md).",
    ]


def wrap(lines: list[str]) -> list[str]:
    """Prose lines wrapped at WIDTH; table rows, headings, images and code stay whole."""
    out, code = [], False
    for line in lines:
        code ^= line.startswith("```")
        if code or len(line) <= WIDTH or line.startswith(("|", "#", "!", "```")):
            out.append(line)
        else:
            out += textwrap.wrap(line, WIDTH, break_long_words=False, break_on_hyphens=False)
    return out


def main() -> int:
    cpu, gpu = load("cpu.json"), load("gpu.json")
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python scripts/make_benchmarks_md.py` from the JSON under `benchmarks/` and the accuracy "
        "summary `research/results/accuracy-summary.json`; every number below comes from those files.",
        "",
        "## Goals",
        "",
        *goals_section(cpu, gpu),
        "",
        CLAIMS,
        "",
    ]
    if mainjob := load("mainjob.json"):
        extra = load("mainjob-mmap.json"), load("mainjob-frugal.json"), load("mainjob-speed.json")
        lines += mainjob_section(mainjob, *extra, save_figure, goal)
        if breakdown := load("mainjob-breakdown.json"):
            lines += breakdown_section(breakdown)
        if memory := load("mainjob-memory.json"):
            lines += intervals_section(memory, goal)
        lines += gpu_section(load("mainjob-gpu.json"))
        update_readme(ROOT / "README.md", mainjob)
    lines += ["## Memory and speed per method", ""]
    for report, tag in ((cpu, "cpu"), (gpu, "gpu")):
        if report:
            lines += memory_section(report, tag) + [""] + plots(report, tag) + ratios_block(report)
    if equal := load("cpu-lorafa-2r.json"):
        lines += equal_rank_section(equal)
    if not gpu:
        lines += [
            "No GPU run yet: on a lent GPU, `hf-lorafa bench --preset gpu --output benchmarks/gpu.json` "
            "(TinyLlama-1.1B architecture, random init, bf16, 2 × 2048 tokens, plus 4-bit), then rerun this "
            "script.",
            "",
        ]
    lines += ["## Accuracy: quality at the same trainable parameters", "", *accuracy_summary()]
    lines += [
        "",
        "## Estimating before training",
        "",
        "`hf-lorafa estimate --model smollm2 --method all --batch 4 --seq 256 [--load-in-4bit] "
        "[--dropout 0.05]` "
        "prints weights, gradients, optimizer states, activations and the predicted peak for each method "
        "(`hf_lorafa.estimate_memory` in Python). The activation term counts what autograd keeps in "
        "stock transformers' Llama block (see the module docstring); the memory tables above compare it with "
        "the hooks count (`saved`) and the peak with the measured high-water mark. On CPU the peak includes "
        "the process itself, measured at run time: the resident memory once torch has run a throwaway "
        "two-layer model (the same function in the benchmark worker and in `hf-lorafa estimate`). "
        "LaMDA++ is estimated at its mean rank; activation savers (`lorafa+savers`) are not modelled.",
    ]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(wrap(lines)) + "\n")
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
