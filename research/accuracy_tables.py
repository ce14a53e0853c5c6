"""RESULTS.md's accuracy part, from the JSON runs under research/results/accuracy/ (nothing is measured here).

Protocol 2 runs are `research/results/accuracy/*.json`; protocol 1 runs (5 warmup steps, 15 chatterbot steps, r=8)
are under `v1/` and appear only in the protocol comparison.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from hf_lorafa import LoRAFAConfig, adapter_layers, drugreview_split, inject_adapters
from research.a_directions import KINDS as DIRECTION_KINDS
from research.a_directions import OUT as A_DIRECTIONS
from research.accuracy import (
    ABLATION,
    DRUG_ABLATION,
    EQUAL_PARAMETERS,
    LAMDA,
    LAMDA_AS_LORAFA,
    LORAFA,
    PLANS,
    PROTOCOL,
    RESULTS,
    TASKS,
    equal_parameters,
    full_options,
    lamda_options,
    load_model,
    recorded_options,
    recorded_spec,
    run_argv,
    run_name,
)
from research.oracle_a import OUT as ORACLE
from research.oracle_a import TAGS as ORACLE_TAGS
from research.update_norms import OUT as UPDATE_NORMS

# Issue 13's independent PEFT LoRA run (same nominal settings, someone else's script): quoted, not measured here.
INDEPENDENT = {"accuracy": (72.3, 71.0, 71.5), "macro_f1": (0.499, 0.508, 0.513)}


def load_runs(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def current_runs() -> list[dict]:
    """The finished runs of the current protocol (RESULTS' top level, trained with today's TASKS entries)."""
    return [r for r in load_runs(RESULTS) if recorded_spec(r) == TASKS[r["task"]]]


def options_of(run: dict) -> tuple:
    """A run's options as the plan names them (protocol 1 named LoRA-FA's ratio only)."""
    if run.get("protocol", 1) >= 2:
        return recorded_options(run)
    ratio = run.get("lorafa_lr_ratio")
    return (("lorafa_lr_ratio", ratio),) if ratio is not None else ()


def values(runs: list[dict], key: str, scale: float = 1.0) -> list[float]:
    return [r[key] * scale for r in runs if r.get(key) is not None]


def stat(vals: list[float], digits: int = 3) -> str:
    if not vals:
        return "–"
    sd = f" ± {statistics.stdev(vals):.{digits}f}" if len(vals) > 1 else ""
    return f"{statistics.mean(vals):.{digits}f}{sd}"


def seeds_cell(runs: list[dict]) -> str:
    seeds = ", ".join(str(r["seed"]) for r in sorted(runs, key=lambda r: r["seed"]))
    return seeds + ("" if len(runs) >= 3 else f" (only {len(runs)} of 3 seeds ran)")


def label(options: tuple) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options) or "–"


def command(runs: list[dict]) -> str:
    """The `run` command of the row's first seed (the others differ only in `--seed`)."""
    first = min(runs, key=lambda r: r["seed"])
    if first.get("protocol", 1) >= 2:  # every option spelled out: the command reruns it whatever today's defaults
        argv = run_argv(first["task"], first["impl"], first["method"], first["seed"], recorded_options(first))
        return f"`python -m research.accuracy run {' '.join(argv)}`"
    return f"`{first['command']}`" if first.get("command") else "–"


def warmup_label(warmup: float) -> str:
    """Trainer's `warmup_steps`: a fraction of the steps below 1, a step count from 1."""
    return f"{warmup:.0%} of steps" if warmup < 1 else f"{warmup:g} steps"


def grouped(runs: list[dict]) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in runs:
        groups[(r["task"], r["impl"], r["method"], options_of(r))].append(r)
    return groups


@functools.cache
def majority_share() -> float:
    """The largest class's share of the drug-review test split (read once)."""
    counts = Counter(r["label"] for r in drugreview_split("test"))
    return max(counts.values()) / sum(counts.values())


def majority_f1() -> float:
    """Macro-F1 of answering the majority class: its F1 (2p / (1 + p)) over 3 classes, the others 0."""
    share = majority_share()
    return 2 * share / (1 + share) / 3


def at_prior(run: dict) -> bool:
    """The run answers the majority class for every test review (accuracy = its share, macro-F1 = its F1)."""
    share = majority_share()
    return abs(run["eval_accuracy"] - share) < 1e-6 and abs(run["eval_macro_f1"] - majority_f1()) < 1e-6


def change_label(run: dict) -> str:
    """A variant's change from its protocol ("–" for a run of the current protocol, whatever it was told)."""
    if recorded_spec(run) == TASKS[run["task"]]:
        return "–"
    return ", ".join(f"{k}={v}" for k, v in run.get("spec_changes", {}).items()) or "–"


def protocol_section(v1: list[dict], v2: list[dict], current: list[dict]) -> list[str]:
    """PEFT LoRA on drug-review under protocols 1-3 and the variants tried, against the independent figures."""
    out = [
        "### Protocol: the drug-review baseline",
        "",
        "| protocol | change | implementation | seeds | accuracy per seed | accuracy | macro-F1 | eval loss | "
        "runs at the class prior |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    means = {}
    sets = (("1 (`v1/`: warmup 5 steps)", v1), ("2 (`v2/`: warmup 10%)", v2), ("3 (head + pooler)", current))
    for tag, runs in sets:
        for impl in ("peft", "ours"):
            lora = [r for r in runs if r["task"] == "drugreview" and r["impl"] == impl and r["method"] == "lora"]
            for change in sorted({change_label(r) for r in lora}):
                rs = sorted((r for r in lora if change_label(r) == change), key=lambda r: r["seed"])
                acc = values(rs, "eval_accuracy", 100)
                if change == "–":
                    means[(tag[0], impl)] = acc
                out.append(
                    f"| {tag} | {change} | {impl} LoRA | {seeds_cell(rs)} | {' / '.join(f'{a:.1f}' for a in acc)} "
                    f"| {stat(acc, 1)} | {stat(values(rs, 'eval_macro_f1'))} | {stat(values(rs, 'eval_loss'))} | "
                    f"{sum(at_prior(r) for r in rs)} of {len(rs)} |"
                )
    ind_acc, ind_f1 = INDEPENDENT["accuracy"], INDEPENDENT["macro_f1"]
    out += [
        f"| independent (issue 13, not run here) | – | PEFT LoRA | 3 | {' / '.join(map(str, ind_acc))} | "
        f"{stat(list(ind_acc), 1)} | {stat(list(ind_f1))} | – | – |",
        "",
    ]
    share = majority_share()
    stuck = [r for r in v2 if r["task"] == "drugreview" and at_prior(r)]
    probe_path = RESULTS.parent / "drugreview-probe.json"
    if stuck and probe_path.exists():
        probe = json.loads(probe_path.read_text())
        best = {k: max(v["probe"].values(), key=lambda m: m["accuracy"]) for k, v in probe.items() if "probe" in v}
        out += [
            f"Diagnosis. Under protocol 2, {len(stuck)} of {sum(r['task'] == 'drugreview' for r in v2)} drug-review "
            "runs (variants included) ended at the class prior (every test "
            f"review called positive: {100 * share:.1f}% / macro-F1 {majority_f1():.3f}), among them "
            "PEFT LoRA's seed 2 (its training loss stays at the labels' entropy, 0.86, for all 304 steps) and ours "
            "LaMDA's seed 0; the seeds that left the prior did so late (the loss curves, `v2/`), so where a run "
            "ended depended on when. A constant schedule, lr 1e-3 and a head without dropout each left seed 2 at "
            "the prior (the `v2/` variant rows). The cause is the pooler: all-MiniLM-L6-v2 was trained with mean "
            "pooling, its pooler never was, and BertForSequenceClassification's head reads the pooler. "
            "`python -m research.drugreview_probe` (frozen model, the 600 training reviews): each pooler feature "
            f"spreads {probe['pooler']['spread']:.3f} across reviews, the [CLS] state's {probe['cls']['spread']:.3f}, "
            f"the mean-pooled state's {probe['mean']['spread']:.3f}; a logistic probe on the frozen pooler output "
            f"scores at best {100 * best['pooler']['accuracy']:.1f}% (on [CLS] {100 * best['cls']['accuracy']:.1f}%, "
            f"mean-pooled {100 * best['mean']['accuracy']:.1f}%) against the majority class's {100 * share:.1f}%. "
            "The head starts on an almost constant input, so it learns the prior, and with the pooler frozen only "
            "the adapters' low-rank updates can make that input vary. Protocol 3 trains the pooler in full "
            "with the classifier (`modules_to_save=['classifier', 'pooler']` for PEFT, `lora_modules_to_save` for "
            "ours), as one does for a head the checkpoint never trained; the other settings are protocol 2's.",
            "",
        ]
    new_peft = means.get(("3", "peft"))
    if new_peft:
        gap = statistics.mean(new_peft) - statistics.mean(ind_acc)
        spread = statistics.stdev(new_peft) if len(new_peft) > 1 else None
        out.append(
            f"Protocol 3's PEFT LoRA mean is {gap:+.1f} accuracy points from the independent mean"
            + (
                f"; its std over {len(new_peft)} seeds is {spread:.1f} points (target ≤ 1.5)."
                if spread is not None
                else " (one seed so far: no std)."
            )
        )
    return out


def task_tables(runs: list[dict], save_figure) -> list[str]:
    out = []
    groups = grouped(runs)
    for task in ("drugreview", "chatterbot"):
        rows = sorted(((k, v) for k, v in groups.items() if k[0] == task), key=lambda kv: (kv[0][1:3], str(kv[0][3])))
        if not rows:
            continue
        spec = rows[0][1][0]
        epochs = f"{spec['epochs']} epochs, " if task == "drugreview" else ""
        out += [
            f"### {task}: {spec['model']}, {spec['max_steps']} steps ({epochs}batch {spec['batch']}, max length "
            f"{spec['max_length']}), r={spec['r']}, alpha={spec['alpha']}, lr {spec['learning_rate']}, "
            f"{spec['scheduler']} schedule, warmup {warmup_label(spec['warmup'])}",
            "",
            "| implementation | method | options | seeds | accuracy | macro-F1 | eval loss | train loss | "
            "train s | trainable | command (first seed) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (_, impl, method, options), rs in rows:
            out.append(
                f"| {impl} | {method} | {label(options)} | {seeds_cell(rs)} | "
                f"{stat(values(rs, 'eval_accuracy', 100), 1)} | {stat(values(rs, 'eval_macro_f1'))} | "
                f"{stat(values(rs, 'eval_loss'))} | {stat(values(rs, 'train_loss'))} | "
                f"{stat(values(rs, 'train_seconds'), 0)} | {rs[0]['trainable_parameters']:,} | {command(rs)} |"
            )
        fig, ax = plt.subplots(figsize=(7, 4))
        for (_, impl, method, options), rs in rows:
            r = min(rs, key=lambda r: r["seed"])
            steps, losses = zip(*r["loss_curve"]) if r["loss_curve"] else ((), ())
            ax.plot(steps, losses, label=f"{impl} {method} {label(options)} seed {r['seed']}")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"Loss curves: {task}")
        out += ["", save_figure(fig, ax, f"loss-{task}.png", f"loss curves {task}", legend_size=6), ""]
    return out


def ablation_section(runs: list[dict], old: list[dict]) -> list[str]:
    """LaMDA's initialisations × S/B learning-rate ratio on chatterbot, against ours LoRA at the same budget."""
    groups, old_groups = grouped(runs), grouped(old)
    lora = values(groups.get(("chatterbot", "ours", "lora", ()), []), "eval_loss")
    out = [
        "### LaMDA ablation (chatterbot, main job's defaults)",
        "",
        "| method | lamda_init | lamda_lr_ratio | lamda_s_lr_ratio | lamda_freeze_fraction | seeds | eval loss | "
        "vs ours LoRA | train loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lamda_pp = [lamda_options(init, 1.0, 1.0, 0.5) for init in ("residual", "spectral")] + [LAMDA]
    cases = [("lamda", opts) for opts in ABLATION] + [("lamda++", opts) for opts in dict.fromkeys(lamda_pp)]
    for method, opts in cases:
        o = dict(opts)
        cells = (
            f"| {method} | {o['lamda_init']} | {o['lamda_lr_ratio']:g} | {o['lamda_s_lr_ratio']:g} | "
            f"{o['lamda_freeze_fraction']:g} |"
        )
        rs = groups.get(("chatterbot", "ours", method, opts), [])
        if not rs:
            out.append(f"{cells} not run | – | – | – |")
            continue
        loss = values(rs, "eval_loss")
        gap = f"{100 * (statistics.mean(loss) / statistics.mean(lora) - 1):+.1f}%" if lora else "–"
        out.append(f"{cells} {seeds_cell(rs)} | {stat(loss)} | {gap} | {stat(values(rs, 'train_loss'))} |")
    out += [
        "",
        f"Ours LoRA: eval loss {stat(lora)} (`python -m research.accuracy run --task chatterbot --impl "
        "ours --method lora --seed 0`); each LaMDA row's command is in the chatterbot table above.",
    ]
    out += ["", *drug_ablation(groups)]
    old_lamda = values(old_groups.get(("chatterbot", "ours", "lamda", ()), []), "eval_loss")
    old_lora = values(old_groups.get(("chatterbot", "ours", "lora", ()), []), "eval_loss")
    if old_lamda and old_lora:
        out += [
            "",
            f"The earlier init (`svd`, S = 0) under protocol 1 (`v1/`: 15 steps, r=8, seed 0): eval loss "
            f"{stat(old_lamda)} against ours LoRA's {stat(old_lora)} "
            f"({100 * (statistics.mean(old_lamda) / statistics.mean(old_lora) - 1):+.1f}%), a different budget "
            "from the rows above.",
        ]
    return out


TASK_LABELS = {"drugreview": "drug-review", "chatterbot": "chatterbot"}


def equal_parameter_runs() -> list[dict]:
    """Runs at each task's `equal_parameters` variant: twice the task's r and alpha (LoRA's trainable parameters for
    LoRA-FA; drug-review r=16, chatterbot r=32)."""
    specs = {task: {**TASKS[task], **dict(equal_parameters(task))} for task in TASKS}
    return [r for r in load_runs(RESULTS) if recorded_spec(r) == specs[r["task"]]]


def _drug_gaps(lora: list[dict], runs: list[dict]) -> list[tuple[str, float | None]]:
    """Ours LoRA − `runs` on drug-review, accuracy then macro-F1, in points: each as its table cell and the gap
    (None, cell "–", where a side has no runs)."""
    out = []
    for key in ("eval_accuracy", "eval_macro_f1"):
        a, b = values(lora, key, 100), values(runs, key, 100)
        if a and b:
            gap = statistics.mean(a) - statistics.mean(b)
            out.append((f"{gap:+.1f} ± {gap_error(a, b):.1f}", gap))
        else:
            out.append(("–", None))
    return out


def _gap_cells(refs: dict[str, list[dict]], drug: list[dict], chat: list[dict]) -> tuple[list[str], bool]:
    """A row's gaps to ours LoRA (drug-review accuracy and macro-F1 in points, chatterbot held-out loss in %), and
    whether it meets every done-when target with 3 seeds or more on each side of each task."""
    cells, ok = [], min(len(drug), len(chat), *(len(v) for v in refs.values())) >= 3
    for cell, gap in _drug_gaps(refs["drugreview"], drug):
        cells.append(cell)
        ok = ok and gap is not None and gap <= 1.0
    ref = values(refs["chatterbot"], "eval_loss")
    if chat and ref:
        scale = 100 / statistics.mean(ref)
        a, b = values(chat, "eval_loss", scale), values(refs["chatterbot"], "eval_loss", scale)
        gap = statistics.mean(a) - 100
        cells.append(f"{gap:+.1f} ± {gap_error(a, b):.1f}%")
        ok = ok and gap <= 1.5
    else:
        cells.append("–")
    return cells, ok


def lorafa_ratio_section(runs: list[dict], equal: list[dict]) -> list[str]:
    """LoRA-FA's B learning-rate multiple (`lorafa_lr_ratio`) on both tasks, and at LoRA's trainable parameters
    (`equal`: each task's `equal_parameters` runs), each against ours LoRA on its task."""
    groups, equal_groups = grouped(runs), grouped(equal)
    ratios = sorted({dict(k[3])["lorafa_lr_ratio"] for k in groups if k[1:3] == ("ours", "lorafa")})
    refs = {task: groups.get((task, "ours", "lora", ()), []) for task in ("drugreview", "chatterbot")}
    ranks = " / ".join(str(TASKS[task]["r"]) for task in refs)
    wide_ranks = " / ".join(str(dict(equal_parameters(task))["r"]) for task in refs)
    out = [
        "### LoRA-FA's B learning-rate multiple (`lorafa_lr_ratio`) and rank",
        "",
        "| r (drug-review / chatterbot) | lorafa_lr_ratio | drug-review seeds | accuracy | macro-F1 | eval loss | "
        "ours LoRA − LoRA-FA: accuracy | macro-F1 | chatterbot seeds | eval loss | LoRA-FA / ours LoRA − 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for ratio in ratios:
        opts = full_options("ours", "lorafa", {"lorafa_lr_ratio": ratio})
        rows.append((ranks, ratio, opts, *(groups.get((task, "ours", "lorafa", opts), []) for task in refs)))
    for opts in sorted({k[3] for k in equal_groups if k[1:3] == ("ours", "lorafa")}, key=str):
        got = [equal_groups.get((task, "ours", "lorafa", opts), []) for task in refs]
        rows.append((wide_ranks, dict(opts)["lorafa_lr_ratio"], opts, *got))
    meets, wide_meets = {}, {}
    for rank, ratio, opts, drug, chat in rows:
        cells, ok = _gap_cells(refs, drug, chat)
        (meets if rank == ranks else wide_meets)[ratio] = ok
        out.append(
            f"| {rank} | {ratio:g}{' (default)' if opts == LORAFA else ''} | {len(drug) or '–'} | "
            f"{stat(values(drug, 'eval_accuracy', 100), 1)} | {stat(values(drug, 'eval_macro_f1'))} | "
            f"{stat(values(drug, 'eval_loss'))} | {cells[0]} | {cells[1]} | {len(chat) or '–'} | "
            f"{stat(values(chat, 'eval_loss'))} | {cells[2]} |"
        )
    good = [f"{ratio:g}" for ratio, ok in meets.items() if ok]
    wide_good = [f"{ratio:g}" for ratio, ok in wide_meets.items() if ok]
    verdict = (
        f"Ratios meeting every target on both tasks at r={ranks}: {', '.join(good)}."
        if good
        else f"No ratio measured meets every target on both tasks at r={ranks}."
    )
    if wide_meets:
        verdict += f" At r={wide_ranks} (LoRA's trainable parameters): " + (
            f"ratio {', '.join(wide_good)} meets every target." if wide_good else "no ratio meets every target."
        )
    out += [
        "",
        "Command: `python -m research.accuracy sweep --plan issue13-ratio`, then `--plan issue13-rank` (each row's "
        "`run` command is in the task tables below). Targets as in the done-when table: within 1 point of ours LoRA "
        "in accuracy and macro-F1 on drug-review, within 1.5% of its held-out loss on chatterbot, 3 seeds or more on "
        "each side. " + verdict,
    ]
    wide = {task: equal_groups.get((task, "ours", "lorafa", LORAFA), []) for task in refs}  # the default row's runs
    counts = [
        f"{TASK_LABELS[task]}: {wide[task][0]['trainable_parameters']:,} trainable against ours LoRA's "
        f"{refs[task][0]['trainable_parameters']:,}"
        for task in refs
        if wide[task] and refs[task] and "trainable_parameters" in wide[task][0]
    ]
    if counts:
        first = wide["drugreview"][0] if wide["drugreview"] else next(rs[0] for rs in wide.values() if rs)
        argv = run_argv(first["task"], "ours", "lorafa", 0, recorded_options(first), equal_parameters(first["task"]))
        out += [
            "",
            f"The r={wide_ranks} row (twice each task's r, alpha likewise: the same scale alpha/r; "
            f"`python -m research.accuracy run {' '.join(argv)}`) gives LoRA-FA LoRA's trainable parameters: B alone "
            "at rank 2r has 2r·d_out parameters a square layer, LoRA's r·(d_in + d_out) at rank r ("
            + "; ".join(counts)
            + ", heads included), equal where the adapted layers' d_in and d_out sum alike. Its backward still keeps "
            "A·x (2r values a token per adapted layer), never x, so its activation memory stays far below LoRA's "
            "while its gradients and optimizer states are about LoRA's.",
        ]
    return out


# The frozen-A methods at twice the rank, each with the options of its done-when row.
AT_TWICE_THE_RANK = (
    ("ours", "lorafa", LORAFA),
    ("peft", "lorafa", ()),
    ("ours", "lamda", LAMDA),
    ("ours", "lamda++", LAMDA),
)


def rank_section(runs: list[dict], equal: list[dict]) -> list[str]:
    """The frozen-A methods on drug-review at their default rank and at twice it, against ours LoRA at its rank."""
    groups, equal_groups = grouped(runs), grouped(equal)
    lora = groups.get(("drugreview", "ours", "lora", ()), [])
    r, wide_r = TASKS["drugreview"]["r"], dict(EQUAL_PARAMETERS)["r"]
    rows = [
        (impl, method, rank, source.get(("drugreview", impl, method, opts), []))
        for impl, method, opts in AT_TWICE_THE_RANK
        for rank, source in ((r, groups), (wide_r, equal_groups))
    ]
    if not any(rs for *_, rank, rs in rows if rank == wide_r):
        return []
    out = [
        f"### The frozen-A methods at twice the rank (drug-review, r={wide_r} against r={r})",
        "",
        f"| implementation | method | r | seeds | accuracy | macro-F1 | eval loss | trainable (end of training) | "
        f"ours LoRA (r={r}) − method: accuracy | macro-F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for impl, method, rank, rs in rows:
        cells = [cell for cell, _ in _drug_gaps(lora, rs)]
        trainable = f"{rs[0]['trainable_parameters']:,}" if rs and "trainable_parameters" in rs[0] else "–"
        out.append(
            f"| {impl} | {method} | {rank} | {len(rs) or '–'} | {stat(values(rs, 'eval_accuracy', 100), 1)} | "
            f"{stat(values(rs, 'eval_macro_f1'))} | {stat(values(rs, 'eval_loss'))} | {trainable} | "
            f"{cells[0]} | {cells[1]} |"
        )
    commands = [
        f"`python -m research.accuracy run "
        f"{' '.join(run_argv('drugreview', impl, method, 0, recorded_options(rs[0]), EQUAL_PARAMETERS))}`"
        for impl, method, rank, rs in rows
        if rank == wide_r and rs
    ]
    out += [
        "",
        f"Command: `python -m research.accuracy sweep --plan issue13-rank`; first runs: {', '.join(commands)}. "
        f"LoRA-FA at r={wide_r} has ours LoRA's trainable parameters (B alone, 2r·d_out a layer); LaMDA keeps its "
        f"default options (`lamda_init=spectral`, B's window over 3/4 of the steps) and after the schedule a layer "
        f"keeps r² trainable: {wide_r**2} at r={wide_r}, {r**2} at r={r} (the trainable column counts at the end of "
        "training, BERT's classifier and pooler included).",
    ]
    return out


FREEZE_ORDERS = {"ascending": "column by column", "all": "whole at the window's end"}


def lamda_ratio_section(runs: list[dict], equal: list[dict]) -> list[str]:
    """LaMDA and LaMDA++ at each B and S learning-rate multiple, freeze order and init measured with B's window at its
    default, at each task's rank and at twice it (`equal`: the `equal_parameters` runs), against ours LoRA at
    its own rank on both tasks, with which rows meet every target."""
    groups, equal_groups = grouped(runs), grouped(equal)
    refs = {task: groups.get((task, "ours", "lora", ()), []) for task in ("drugreview", "chatterbot")}
    ranks = " / ".join(str(TASKS[task]["r"]) for task in refs)
    wide_ranks = " / ".join(str(dict(equal_parameters(task))["r"]) for task in refs)

    def in_table(opts: tuple) -> bool:  # the defaults but for the init, the multiples and the freeze order
        o, d = dict(opts), dict(LAMDA)
        varied = ("lamda_init", "lamda_lr_ratio", "lamda_s_lr_ratio", "lamda_freeze_order")
        return bool(o) and set(o) - set(d) <= set(varied) and all(o[k] == v for k, v in d.items() if k not in varied)

    sources = {ranks: groups, wide_ranks: equal_groups}
    keys = sorted(
        {
            (rank, k[2], k[3])
            for rank, source in sources.items()
            for k in source
            if k[1] == "ours" and k[2] in ("lamda", "lamda++") and in_table(k[3])
        },
        key=lambda k: (
            k[0] != ranks,
            k[1],
            dict(k[2])["lamda_init"] != "spectral",
            dict(k[2]).get("lamda_freeze_order", ""),
            dict(k[2])["lamda_lr_ratio"],
        ),
    )
    if not any(dict(opts) != dict(LAMDA) for _, _, opts in keys):
        return []
    out = [
        "### LaMDA's learning-rate multiples, freeze order and init",
        "",
        "| r (drug-review / chatterbot) | method | lamda_init | B's multiple | S's multiple | B freezes | "
        "drug-review seeds | accuracy | macro-F1 | eval loss | train loss | ours LoRA − method: accuracy | macro-F1 | "
        "chatterbot seeds | eval loss | method / ours LoRA − 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    good = []
    for rank, method, opts in keys:
        o = dict(opts)
        drug, chat = (sources[rank].get((task, "ours", method, opts), []) for task in refs)
        cells, ok = _gap_cells(refs, drug, chat)
        b, s = o["lamda_lr_ratio"], o["lamda_lr_ratio"] * o["lamda_s_lr_ratio"]
        order = FREEZE_ORDERS[o.get("lamda_freeze_order", "ascending")]
        if ok:
            good.append(f"{method} at r={rank}, {o['lamda_init']}, B at {b:g}x and S at {s:g}x, B freezing {order}")
        out.append(
            f"| {rank} | {method} | {o['lamda_init']} | {b:g} | {s:g} | {order} | {len(drug) or '–'} | "
            f"{stat(values(drug, 'eval_accuracy', 100), 1)} | {stat(values(drug, 'eval_macro_f1'))} | "
            f"{stat(values(drug, 'eval_loss'))} | {stat(values(drug, 'train_loss'))} | {cells[0]} | {cells[1]} | "
            f"{len(chat) or '–'} | {stat(values(chat, 'eval_loss'))} | {cells[2]} |"
        )
    rank, first = next(
        (rank, rs[0])
        for rank, method, opts in keys
        if dict(opts) != dict(LAMDA) and (rs := sources[rank].get(("drugreview", "ours", method, opts)))
    )
    spec = () if rank == ranks else EQUAL_PARAMETERS
    argv = run_argv("drugreview", "ours", first["method"], 0, recorded_options(first), spec)
    out += [
        "",
        "Command: `python -m research.accuracy sweep --plan issue13-lamda-lr`; a row's runs are "
        f"`python -m research.accuracy run {' '.join(argv)}` with its method, rank, options and seed (r=16 on "
        "drug-review: `--spec r=16 --spec alpha=32`). The multiples are of the learning rate: B (PMB) trains at "
        "`lamda_lr_ratio` x it during its window, S at `lamda_lr_ratio` x `lamda_s_lr_ratio` x it throughout. B's "
        "window is the first 3/4 of the steps (the default); over it B's columns freeze one by one from the smallest "
        "singular value (`lamda_freeze_order=ascending`, the default), or B trains whole until its end (`all`). "
        "`lamda_init` as in `hf_lorafa/lamda.py` (`spectral`, the default: B = U_r and S = diag(σ_r)/s from W's SVD; "
        "`identity`: B = 0 and S = I, so that while B trains its update is LoRA-FA's). Targets as in the "
        "done-when table, 3 seeds or more on each side of each task. "
        + (
            f"Meeting every target on both tasks: {'; '.join(good)}."
            if good
            else "No row measured meets every target on both tasks."
        ),
    ]
    return out


FROZEN_A_LABELS = {
    "random": "random (default)",
    "gradient": "the gradient's top directions",
    "activations": "the inputs' top directions",
}


def paired_diffs(key: str, ours: list[dict], ref: list[dict], scale: float = 1.0) -> list[float]:
    """`ours` − `ref` in `key` at each seed both have."""
    by_seed = {r["seed"]: r[key] for r in ref}
    return [scale * (r[key] - by_seed[r["seed"]]) for r in ours if r["seed"] in by_seed]


def paired(key: str, ours: list[dict], ref: list[dict], scale: float, digits: int) -> str:
    """`ours` − `ref` over the seeds both have (± the s.e. of the paired mean, their count in brackets), or "–"."""
    diffs = paired_diffs(key, ours, ref, scale)
    if not diffs:
        return "–"
    se = f" ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.{digits}f}" if len(diffs) > 1 else ""
    return f"{statistics.mean(diffs):+.{digits}f}{se} ({len(diffs)})"


def frozen_a_section(runs: list[dict]) -> list[str]:
    """LoRA-FA, LaMDA and LaMDA++ at their defaults with A from the training data (`frozen_a_init`), each against the
    same method with a random A and against ours LoRA at the same seeds: whether the data's directions beat a random
    A."""
    groups = grouped(runs)
    defaults = {"lorafa": LORAFA, "lamda": LAMDA, "lamda++": LAMDA}

    def rows_of(task: str, impl: str, method: str, opts: tuple) -> tuple[dict | None, list[dict]]:
        rs = groups.get((task, impl, method, opts), [])
        return next((r for r in rs if r["seed"] == 0), None), rs

    def at_seeds(rs: list[dict], seeds: set[int]) -> list[dict]:
        return [r for r in rs if r["seed"] in seeds]

    kinds = [k for k in FROZEN_A_LABELS if k != "random"]
    measured = [
        (method, kind)
        for method in defaults
        for kind in kinds
        if any(groups.get((t, "ours", method, defaults[method] + (("frozen_a_init", kind),))) for t in TASKS)
    ]
    if not measured:
        return []
    _, lora_drug = rows_of("drugreview", "ours", "lora", ())
    _, lora_chat = rows_of("chatterbot", "ours", "lora", ())
    out = [
        "### The frozen A: random, or from the training data",
        "",
        "| method | frozen A (`frozen_a_init`) | drug-review seeds | accuracy | macro-F1 | train loss | − random A: "
        "accuracy | macro-F1 | − ours LoRA: accuracy | macro-F1 | chatterbot seeds | eval loss | − random A | "
        "− ours LoRA |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, kind in measured:
        opts = defaults[method] + (("frozen_a_init", kind),)
        _, drug = rows_of("drugreview", "ours", method, opts)
        _, chat = rows_of("chatterbot", "ours", method, opts)
        _, random_drug = rows_of("drugreview", "ours", method, defaults[method])
        _, random_chat = rows_of("chatterbot", "ours", method, defaults[method])
        out.append(
            f"| {method} | {FROZEN_A_LABELS[kind]} | {seeds_cell(drug) if drug else '–'} | "
            f"{stat(values(drug, 'eval_accuracy', 100), 1)} | {stat(values(drug, 'eval_macro_f1'))} | "
            f"{stat(values(drug, 'train_loss'))} | "
            + " | ".join(
                paired(key, drug, ref, scale, digits)
                for ref in (random_drug, lora_drug)
                for key, scale, digits in (("eval_accuracy", 100, 1), ("eval_macro_f1", 100, 1))
            )
            + f" | {seeds_cell(chat) if chat else '–'} | {stat(values(chat, 'eval_loss'))} | "
            f"{paired('eval_loss', chat, random_chat, 1, 3)} | {paired('eval_loss', chat, lora_chat, 1, 3)} |"
        )
    probe_path = RESULTS.parent / "drugreview-probe.json"
    probe = json.loads(probe_path.read_text()).get("frozen_a", {}) if probe_path.exists() else {}
    scales = ""
    if probe:
        parts = [
            f"{model} {v['gradient']['median']:.0f}x and {v['activations']['median']:.0f}x"
            for model, v in probe.items()
        ]
        scales = (
            " (unscaled, the top directions' mean square is, median over the adapted layers, gradient and inputs: "
            f"{', '.join(parts)} a random direction's; `python -m research.drugreview_probe --only frozen_a`)"
        )
    out += [
        "",
        "Command: `python -m research.accuracy sweep --plan issue13-frozen-a` (each row's runs: the method's command "
        "in the task tables below with `--opt frozen_a_init=gradient` or `activations`). `gradient`: A's rows are the "
        "top-r right singular vectors of each layer's `Σ g xᵀ` (full fine-tuning's gradient of W) over the first 4 "
        "training batches, as LoRA-GA and LoRA-SB start their adapters; `activations`: the top-r principal "
        "directions of the layer's inputs over the same batches (padding left out), as EVA starts LoRA's A "
        "(`hf_lorafa/calibration.py`). Each row is scaled so that its z_i has a random row's mean square over the "
        f"inputs{scales}; the rest of each method at its defaults. "
        + (
            "The `− random A` and `− ours LoRA` columns are differences over the seeds both sides ran (their count in "
            "brackets; accuracy and macro-F1 in points, held-out loss as it is), ± the standard error of the paired "
            f"mean. Ours LoRA over its {len(lora_drug)} drug-review seeds: "
            f"{stat(values(lora_drug, 'eval_accuracy', 100), 1)} / {stat(values(lora_drug, 'eval_macro_f1'))}."
            if lora_drug
            else ""
        ),
    ]
    return out


def seeds_of(runs: list[dict]) -> str:
    return " ".join(str(s) for s in sorted({r["seed"] for r in runs}))


def update_norms_section(traced: list[dict], runs: list[dict] = ()) -> list[str]:
    """`research/update_norms.py`: the size of the update (`‖s·B A‖_F`, median over the adapted layers) each method
    makes over a drug-review run, and how far LoRA's A moved: whether LoRA-FA fits with a larger update than LoRA."""
    traced = [r for r in traced if r["task"] == "drugreview" and recorded_spec(r) == TASKS["drugreview"]]
    traced.sort(
        key=lambda r: (r["method"] != "lora", r["method"], -r["effective_options"]["lorafa_lr_ratio"], r["seed"])
    )
    if not traced:
        return []
    steps = traced[0]["max_steps"]
    marks = [steps // 4, steps // 2, 3 * steps // 4]
    out = [
        "### The size of the update (drug-review)",
        "",
        "| method | B's learning-rate multiple | seed | accuracy | macro-F1 | train loss | "
        + " | ".join(f"‖ΔW‖_F at step {m}" for m in marks)
        + " | at the end | ‖ΔW‖_F / ‖W‖_F | ‖A‖_F / ‖A₀‖_F | A's energy in A₀'s row space |",
        "|---|---|---|---|---|---|" + "---|" * (len(marks) + 4),
    ]
    ends, turns = {}, []
    for r in traced:
        at = {n["step"]: n for n in r["finished"]["norms"]}
        end = r["finished"]["norms"][-1]
        ratio = "1 (A trains too)" if r["method"] == "lora" else f"{r['effective_options']['lorafa_lr_ratio']:g}"
        ends[(r["method"], ratio, r["seed"])] = (end["delta_w_norm"], r["train_loss"])
        if r["method"] == "lora":  # how steadily LoRA's A leaves its initial row space
            outside = {m: 1 - at[m]["a_energy_in_init_row_space"] for m in marks if m in at}
            last = 1 - end["a_energy_in_init_row_space"]
            turns.append(
                f" LoRA's A turns out of its initial row space steadily, not early (seed {r['seed']}: the share of "
                f"its energy outside it is {', '.join(f'{v:.3f} by step {m}' for m, v in outside.items())} and "
                f"{last:.3f} at the end)"
                + (
                    f": an A frozen after the first quarter of the steps with A trainable would have "
                    f"{outside[marks[0]] / last:.0%} of that turn."
                    if marks[0] in outside and last > 0
                    else "."
                )
            )
        out.append(
            f"| {r['method']} | {ratio} | {r['seed']} | {100 * r['eval_accuracy']:.1f} | {r['eval_macro_f1']:.3f} | "
            f"{r['train_loss']:.3f} | "
            + " | ".join(f"{at[m]['delta_w_norm']:.3f}" if m in at else "–" for m in marks)
            + f" | {end['delta_w_norm']:.3f} | {end['delta_w_relative']:.4f} | {end['a_norm_ratio']:.3f} | "
            f"{end['a_energy_in_init_row_space']:.3f} |"
        )
    groups = grouped(runs)
    twins = [
        next(
            (t for t in groups.get((r["task"], "ours", r["method"], options_of(r)), []) if t["seed"] == r["seed"]),
            None,
        )
        for r in traced
    ]
    same = all(
        t is not None
        and all(t.get(k) == r.get(k) for k in ("eval_accuracy", "eval_macro_f1"))
        and math.isclose(t["train_loss"], r["train_loss"], rel_tol=1e-6)
        for r, t in zip(traced, twins)
    )
    lora = {seed: v for (method, _, seed), v in ends.items() if method == "lora"}
    compared = [
        f"{ratio}x: {norm / lora[seed][0]:.1f}x LoRA's update, for a train loss of {loss:.3f} "
        f"(LoRA's {lora[seed][1]:.3f})"
        for (method, ratio, seed), (norm, loss) in ends.items()
        if method == "lorafa" and seed in lora
    ]
    out += [
        "",
        "Command: `python -m research.update_norms --method lora --seed 0`, and `--method lorafa --seed 0 --opt "
        "lorafa_lr_ratio=R` for each multiple R (the runs of the task table below"
        + (
            ", with the same accuracy and macro-F1, and train loss to 6 digits: recording does not change training"
            if same
            else ""
        )
        + ", recording every "
        f"{traced[0]['prepared']['every']} steps). Medians over the {traced[0]['prepared']['layers']} adapted layers: "
        "`‖ΔW‖_F` is the size of the update `s·B A` the adapter adds to W; `‖A‖_F / ‖A₀‖_F` and the share of "
        "`‖A‖²_F` inside the initial A's row space say how far A moved (it trains in LoRA only)."
        + (" At the end, LoRA-FA with B at " + "; ".join(compared) + "." if compared else ""),
    ]
    out[-1] += "".join(turns)
    return out


def a_directions_section(measured: list[dict]) -> list[str]:
    """`research/a_directions.py`: how much of the row space LoRA's A ended with (and of the part it added to its
    random init) the data's directions (`frozen_a_init`) hold, against a random space's share."""
    measured = sorted((r for r in measured if r["task"] == "drugreview"), key=lambda r: r["seed"])
    if not measured:
        return []
    names = {
        "gradient": "the gradient's top directions",
        "activations": "the inputs' top directions",
        "turn": "LoRA's first turn, `A₀ GᵀG` outside A₀ (no option sets it)",
    }
    out = [
        "### Where the data's directions point (drug-review)",
        "",
        "| frozen A (`frozen_a_init`) | seeds | LoRA's final row space | LoRA's initial row space | "
        "the part LoRA added | a random space |",
        "|---|---|---|---|---|---|",
    ]
    for kind in DIRECTION_KINDS:
        have = [r for r in measured if kind in r["prepared"]]  # a kind measured later is in the later runs only
        if not have:
            continue
        found = [r["prepared"][kind] for r in have]
        cells = [f"{statistics.mean(f[key] for f in found):.3f}" for key in ("final", "init", "added", "random")]
        out.append(f"| {names[kind]} | {seeds_of(have)} | {' | '.join(cells)} |")
    out += [
        "",
        f"Command: `python -m research.a_directions --seeds {seeds_of(measured)}` (after `research/oracle_a.py` at "
        "those seeds, whose LoRA runs keep their initial and final A row spaces). Each cell is the share of a row "
        "space that the data's r directions hold (`‖D Qᵀ‖²_F / ‖Q‖²_F`), the median over the "
        f"{measured[0]['prepared'][DIRECTION_KINDS[0]]['layers']} adapted layers, averaged over the seeds; "
        '"the part LoRA added" is LoRA\'s final rows less their projection on its initial row space, and a random '
        "r-dimensional space holds r/d_in of anything (the last column). The directions are the ones the trainer "
        "computes for `frozen_a_init` from the first 4 training batches at that seed.",
    ]
    return out


def oracle_a_section(oracle: list[dict], runs: list[dict]) -> list[str]:
    """`research/oracle_a.py`: LoRA-FA and LaMDA over the row space LoRA learned at the same seed (an A no method could
    know at step 0), against the same methods with their random A and against that LoRA run: whether any frozen A
    could close the same-r gap on drug-review."""
    oracle = [r for r in oracle if r["task"] == "drugreview" and recorded_spec(r) == TASKS["drugreview"]]
    if not oracle:
        return []
    groups = grouped(runs)
    lora = [r for r in oracle if r["method"] == "lora"]
    main_lora = groups.get(("drugreview", "ours", "lora", ()), [])
    out = [
        "### The frozen A that LoRA learned (drug-review)",
        "",
        "| method | frozen A | seeds | accuracy | macro-F1 | train loss | − random A: accuracy | macro-F1 | "
        "− ours LoRA: accuracy | macro-F1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| lora | – (A trains; rerun by the script) | {seeds_cell(lora)} | "
        f"{stat(values(lora, 'eval_accuracy', 100), 1)} | {stat(values(lora, 'eval_macro_f1'))} | "
        f"{stat(values(lora, 'train_loss'))} | – | – | "
        f"{paired('eval_accuracy', lora, main_lora, 100, 1)} | {paired('eval_macro_f1', lora, main_lora, 100, 1)} |",
    ]
    closes = {}
    with_options = []  # (method, its flags, options' text, seeds) of the rows run with a non-default option
    variants = (
        (ORACLE_TAGS["final"], "LoRA's final A (its row space)", lora),
        (ORACLE_TAGS["init"], "its own random A, orthonormal rows rescaled alike (control)", main_lora),
    )
    for method, defaults in (("lorafa", LORAFA), ("lamda", LAMDA)):
        for tag, what, ref_lora in variants:
            by_options = defaultdict(list)
            for r in oracle:
                if r["method"] == method and r.get("tag") == tag:
                    by_options[options_of(r)].append(r)
            for opts in sorted(by_options, key=lambda o: (o != defaults, str(o))):
                rs = by_options[opts]
                random_a = groups.get(("drugreview", "ours", method, opts), [])
                pairs = [label(((k, v),)) for k, v in opts if dict(defaults).get(k) != v]
                changed = ", ".join(f"`{pair}`" for pair in pairs)
                if pairs:
                    control = " --a init" if tag == ORACLE_TAGS["init"] else ""
                    with_options.append(
                        (method, control + " --methods " + method, " --opt ".join(pairs), seeds_of(rs))
                    )
                cells = [
                    paired(key, rs, ref, 100, 1)
                    for ref in (random_a, ref_lora)
                    for key in ("eval_accuracy", "eval_macro_f1")
                ]
                out.append(
                    f"| {method} | {what}{', ' + changed if changed else ''} | {seeds_cell(rs)} | "
                    f"{stat(values(rs, 'eval_accuracy', 100), 1)} | {stat(values(rs, 'eval_macro_f1'))} | "
                    f"{stat(values(rs, 'train_loss'))} | {' | '.join(cells)} |"
                )
                if tag == ORACLE_TAGS["final"]:
                    closes[method + (f" ({changed})" if changed else "")] = [
                        statistics.mean(paired_diffs(k, lora, rs, 100) or [math.nan])
                        for k in ("eval_accuracy", "eval_macro_f1")
                    ]
    control = [r for r in oracle if r.get("tag") == ORACLE_TAGS["init"]]
    moves = [r["finished"]["a_overlap_with_init"] for r in lora if r.get("finished")]
    moved = [m["median"] for m in moves]
    verdicts = [
        f"{method} over LoRA's A is {acc:+.1f} / {f1:+.1f} points behind that LoRA run "
        + ("(within the 1-point target on both)" if max(acc, f1) <= 1.0 else "(short of the 1-point target)")
        for method, (acc, f1) in closes.items()
    ]
    out += [
        "",
        f"Command: `python -m research.oracle_a --seeds {seeds_of(lora)}`, and for the control `--a init --seeds "
        f"{seeds_of(control)}`"
        + "".join(
            f", for {method} with an option `{flags.strip()} --opt {opts} --seeds {seeds}`"
            for method, flags, opts, seeds in with_options
        )
        + " (per seed: "
        "ours LoRA, then LoRA-FA and LaMDA at their defaults (or with the option a row names) with each "
        "layer's A frozen to an orthonormal basis of the row space of the A that LoRA ended with, each row "
        "scaled as `frozen_a_init` scales its rows; the control freezes the method's own random A's row "
        "space, rescaled the same way, and trains no LoRA). No frozen-A method could know LoRA's final A at "
        "step 0; with it, LoRA's own final update `B A` is within reach of B alone. The `− random A` columns "
        "pair each seed with the same method's run in the task table below (its random A is LoRA's initial A "
        "at that seed: overlap 1.000); the `− ours LoRA` columns pair it with the script's LoRA run at the "
        "same seed (the control's with the task table's), and the LoRA row pairs the script's LoRA runs with "
        "the task table's (0 where a rerun of a seed gives the same numbers). "
        + (
            "LoRA's A moves in training: the overlap of its final row space with its initial one (`‖Q Q₀ᵀ‖²_F / r`, "
            f"1 for the same space, about r/d_in = {lora[0]['r'] / 384:.3f} for unrelated ones in a 384-wide layer) "
            f"has a median over the {moves[0]['layers']} adapted layers of {min(moved):.3f}-{max(moved):.3f} across "
            f"the seeds (lowest layer {min(m['min'] for m in moves):.3f}). "
            if moved
            else ""
        )
        + ("; ".join(verdicts) + "." if verdicts else ""),
    ]
    return out


def drug_ablation(groups: dict[tuple, list[dict]]) -> list[str]:
    """LaMDA's inits on drug-review at seed 0, against PEFT LoRA and ours LoRA-FA at the same seed."""
    out = [
        "### LaMDA ablation (drug-review, seed 0)",
        "",
        "| method | lamda_init | lamda_lr_ratio | lamda_s_lr_ratio | lamda_freeze_fraction | accuracy | macro-F1 | "
        "eval loss | train loss | at the class prior |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def seed_0(impl: str, method: str, opts: tuple) -> dict | None:
        return next((r for r in groups.get(("drugreview", impl, method, opts), []) if r["seed"] == 0), None)

    def cells(r: dict) -> str:
        return (
            f"{100 * r['eval_accuracy']:.1f} | {r['eval_macro_f1']:.3f} | {r['eval_loss']:.3f} | "
            f"{r['train_loss']:.3f} | {'yes' if at_prior(r) else 'no'} |"
        )

    for impl, method, opts in [("peft", "lora", ()), ("ours", "lorafa", LORAFA)]:
        if r := seed_0(impl, method, opts):
            out.append(f"| {impl} {method} | – | – | – | – | {cells(r)}")
    for opts in DRUG_ABLATION:
        o = dict(opts)
        r = seed_0("ours", "lamda", opts)
        row = cells(r) if r else "not run | – | – | – | – |"
        knobs = " | ".join(f"{o[k]:g}" for k in ("lamda_lr_ratio", "lamda_s_lr_ratio", "lamda_freeze_fraction"))
        out.append(f"| lamda | {o['lamda_init']} | {knobs} | {row}")
    # Where LaMDA falls behind: B's window (its freeze fraction of the steps) against the rest of the run, for the
    # spectral init over half of the steps and at the defaults.
    lora = seed_0("peft", "lora", ())

    def mean_loss(r: dict, lo: int, hi: int) -> float:
        return statistics.mean(loss for step, loss in r["loss_curve"] if lo < step <= hi)

    def spans(r: dict, window: int, steps: int) -> str:
        n = window // 4
        return f"{mean_loss(r, window - n, window):.3f} → {mean_loss(r, steps - n, steps):.3f}"

    windows = []
    for opts in dict.fromkeys([lamda_options("spectral", 1.0, 1.0, 0.5), LAMDA]):
        if lora and (lamda := seed_0("ours", "lamda", opts)):
            steps = lamda["max_steps"]
            window = round(steps * dict(opts)["lamda_freeze_fraction"])
            default = "the default; " if opts == LAMDA else ""
            windows.append(
                f"with B's window over {dict(opts)['lamda_freeze_fraction']:g} of the steps ({default}to step "
                f"{window}, {window // 4} steps), PEFT LoRA {spans(lora, window, steps)}, LaMDA "
                f"{spans(lamda, window, steps)} (macro-F1 {lamda['eval_macro_f1']:.3f})"
            )
    if windows:
        out += [
            "",
            "Training loss at seed 0, mean over the last quarter of B's window → over as many steps at the end of "
            f"the run: {'; '.join(windows)}. LaMDA's loss falls while B trains and hardly moves once only S (r² "
            "per layer) does; S and B at 4× or 8× the learning rate make both parts worse, and S alone at 8× or "
            "32× lowers the final training loss a little without raising the test scores (the rows above), so the "
            "S-only part is short of capacity on this task, not of step size: a longer window for B is what "
            "raises LaMDA's scores.",
        ]
        if longest := seed_0("ours", "lamda", lamda_options("spectral", 1.0, 1.0, 0.9)):
            out[-1] += (
                f" Up to a point: over 0.9 of the steps (B training for nearly all of the run, far from the paper's "
                f"early freezing) seed 0 scores {100 * longest['eval_accuracy']:.1f}% / macro-F1 "
                f"{longest['eval_macro_f1']:.3f}, so the default stays at 0.75."
            )
    return out


def lamda_note(runs: list[dict]) -> list[str]:
    """Why the residual init stays at the class prior on drug-review and the spectral one does not: the frozen A."""
    probe_path = RESULTS.parent / "drugreview-probe.json"
    drug = [r for r in runs if r["task"] == "drugreview" and r["method"] in ("lamda", "lamda++")]
    if not drug or not probe_path.exists():
        return []
    probe = json.loads(probe_path.read_text())
    spectrum, subspace = probe["spectrum"], probe.get("subspace", {})
    mini, smol = TASKS["drugreview"]["model"], TASKS["chatterbot"]["model"]
    by_init = defaultdict(list)
    for r in drug:
        options = dict(recorded_options(r))
        if options.get("frozen_a_init", "random") == "random":  # the A the init itself draws (W's or random)
            by_init[options["lamda_init"], options["lamda_lr_ratio"]].append(r)

    def stuck(init: str, ratio: float = 1.0) -> str:
        rs = by_init.get((init, ratio), [])
        return f"{sum(at_prior(r) for r in rs)} of {len(rs)}"

    out = [
        "",
        "LaMDA's frozen A on drug-review: with A = W's top-r right singular vectors (`lamda_init=residual`) "
        f"{stuck('residual')} LaMDA / LaMDA++ runs ended at the class prior ({stuck('residual', 4.0)} with S and B at "
        f"4× the learning rate); with a random A and the same B and S (`spectral`, the default) {stuck('spectral')}. "
        "Not the step size: under both, a step on B's column i moves W σ_i/s times as far as LoRA-FA's over the same "
        f"A, and the median σ_1 / σ_8 of MiniLM's adapted weights is {spectrum[mini]['sigma_1']:.1f} / "
        f"{spectrum[mini]['sigma_8']:.1f} (SmolLM2's {spectrum[smol]['sigma_1']:.1f} / "
        f"{spectrum[smol]['sigma_8']:.1f}).",
    ]
    if subspace:
        out[-1] += (
            " What a frozen A passes on differs: the share of z = A x that varies from token to token (median over "
            f"the adapted layers) is {subspace[mini]['top']:.2f} with the top singular directions against "
            f"{subspace[mini]['random']:.2f} with a random A in MiniLM ({subspace[smol]['top']:.2f} against "
            f"{subspace[smol]['random']:.2f} in SmolLM2); B's gradient is `g zᵀ`, so z's constant part only shifts "
            "every token alike (`python -m research.drugreview_probe`)."
        )
    return out


def verdict(gap: float, target: float, seeds: int, unit: str) -> str:
    """Whether a measured `gap` meets `target`; it counts as reached only with 3 seeds on each side (`seeds`)."""
    if gap > target:
        return f"missed by {gap - target:.1f} {unit}"
    return "reached" if seeds >= 3 else "within, but < 3 seeds"


def gap_error(a: list[float], b: list[float]) -> float:
    """Standard error of `mean(a) − mean(b)` from each side's spread over its seeds (0 with one run a side)."""
    return math.sqrt(sum(statistics.variance(v) / len(v) for v in (a, b) if len(v) > 1))


# The methods issue 13 holds to LoRA, with the options of their default rows.
HELD_TO_LORA = (("lorafa", LORAFA), ("lamda", LAMDA), ("lamda++", LAMDA))
# The done-when rows' groups, as `done_when` returns their (gap, s.e.) and `se_paragraph` reads them.
DRUG_VS_LORA, CHAT_VS_LORA, PLUS_VS_LAMDA = "drug-review vs LoRA", "chatterbot vs LoRA", "LaMDA++ vs LaMDA"


def done_when(
    runs: list[dict], held: tuple = HELD_TO_LORA, method_runs: list[dict] | None = None
) -> tuple[list[str], dict[str, dict[str, tuple[float, float]]]]:
    """Issue 13's criteria, computed from the runs: method − LoRA (drug-review: PEFT's and ours), eval-loss gap
    (chatterbot), LaMDA++ against LaMDA; each gap with its standard error over the seeds. Also returns each
    measured row's (gap, s.e.) by its label, in its group (`DRUG_VS_LORA`, `CHAT_VS_LORA`, `PLUS_VS_LAMDA`).

    `held` names each method's options; its runs come from `method_runs` (`runs` by default), LoRA's always from
    `runs`: the equal-parameter table passes the runs at twice each task's r there."""
    groups = grouped(runs)
    method_groups = groups if method_runs is None else grouped(method_runs)
    measured = defaultdict(dict)
    out = ["| criterion | seeds | measured (± s.e.) | target | |", "|---|---|---|---|---|"]

    def row(group: str, label: str, ref: list[dict], rs: list[dict], key: str, target: float) -> None:
        """`ref` − `rs` in points of a score, or for a loss `rs` / `ref` − 1 in % of ref's mean (lower is better)."""
        loss = key == "eval_loss"
        limit = f"≤ {target:g}" + ("" if not target else "%" if loss else " point")
        if not rs or not ref:
            out.append(f"| {label} | – | not measured | {limit} | – |")
            return
        if loss:
            scale = 100 / statistics.mean(values(ref, key))
            a, b = values(rs, key, scale), values(ref, key, scale)
            gap = statistics.mean(a) - 100
        else:
            a, b = values(ref, key, 100), values(rs, key, 100)
            gap = statistics.mean(a) - statistics.mean(b)
        ok = verdict(gap, target, min(len(rs), len(ref)), "percentage points" if loss else "points")
        measured[group][label] = (gap, gap_error(a, b))
        unit = "%" if loss else " points"
        out.append(
            f"| {label} | {len(ref)} vs {len(rs)} | {gap:+.1f} ± {gap_error(a, b):.1f}{unit} | {limit} | {ok} |"
        )

    refs = {impl: groups.get(("drugreview", impl, "lora", ()), []) for impl in ("peft", "ours")}
    chat_ref = groups.get(("chatterbot", "ours", "lora", ()), [])
    for method, opts in held:
        rs = method_groups.get(("drugreview", "ours", method, opts), [])
        for (impl, ref), (key, name) in itertools.product(
            refs.items(), (("eval_accuracy", "accuracy"), ("eval_macro_f1", "macro-F1"))
        ):
            label = f"drug-review {name}: {'PEFT' if impl == 'peft' else 'ours'} LoRA − {method}"
            row(DRUG_VS_LORA, label, ref, rs, key, 1.0)
        rs = method_groups.get(("chatterbot", "ours", method, opts), [])
        row(CHAT_VS_LORA, f"chatterbot eval loss: {method} / ours LoRA − 1", chat_ref, rs, "eval_loss", 1.5)
    # LaMDA++ at least as good as LaMDA at the same budget (its ranks average LaMDA's r).
    for task, key, label in (
        ("drugreview", "eval_accuracy", "drug-review accuracy: lamda − lamda++"),
        ("drugreview", "eval_macro_f1", "drug-review macro-F1: lamda − lamda++"),
        ("chatterbot", "eval_loss", "chatterbot eval loss: lamda++ / lamda − 1"),
    ):
        lamda, plus = (method_groups.get((task, "ours", m, dict(held)[m]), []) for m in ("lamda", "lamda++"))
        row(PLUS_VS_LAMDA, label, lamda, plus, key, 0.0)
    return out, dict(measured)


# The same criteria at LoRA's trainable parameters (twice each task's r, alpha likewise; LoRA at its own r): LoRA-FA at
# its defaults, LaMDA and LaMDA++ on the recipe that is LoRA-FA at that rank until B's window ends, S alone after it.
HELD_AT_EQUAL_PARAMETERS = (("lorafa", LORAFA), ("lamda", LAMDA_AS_LORAFA), ("lamda++", LAMDA_AS_LORAFA))


def equal_done_when(
    runs: list[dict], equal: list[dict], same_r: dict[str, dict[str, tuple[float, float]]]
) -> list[str]:
    """Issue 13's done-when table with each method at twice each task's r (`equal`, the `equal_parameters` runs) and
    LoRA (PEFT's and ours) at its own r (`runs`), and what is met; [] before any such run finished. `same_r` is what
    `done_when(runs)` measured at the task's own r, which the paragraph quotes."""
    criteria, measured = done_when(runs, HELD_AT_EQUAL_PARAMETERS, equal)
    rows = [line for line in criteria[2:] if "not measured" not in line]
    if not rows:
        return []
    reached = sum(line.endswith("| reached |") for line in rows)
    wide = " / ".join(str(dict(equal_parameters(task))["r"]) for task in ("drugreview", "chatterbot"))
    own = " / ".join(str(TASKS[task]["r"]) for task in ("drugreview", "chatterbot"))
    drug_wide, drug_own = dict(equal_parameters("drugreview"))["r"], TASKS["drugreview"]["r"]
    groups = grouped(equal)
    counts = ", ".join(
        f"{method} {rs[0]['trainable_parameters']:,}"
        for method, opts in HELD_AT_EQUAL_PARAMETERS
        if (rs := groups.get(("drugreview", "ours", method, opts)))
    )
    lora = next((r["trainable_parameters"] for r in runs if r["task"] == "drugreview" and r["method"] == "lora"), 0)
    gaps = [gap for gap, _ in same_r.get(DRUG_VS_LORA, {}).values()]
    if gaps:
        strict = f"there the frozen-A methods stay {min(gaps):.1f}-{max(gaps):.1f} points behind LoRA on drug-review"
    else:
        strict = "there the frozen-A methods are not measured yet"
    plus = measured.get(PLUS_VS_LAMDA, {}).values()
    if not plus:
        plus_text = ""
    elif all(abs(gap) <= se for gap, se in plus):
        plus_text = (
            " LaMDA++ against LaMDA on that recipe: each gap is within one s.e. of 0, so the rank rule neither helps "
            "nor hurts measurably there."
        )
    else:
        plus_text = (
            " LaMDA++ against LaMDA on that recipe: not every gap is within one s.e. of 0 (the rows say which way)."
        )
    return [
        "#### Done when, at LoRA's trainable parameters",
        "",
        *criteria[:2],
        *rows,
        "",
        f"The same criteria with each frozen-A method at twice each task's r (r = {wide} on drug-review / chatterbot, "
        f"alpha likewise: the same scale alpha/r) and LoRA at its own (r = {own}): {reached} of {len(rows)} met. "
        'LoRA-FA at its defaults; LaMDA and LaMDA++ with `lamda_init="identity"`, `lamda_lr_ratio=4`, '
        '`lamda_s_lr_ratio=0.25` and `lamda_freeze_order="all"` (B trains as LoRA-FA\'s for the first 3/4 of the '
        'steps, then freezes whole; S alone, r² a layer, trains after), the row "Meeting every target on both '
        f"tasks\" of the LaMDA table below names. At r={drug_wide} LoRA-FA's B alone has LoRA's trainable parameters "
        f"at r={drug_own} on drug-review ({counts} trainable at the end of training against ours LoRA's "
        f"{lora:,}, classifier and pooler included); its backward keeps A·x, 2r values a token per adapted "
        'layer, never x, so each method still keeps far less than LoRA for backward ("Memory at the same '
        f'accuracy" above). The table above, at the same r, is the stricter reading: {strict} (gaps in accuracy and '
        "macro-F1 to PEFT's and ours), and the oracle and direction tables below measure why." + plus_text,
    ]


def se_paragraph(measured: dict[str, dict[str, tuple[float, float]]], n: int) -> list[str]:
    """What the s.e. column means, with the drug-review range and LaMDA++ against LaMDA read from `measured`."""
    drug = measured.get(DRUG_VS_LORA, {})
    errors = [se for _, se in drug.values()]
    spread = f"{min(errors):.1f}-{max(errors):.1f} points" if errors else "not measured yet"
    text = (
        "The s.e. column is the standard error of the gap between the two means, from each side's spread over its "
        f"seeds. On drug-review ({n} test rows) it is {spread}: a gap within about "
        "twice its s.e. of a value is not evidence that it differs from it."
    )
    if drug:

        def beyond(value: float) -> str:
            """How many drug-review gaps are more than two s.e. above `value`, and which."""
            rows = [label.removeprefix("drug-review ") for label, (gap, se) in drug.items() if gap - value > 2 * se]
            return f"{len(rows)}" + (f" ({'; '.join(rows)})" if rows else "")

        text += (
            f" Of the {len(drug)} drug-review gaps, {beyond(0.0)} are more than two s.e. above 0, LoRA ahead beyond "
            f"the seeds' noise, and {beyond(1.0)} more than two s.e. above the 1-point target."
        )
    text += (
        " Ours LoRA is the same algorithm as PEFT LoRA in this tool (the rows above compare each method with both)."
    )
    plus = measured.get(PLUS_VS_LAMDA, {})
    if plus:
        within = all(abs(gap) <= se for gap, se in plus.values())
        text += (
            " The last rows are issue 13's LaMDA++ question (at least as good as LaMDA at the same budget: its "
            "ranks average LaMDA's r): "
            + (
                "each gap is within one s.e., so at this budget the rank rule neither helps nor hurts measurably."
                if within
                else "not every gap is within one s.e. (the rows say which way)."
            )
        )
    return [text]


def pooled_sd(samples: list[list[float]]) -> float:
    """The spread the samples share: √(Σ (nᵢ − 1)·varᵢ / Σ (nᵢ − 1)) over those with at least two values."""
    samples = [v for v in samples if len(v) > 1]
    dof = sum(len(v) - 1 for v in samples)
    return math.sqrt(sum((len(v) - 1) * statistics.variance(v) for v in samples) / dof) if dof else math.nan


def seeds_for(sd: float, gap: float = 1.0, z: float = 2.0) -> int:
    """Seeds per side for a `gap` to stand at `z` standard errors when both sides spread by `sd`: the gap's s.e.
    is sd·√(2/n), so z·sd·√(2/n) ≤ gap needs n ≥ 2·(z·sd/gap)² (8·sd² for a 1-point gap at two s.e.)."""
    return math.ceil(2 * (z * sd / gap) ** 2 - 1e-9)


def seeds_needed(runs: list[dict]) -> list[str]:
    """The pooled spread of the drug-review done-when rows, and the seeds a 1-point gap needs at two s.e."""
    groups = grouped(runs)
    rows = [("peft", "lora", ()), ("ours", "lora", ()), *(("ours", method, opts) for method, opts in HELD_TO_LORA)]
    runs_of = [groups.get(("drugreview", *row), []) for row in rows]
    parts = []
    for key, name in (("eval_accuracy", "accuracy"), ("eval_macro_f1", "macro-F1")):
        sd = pooled_sd([values(rs, key, 100) for rs in runs_of])
        if math.isnan(sd):
            return []
        parts.append(f"{sd:.1f} points of {name} ({seeds_for(sd)} seeds a row)")
    return [
        "",
        f"Pooled over the {len(rows)} done-when rows, one run's spread over seeds is {' and '.join(parts)}: that many "
        "seeds on each side would let a 1-point gap stand at two standard errors (the gap's s.e. is sd·√(2/n) "
        "with n seeds a side, so n ≥ 8·sd²).",
    ]


def task_adapter_layers(task: str, method: str, init_seed: int = 0) -> dict:
    """`task`'s model with `method`'s adapters as its runs inject them (r, alpha, head from TASKS), by layer name."""
    spec = TASKS[task]
    head = spec.get("head")
    config = LoRAFAConfig(
        method=method,
        r=spec["r"],
        alpha=spec["alpha"],
        modules_to_save=head.split(",") if head else None,
        init_seed=init_seed,
    )
    return adapter_layers(inject_adapters(load_model(task, spec), config))


def spectrum_score(weight: torch.Tensor, r: int) -> float:
    """The share of `weight`'s spectral energy outside its top-r singular directions: LaMDA++'s score for a layer."""
    energy = torch.linalg.svdvals(weight.detach().float()).square()
    return float(1.0 - energy[:r].sum() / energy.sum().clamp_min(1e-30))


@functools.cache
def lamdapp_ranks(task: str) -> tuple[dict[str, int], dict[str, float]]:
    """Each adapted layer's LaMDA++ rank as the library sets it on `task`'s model, and its spectrum score."""
    layers = task_adapter_layers(task, "lamda++")
    scores = {name: spectrum_score(m.base_layer.weight, TASKS[task]["r"]) for name, m in layers.items()}
    return {name: m.r for name, m in layers.items()}, scores


def lamdapp_paragraph(runs: list[dict]) -> list[str]:
    """What LaMDA++'s rule does to drug-review's model, and what its rows against LaMDA's then measure, per seed."""
    groups = grouped(runs)
    lamda, plus = (
        {r["seed"]: r for r in groups.get(("drugreview", "ours", m, LAMDA), [])} for m in ("lamda", "lamda++")
    )
    seeds = sorted(set(lamda) & set(plus))
    if not seeds:
        return []
    ranks, scores = lamdapp_ranks("drugreview")
    r = TASKS["drugreview"]["r"]
    moved = {name: rank for name, rank in ranks.items() if rank != r}
    odd = ", ".join(f"`{name}` {rank}" for name, rank in moved.items())
    step = max((abs(rank - r) for rank in moved.values()), default=0)
    gaps = {
        name: [100 * (lamda[s][key] - plus[s][key]) for s in seeds]
        for key, name in (("eval_accuracy", "accuracy"), ("eval_macro_f1", "macro-F1"))
    }
    per_seed = "; ".join(f"{name} " + ", ".join(f"{g:+.1f}" for g in gs) for name, gs in gaps.items())
    widest = max(abs(g) for gs in gaps.values() for g in gs)
    return [
        "",
        f"LaMDA++'s ranks on drug-review (the library's rule on {TASKS['drugreview']['model']}'s {len(ranks)} adapted "
        f"layers at r = {r}): their spectrum scores lie between {min(scores.values()):.2f} and "
        f"{max(scores.values()):.2f}, so the split in proportion to them gives {len(ranks) - len(moved)} layers "
        f"LaMDA's rank" + (f" and {odd}" if odd else "") + ". At the same seed every other layer starts from the same "
        "draw as LaMDA's (a layer's init seed is the run's seed and the layer's index), and the head and the data "
        "order are the same, so the two rows are nearly the same run. Per seed "
        f"({', '.join(map(str, seeds))}), LaMDA − LaMDA++ is {per_seed} points: a rank change of at most {step} in "
        f"{len(moved)} of {len(ranks)} layers moves a run by up to {widest:.1f} points, against the 1-point targets "
        "above.",
    ]


def accuracy_part(save_figure) -> list[str]:
    """The accuracy section's lines; `save_figure(fig, ax, name, alt, legend_size)` writes a plot, returns its link."""
    runs, old, earlier = current_runs(), load_runs(RESULTS / "v1"), load_runs(RESULTS / "v2")
    equal = equal_parameter_runs()
    if not runs:
        return ["No accuracy runs of the current protocol finished yet."]
    first = runs[0]
    share = majority_share()
    n = next((r["eval_rows"] for r in runs if r["task"] == "drugreview"), 379)
    se = 100 * (0.7 * 0.3 / n) ** 0.5
    criteria, measured = done_when(runs)
    out = [
        "Command: `python -m research.accuracy sweep --plan issue13`, then `--plan issue13-seeds` and "
        "`--plan issue13-seeds8` (seeds 3 and 4, then 5 to 7, of the done-when rows on drug-review) and "
        "`--plan issue13-ratio` (LoRA-FA's B learning-rate multiple), `--plan issue13-rank` (twice the rank) and "
        "`--plan issue13-lamda-lr` (LaMDA's learning-rate multiples, freeze order and init) (each run in its own "
        "process, skipping finished ones; `--shard 0/2` and `--shard 1/2` split a plan between two sweeps, and two "
        "sweeps without `--shard` share it, each claiming a run before starting it; each row's `run` command is in "
        "its table). Protocols: chatterbot "
        f"{PROTOCOL['chatterbot']}, drug-review {PROTOCOL['drugreview']} (below). Device: a "
        f"{first.get('cpu_count', 2)}-core CPU machine, torch {first.get('torch', '2.13.0+cpu')}; most runs took "
        "1 thread each, two at a time under `nice`, so `train s` is not a speed measure (the memory tables are). "
        "Mean ± std over the seeds listed; a row with fewer than 3 seeds says so.",
        "",
        f"Reading the drug-review table: with {n} test rows one run's accuracy has a binomial standard error of "
        f"about {se:.1f} points; a model answering the majority class scores {100 * share:.1f}% accuracy and "
        f"macro-F1 {majority_f1():.3f}.",
        "",
        "#### Done when",
        "",
        *criteria,
        "",
        *se_paragraph(measured, n),
        *seeds_needed(runs),
        *lamdapp_paragraph(runs),
        *lamda_note(runs),
        *(["", *section] if (section := equal_done_when(runs, equal, measured)) else []),
        "",
        *protocol_section(old, earlier, runs),
        "",
        *ablation_section(runs, old),
        "",
        *lorafa_ratio_section(runs, equal),
        "",
        *(section + [""] if (section := rank_section(runs, equal)) else []),
        *(section + [""] if (section := lamda_ratio_section(runs, equal)) else []),
        *(section + [""] if (section := frozen_a_section(runs)) else []),
        *(section + [""] if (section := oracle_a_section(load_runs(ORACLE), runs)) else []),
        *(section + [""] if (section := update_norms_section(load_runs(UPDATE_NORMS), runs)) else []),
        *(section + [""] if (section := a_directions_section(load_runs(A_DIRECTIONS))) else []),
        *task_tables(runs, save_figure),
    ]
    done = {p.stem for p in RESULTS.glob("*.json")}
    for plan in (
        "issue13",
        "issue13-seeds",
        "issue13-seeds8",
        "issue13-ratio",
        "issue13-rank",
        "issue13-lamda-lr",
        "issue13-frozen-a",
    ):
        if missing := [run_name(*r) for r in PLANS[plan] if run_name(*r) not in done]:
            out += ["", f"Planned in `--plan {plan}` but not run when this page was generated: {', '.join(missing)}."]
    return out
