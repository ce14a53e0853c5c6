"""research/oracle_a.py: LoRA-FA and LaMDA trained over the A that ours LoRA learned at the same seed (a short run
of the real drug-review task: the experiment's plumbing, not its result)."""

from __future__ import annotations

import json

import torch

from research import oracle_a


def test_overlap_is_one_for_the_same_space_and_zero_for_an_orthogonal_one():
    q = torch.linalg.qr(torch.randn(16, 6, dtype=torch.float64))[0].t()
    mixed = torch.linalg.qr((torch.randn(3, 3, dtype=torch.float64) @ q[:3]).t())[0].t()  # another basis of q[:3]
    overlap = oracle_a.overlaps({"l": q[:3], "m": q[:3]}, {"l": mixed, "m": q[3:]})
    assert abs(overlap["l"] - 1) < 1e-12 and abs(overlap["m"]) < 1e-12
    assert oracle_a.summary({"a": 0.2, "b": 0.9, "c": 0.5}) == {"median": 0.5, "min": 0.2, "max": 0.9, "layers": 3}


def test_lorafa_trains_over_the_row_space_lora_ended_with(tmp_path):
    torch.set_num_threads(2)
    oracle_a.seed_runs("drugreview", 0, ("lorafa",), tmp_path, (("max_steps", 3),))
    lora = json.loads((tmp_path / "drugreview-ours-lora-seed0-max_steps3.json").read_text())
    lorafa = json.loads((tmp_path / "drugreview-ours-lorafa-ratio4-seed0-max_steps3-a-lora-final.json").read_text())
    assert lorafa["tag"] == "a-lora-final" and lorafa["max_steps"] == 3
    assert (
        lorafa["command"]
        == lora["command"]
        == ("python -m research.oracle_a --task drugreview --seeds 0 --methods lorafa --spec max_steps=3")
    )
    moved = lora["finished"]["a_overlap_with_init"]
    assert moved["layers"] == 36 and moved["min"] < 1 - 1e-4  # LoRA's A moved in 3 steps, a little
    prepared = lorafa["prepared"]
    # LoRA-FA's random A at this seed is LoRA's initial A; the one it trained over spans LoRA's final A.
    for key in ("random_a_overlap_with_lora_init", "a_overlap_with_lora_final"):
        assert prepared[key]["layers"] == 36 and abs(prepared[key]["min"] - 1) < 1e-9, key
    assert 0 <= lorafa["eval_accuracy"] <= 1 and lorafa["trainable_parameters"] < lora["trainable_parameters"]


def test_the_control_rescales_the_methods_own_random_a_and_trains_no_lora(tmp_path):
    torch.set_num_threads(2)
    oracle_a.seed_runs("drugreview", 0, ("lorafa",), tmp_path, (("max_steps", 2),), a_from="init")
    assert not list(tmp_path.glob("*-lora-seed0*.json"))
    run = json.loads((tmp_path / "drugreview-ours-lorafa-ratio4-seed0-max_steps2-a-random-rescaled.json").read_text())
    assert run["tag"] == "a-random-rescaled" and "--a init" in run["command"]
    own = run["prepared"]["a_overlap_with_own_random_a"]
    assert own["layers"] == 36 and abs(own["min"] - 1) < 1e-9  # the same row space, only its basis and scale changed


def test_a_later_call_reuses_loras_row_spaces_and_gives_the_method_its_options(tmp_path):
    torch.set_num_threads(2)
    spec = (("max_steps", 2),)
    oracle_a.seed_runs("drugreview", 0, ("lorafa",), tmp_path, spec, options=(("lorafa_lr_ratio", 1.0),))
    lora_file = tmp_path / "drugreview-ours-lora-seed0-max_steps2.json"
    lora = lora_file.read_bytes()
    assert (tmp_path / "tmp" / "drugreview-ours-lora-seed0-max_steps2-row-spaces.safetensors").exists()
    oracle_a.seed_runs("drugreview", 0, ("lorafa",), tmp_path, spec, options=(("lorafa_lr_ratio", 2.0),))
    assert lora_file.read_bytes() == lora  # LoRA was not trained again
    for ratio in (1, 2):
        run = json.loads(
            (tmp_path / f"drugreview-ours-lorafa-ratio{ratio}-seed0-max_steps2-a-lora-final.json").read_text()
        )
        assert (
            run["effective_options"]["lorafa_lr_ratio"] == ratio
            and f"--opt lorafa_lr_ratio={ratio:.1f}" in run["command"]
        )
        final = run["prepared"]["a_overlap_with_lora_final"]  # the kept row spaces are LoRA's, as trained
        assert final["layers"] == 36 and abs(final["min"] - 1) < 1e-9
