"""`hf-lorafa bench --preset mainjob`: a real variant run measured from outside, and README's table from its JSON."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from hf_lorafa.cli.bench_mainjob import (
    GPU_JOB,
    GPU_VARIANTS,
    VARIANTS,
    build_model,
    main,
    packed_rows,
    ratios,
    run_variant,
    summarise,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from mainjob_tables import _table, climb, gpu_section, intervals_section, update_readme  # noqa: E402

# The GPU job's code path at a size the CPU runs in seconds: the same packing, model building and variants.
TINY_GPU_JOB = {
    **GPU_JOB,
    "dtype": "float32",
    "batch": 2,
    "max_length": 64,
    "eval_rows": 2,
    "model_config": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "tie_word_embeddings": False,
    },
}


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


def test_the_step_goal_is_read_from_the_speed_pass_where_there_is_one():
    from mainjob_tables import _goals
    from make_benchmarks_md import goal

    step = "default: ours median step / PEFT LoRA median step"
    report, speed = {"ratios": {step: 1.089}}, {"ratios": {step: 0.947}}
    with_pass = next(line for line in _goals(report, None, None, speed, goal) if "median step" in line)
    alone = next(line for line in _goals(report, None, None, None, goal) if "median step" in line)
    assert "speed pass" in with_pass and "| 0.947 | reached |" in with_pass
    assert "speed pass" not in alone and "| 1.089 | missed by 8.9% |" in alone


def test_benchmarks_md_shows_the_committed_main_job_intervals():
    from make_benchmarks_md import goal

    memory = json.loads((ROOT / "benchmarks" / "mainjob-memory.json").read_text())
    tables = [line for line in intervals_section(memory, goal) if line.startswith("|")]  # the prose is re-wrapped
    assert len(tables) > 10 and "\n".join(tables[4:]) in (ROOT / "BENCHMARKS.md").read_text()
    assert tables[2] in (ROOT / "BENCHMARKS.md").read_text()  # the goal line


@pytest.fixture(scope="module")
def gpu_job(tmp_path_factory):
    out = tmp_path_factory.mktemp("mainjob-gpu")
    job = {**TINY_GPU_JOB, "model_path": build_model(TINY_GPU_JOB, str(out / "model"))}
    names = ("ours", "PEFT LoRA", "TRL SFTTrainer (PEFT LoRA)")
    return job, {name: run_variant(name, 2, "default", str(out / "runs"), job) for name in names}


def test_the_gpu_job_builds_its_model_once_from_smollm2s_configuration(gpu_job):
    from transformers import AutoConfig, AutoTokenizer

    from hf_lorafa.data.offline import resolve_model

    job, _ = gpu_job
    config, base = AutoConfig.from_pretrained(job["model_path"]), AutoConfig.from_pretrained(resolve_model("smollm2"))
    assert {key: getattr(config, key) for key in job["model_config"]} == job["model_config"]
    assert config.vocab_size == base.vocab_size and config.model_type == "llama"
    weights = Path(job["model_path"]) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_model(job, job["model_path"]) == job["model_path"] and weights.stat().st_mtime_ns == stamp
    assert len(AutoTokenizer.from_pretrained(job["model_path"])) == len(
        AutoTokenizer.from_pretrained(base._name_or_path)
    )


def test_the_gpu_job_packs_the_pairs_into_full_rows():
    from transformers import AutoTokenizer

    from hf_lorafa.data.offline import resolve_model
    from hf_lorafa.data.preprocessing import load_raw_dataset

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"))
    raw = load_raw_dataset("chatterbot", seed=42)
    data = packed_rows(raw, tokenizer, 64)
    first = raw["train"][0]
    expected = tokenizer(f"{first['question']} {first['answer']}")["input_ids"] + [tokenizer.eos_token_id]
    assert data["train"][0]["input_ids"][: len(expected)] == expected[:64]
    for split in ("train", "test"):
        assert len(data[split]) > 2 and {len(row) for row in data[split]["input_ids"]} == {64}
        assert data[split]["labels"] == data[split]["input_ids"]


def test_every_gpu_job_variant_trains_on_the_packed_rows(gpu_job):
    _, runs = gpu_job
    for name, run in runs.items():
        assert "error" not in run, (name, run.get("error"))
        assert math.isfinite(run["eval_loss"]) and math.isfinite(run["train_loss"]) and run["trainable_parameters"] > 0
    # A random 49k-token model starts near log(vocab size) on any rows.
    assert all(abs(run["eval_loss"] - math.log(49152)) < 1.0 for run in runs.values())
    assert set(GPU_VARIANTS) <= set(VARIANTS)


def test_the_gpu_job_refuses_a_machine_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="CUDA GPU"):
        main(None, 2, 1, ["default"], str(tmp_path), preset="mainjob-gpu")


def test_a_gpu_report_reads_the_cuda_peak():
    def row(variant, rss, cuda, step):
        return {"variant": variant, "allocator": "default", "peak_rss_bytes": rss, "peak_cuda_bytes": cuda,
                "step_seconds": step, "train_loss": 1.0, "eval_loss": 2.0, "trainable_parameters": 5,
                "activation_savers": None, "runs": 1}  # fmt: skip

    rows = summarise([row("ours", 9 * 2**30, 2**30, 1.0), row("PEFT LoRA + GC", 2**30, 4 * 2**30, 2.0)])
    got = ratios(rows)
    assert got["default: ours peak / PEFT LoRA + GC peak"] == 0.25
    report = {
        "settings": {**TINY_GPU_JOB, "steps": 2, "repeats": 1},
        "device": {"gpu": "H100", "torch": "2"},
        "command": "hf-lorafa bench --preset mainjob-gpu",
        "seconds": 1.0,
        "results": rows,
        "ratios": got,
    }
    section = "\n".join(gpu_section(report))
    assert "| 1.00 | 0.25 |" in section and "H100" in section  # ours: 1 GiB on the GPU, a quarter of GC's
    assert "No GPU run yet" in "\n".join(gpu_section(None))
