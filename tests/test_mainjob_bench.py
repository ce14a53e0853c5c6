"""`hf-lorafa bench --preset mainjob`: a real variant run measured from outside, and README's table from its JSON."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from hf_lorafa.cli.bench_mainjob import VARIANTS, ratios, run_variant, summarise

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from mainjob_tables import _table, climb, intervals_section, update_readme  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mainjob")
    return [run_variant(name, 2, "default", str(out)) for name in ("ours without block recompute", "ours")]


def test_a_variant_trains_in_its_own_process_and_is_sampled_over_training(runs):
    for run in runs:
        assert "error" not in run, run.get("error")
        assert run["samples"] > 10 and run["train_end"] > run["train_start"]
        assert 0.5 * 2**30 < run["peak_rss_bytes"] < 16 * 2**30  # SmolLM2-135M's fp32 weights alone are 0.5 GiB
        assert math.isfinite(run["eval_loss"]) and math.isfinite(run["train_loss"]) and run["step_seconds"] > 0
        assert run["trainable_parameters"] > 0


def test_block_recompute_of_the_default_changes_no_loss_of_the_main_job(runs):
    without, with_blocks = runs
    assert with_blocks["train_loss"] == without["train_loss"] and with_blocks["eval_loss"] == without["eval_loss"]
    assert "block_recompute" in with_blocks["activation_savers"]
    assert "block_recompute" not in without["activation_savers"]


def test_summary_takes_the_highest_peak_and_the_median_step_per_variant():
    def run(variant, peak, step):
        return {"variant": variant, "allocator": "default", "peak_rss_bytes": peak, "step_seconds": step,
                "train_loss": 1.0, "eval_loss": 2.0, "trainable_parameters": 5, "activation_savers": None}  # fmt: skip

    runs = [run("ours", 3, 2.0), run("PEFT LoRA + GC", 8, 6.0), run("ours", 5, 3.0), run("PEFT LoRA", 10, 4.0)]
    rows = {r["variant"]: r for r in summarise(runs + [{"variant": "TRL", "error": "exit 1"}])}
    assert (rows["ours"]["peak_rss_bytes"], rows["ours"]["step_seconds"], rows["ours"]["runs"]) == (5, 2.5, 2)
    assert rows["TRL"]["error"] == "exit 1"
    got = ratios(list(rows.values()))
    assert got["default: ours peak / PEFT LoRA + GC peak"] == 0.625
    assert got["default: ours median step / PEFT LoRA median step"] == 0.625


def test_readme_table_is_the_committed_benchmarks(tmp_path):
    report = json.loads((ROOT / "benchmarks" / "mainjob.json").read_text())
    assert set(r["variant"] for r in report["results"]) <= set(VARIANTS)
    table = "\n".join(_table(report, "readme"))
    assert table in (ROOT / "README.md").read_text()
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- mainjob:start -->\nold\n<!-- mainjob:end -->\nrest\n")
    update_readme(readme, report)
    assert readme.read_text() == f"intro\n<!-- mainjob:start -->\n{table}\n<!-- mainjob:end -->\nrest\n"


def test_climb_is_the_peak_rise_beyond_the_activations_rise():
    history = [
        {"step": 5, "memory/peak_mib": 1000.0, "memory/activation_mib": 200.0},
        {"step": 10, "memory/peak_mib": 1150.0, "memory/activation_mib": 300.0},  # +150 peak, +100 activations
        {"step": 15, "memory/peak_mib": 990.0, "memory/activation_mib": 180.0},
        {"step": 20, "memory/peak_mib": 1500.0},  # the end-of-training summary: no step sampled, left out
    ]
    assert [(step, round(excess, 4)) for step, _, _, excess in climb({"history": history})] == [
        (5, 0.0), (10, 0.05), (15, 0.01)
    ]  # fmt: skip


def test_benchmarks_md_shows_the_committed_main_job_intervals():
    from make_benchmarks_md import goal

    memory = json.loads((ROOT / "benchmarks" / "mainjob-memory.json").read_text())
    tables = [line for line in intervals_section(memory, goal) if line.startswith("|")]  # the prose is re-wrapped
    assert len(tables) > 10 and "\n".join(tables[4:]) in (ROOT / "BENCHMARKS.md").read_text()
    assert tables[2] in (ROOT / "BENCHMARKS.md").read_text()  # the goal line
