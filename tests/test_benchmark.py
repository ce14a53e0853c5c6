"""The benchmark's `cpu-small` preset end to end, its invariants, and the memory estimator against measurements."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from hf_lorafa.cli.bench import PRESETS, configurations, main, worker_specs
from hf_lorafa.cli.estimate import main as estimate_main
from hf_lorafa.memory.estimate import estimate_memory

RESULT_KEYS = {
    "method",
    "dropout",
    "load_in_4bit",
    "saved_bytes",
    "retained_rss_bytes",
    "peak_rss_bytes",
    "overhead_bytes",
    "step_seconds",
    "tokens_per_second",
    "trainable_parameters",
    "total_parameters",
    "estimate",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu-small.json"
    assert main(["--preset", "cpu-small", "--output", str(out)]) == 0
    return json.loads(out.read_text())


def by_method(report, method):
    return next(r for r in report["results"] if r["method"] == method)


def test_report_structure(report):
    assert report["preset"] == "cpu-small" and report["device"]["cores"] >= 1
    assert [r["method"] for r in report["results"]] == [c["method"] for c in configurations(PRESETS["cpu-small"])]
    for result in report["results"]:
        assert "error" not in result, result.get("error")
        assert RESULT_KEYS <= set(result)
        assert result["saved_bytes"] > 0 and result["peak_rss_bytes"] > result["overhead_bytes"] > 0
        assert result["step_seconds"] > 0
    assert set(report["ratios"]["bfloat16-dropout0.05"]) >= {"lorafa_saved_over_floor", "lorafa_saved_over_peft_lora"}


def test_lorafa_keeps_no_more_than_the_floor_and_less_than_peft_lora(report):
    floor, peft, ours = (by_method(report, m) for m in ("floor", "peft-lora", "lorafa"))
    assert ours["saved_bytes"] <= 1.03 * floor["saved_bytes"]
    assert ours["saved_bytes"] < peft["saved_bytes"]
    # r=4 on 64/128-wide layers: B is the only trained matrix, half of LoRA's adapter parameters.
    assert ours["trainable_parameters"] * 2 == peft["trainable_parameters"]


def test_lorafa_r_gives_lorafa_loras_trainable_parameters_and_still_keeps_less(tmp_path, report):
    out = tmp_path / "equal.json"
    assert (
        main(["--preset", "cpu-small", "--lorafa-r", "8", "--methods", "peft-lora,lorafa", "--output", str(out)]) == 0
    )
    equal = json.loads(out.read_text())
    peft, ours = (by_method(equal, m) for m in ("peft-lora", "lorafa"))
    assert (peft["r"], ours["r"]) == (4, 8) and equal["settings"]["lorafa_r"] == 8
    # B alone at 2r: 2r·d_out a layer, LoRA's r·(d_in + d_out); the tiny Llama's d_in and d_out sum alike.
    assert (
        ours["trainable_parameters"]
        == peft["trainable_parameters"]
        == 2 * by_method(report, "lorafa")["trainable_parameters"]
    )
    # Twice the rank keeps 2r values a token per adapted layer: still far below LoRA's dropout(x) and mask.
    assert by_method(report, "lorafa")["saved_bytes"] < ours["saved_bytes"] < peft["saved_bytes"]
    assert ours["estimate"]["activations"] == pytest.approx(ours["saved_bytes"], rel=0.10)


def test_lorafa_r_sets_every_frozen_a_method_and_leaves_lora_at_the_presets_r():
    """The memory-at-the-same-accuracy run measures LaMDA and LaMDA++ at twice LoRA's r too, as the accuracy tables
    pair them; LoRA (ours and PEFT's), full FT and the floor keep the preset's r."""
    preset = {**PRESETS["cpu"], "lorafa_r": 32}
    ranks = {(s["method"], s["dropout"]): s["r"] for s in worker_specs(preset)}
    wide = {"peft-lorafa", "lorafa", "lorafa+savers", "lamda", "lamda++"}
    assert {m for m, _ in ranks} >= wide | {"peft-lora", "lora", "floor"}
    assert all(r == (32 if m in wide else 16) for (m, _), r in ranks.items())
    assert {s["r"] for s in worker_specs(PRESETS["cpu"])} == {16}  # unset: every method at the preset's r


def test_lorafa_r_must_be_a_positive_rank(capsys):
    with pytest.raises(SystemExit):
        main(["--preset", "cpu-small", "--lorafa-r", "0"])
    assert "--lorafa-r must be a positive rank, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["floor", "peft-lora", "lorafa", "lorafa+savers"])
def test_estimate_predicts_the_measurements(report, method):
    result = by_method(report, method)
    est = result["estimate"]
    # The activation term predicts the saved-for-backward bytes (exact for the frozen paths).
    assert est["activations"] == pytest.approx(result["saved_bytes"], rel=0.10)
    # The peak (with the process overhead measured in the same worker) predicts the step's resident high-water mark.
    assert est["peak"] == pytest.approx(result["peak_rss_bytes"], rel=0.10)


# The tiny Llama the estimator tests size.
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
)


def test_estimate_counts_the_savers_and_their_loss_chunk():
    from hf_lorafa.memory.estimate import LOSS_CHUNK_ELEMENTS
    from hf_lorafa.training.chunked_loss import LOSS_CHUNK_ELEMENTS as chunk

    assert LOSS_CHUNK_ELEMENTS == chunk
    config = LlamaConfig(**TINY)
    stock, savers, attention, mlp, no_block = (
        estimate_memory(config, "lorafa", 2, 64, r=4, activation_savers=a, block_recompute=b)
        for a, b in ((False, True), (True, True), (True, "attention"), (True, "mlp"), (True, False))
    )
    assert savers.activations < attention.activations < no_block.activations < stock.activations
    assert savers.activations < mlp.activations < no_block.activations
    # what the attention replay drops plus what the MLP replay drops is what replaying both drops
    assert (no_block.activations - attention.activations) + (no_block.activations - mlp.activations) == (
        no_block.activations - savers.activations
    )
    assert savers.weights == stock.weights and savers.gradients == stock.gradients


def test_estimate_orders_methods_and_prints_a_table(capsys):
    config = LlamaConfig(**TINY)
    methods = ("none", "lora", "lorafa", "full")
    est = {m: estimate_memory(config, m, batch=2, seq=64, r=4, dropout=0.05) for m in methods}
    assert est["none"].activations < est["lorafa"].activations < est["lora"].activations
    assert est["full"].optimizer_states == 2 * est["full"].gradients == 2 * est["full"].weights
    assert est["lorafa"].trainable_parameters * 2 == est["lora"].trainable_parameters
    assert estimate_memory(config, "lorafa", 2, 64, r=4, load_in_4bit=True).weights < est["lorafa"].weights
    with pytest.raises(ValueError, match="`method`"):
        estimate_memory(config, "qlora", 2, 64)
    with pytest.raises(ValueError, match="load_in_4bit"):
        estimate_memory(config, "full", 2, 64, load_in_4bit=True)


def test_estimate_cli_reads_a_config_folder(tmp_path, capsys):
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    assert estimate_main(["--model", str(tmp_path), "--method", "all", "--batch", "2", "--seq", "16", "--r", "4"]) == 0
    out = capsys.readouterr().out
    for method in ("none", "full", "lora", "lorafa", "lamda"):
        assert f": {method}, batch 2" in out
    assert "activations (saved for backward)" in out and "process overhead" in out
    assert estimate_main(["--model", str(tmp_path), "--batch", "2", "--seq", "16", "--activation-savers"]) == 0
    from hf_lorafa.training.arguments import LoRAFATrainingArguments

    default = LoRAFATrainingArguments.__dataclass_fields__["block_recompute"].default  # the CLI's follows it
    assert default == "all"
    assert f": lorafa, batch 2 × seq 16, r=16, bfloat16, adamw, activation savers, block recompute: {default}\n" in (
        capsys.readouterr().out
    )


def test_memory_at_the_same_accuracy_section_is_what_the_2r_run_gives():
    """BENCHMARKS.md's "Memory at the same accuracy" part comes from benchmarks/cpu-lorafa-2r.json line for line, and
    names each frozen-A method the run measured at twice LoRA's r, LaMDA's bytes included."""
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root / "scripts"))
    from make_benchmarks_md import equal_rank_section, load, wrap

    report = load("cpu-lorafa-2r.json")
    lines = equal_rank_section(report)
    page = (root / "BENCHMARKS.md").read_text()
    missing = [line for line in wrap(lines) if line and line not in page]
    assert not missing, f"BENCHMARKS.md is stale (run `python scripts/make_benchmarks_md.py`): {missing[:2]}"
    measured = {r["method"]: r for r in report["results"] if "error" not in r}
    wide = report["settings"]["lorafa_r"]
    assert all(measured[m]["r"] == wide for m in ("lorafa", "peft-lorafa") if m in measured)
    if "lamda" in measured:
        assert measured["lamda"]["r"] == wide
        ratio = report["ratios"][f"{report['settings']['dtype']}-dropout0.05"]["lamda_saved_over_peft_lora"]
        peft = next(r for r in report["results"] if r["method"] == "peft-lora" and r["dropout"] == 0.05)
        assert ratio == round(measured["lamda"]["saved_bytes"] / peft["saved_bytes"], 4)
        assert f"LaMDA at r={wide} keeps {ratio:.3f}× PEFT LoRA's saved-for-backward bytes" in lines[4]
        assert (
            lines[0].startswith("### Memory at the same accuracy: LoRA-FA, LaMDA")
            and f"LoRA at r={report['settings']['r']}" in lines[0]
        )
