"""research/update_norms.py: the size of the adapters' update over a run, and how far LoRA's A moved (short real runs
of the drug-review protocol)."""

import json

import torch

from research import update_norms


def test_lora_moves_a_and_lorafa_keeps_it_while_both_grow_the_update(tmp_path):
    torch.set_num_threads(2)
    spec = (("max_steps", 3),)  # the first step warms up from lr 0
    lora = update_norms.trace("drugreview", "lora", 0, (), tmp_path, spec, every=1)
    lorafa = update_norms.trace("drugreview", "lorafa", 0, (), tmp_path, spec, every=1)
    saved = json.loads((tmp_path / "drugreview-ours-lorafa-ratio4-seed0-max_steps3-norms.json").read_text())
    assert saved["finished"] == lorafa["finished"] and saved["prepared"] == {"layers": 36, "every": 1}
    assert (
        saved["command"]
        == "python -m research.update_norms --task drugreview --method lorafa --seed 0 --spec max_steps=3"
    )
    for run in (lora, lorafa):
        norms = run["finished"]["norms"]
        assert [n["step"] for n in norms] == [0, 1, 2, 3]
        assert norms[0]["delta_w_norm"] == 0 and 0 < norms[2]["delta_w_norm"] < norms[3]["delta_w_norm"]
        assert 0 < norms[3]["delta_w_relative"] < norms[3]["delta_w_norm"]  # every adapted W has ‖W‖_F > 1
    moved = lora["finished"]["norms"][-1]
    assert moved["a_norm_ratio"] != 1 and moved["a_energy_in_init_row_space"] < 1 - 1e-9  # A trains in LoRA
    kept = lorafa["finished"]["norms"][-1]
    assert kept["a_norm_ratio"] == 1 and abs(kept["a_energy_in_init_row_space"] - 1) < 1e-12  # and is frozen here
    # B alone at 4x LoRA's learning rate makes the larger update from the same start.
    assert lorafa["finished"]["norms"][2]["delta_w_norm"] > 2 * lora["finished"]["norms"][2]["delta_w_norm"]
