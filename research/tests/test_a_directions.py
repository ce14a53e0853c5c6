"""research/a_directions.py: how much of LoRA's learned A row space the data's directions hold (a short real
drug-review run of the oracle first, whose LoRA run keeps its row spaces)."""

from __future__ import annotations

import json

import torch

from research import a_directions, oracle_a


def test_held_is_the_share_of_rows_inside_a_row_space():
    q = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64))[0].t()
    d = q[:3]
    assert abs(a_directions.held(d, q[:2]) - 1) < 1e-12  # inside
    assert abs(a_directions.held(d, q[5:7])) < 1e-12  # orthogonal
    assert abs(a_directions.held(d, torch.stack([q[0], q[6]])) - 0.5) < 1e-12  # one of two unit rows inside
    assert abs(a_directions.held(d, 3 * (q[0] + q[6])[None]) - 0.5) < 1e-12  # any length: a share of ‖rows‖²


def test_the_data_directions_are_measured_against_the_row_spaces_loras_run_kept(tmp_path):
    torch.set_num_threads(2)
    spec = (("max_steps", 2),)
    oracle_a.seed_runs("drugreview", 0, ("lorafa",), tmp_path, spec)
    found = a_directions.measure("drugreview", 0, oracle=tmp_path, out=tmp_path / "dirs", spec_changes=spec)
    saved = json.loads(
        (tmp_path / "dirs" / "drugreview-ours-lorafa-ratio4-seed0-max_steps1-directions.json").read_text()
    )
    assert saved["prepared"] == found["prepared"] and saved["max_steps"] == 1
    prepared = found["prepared"]
    assert abs(prepared["random_a_overlap_with_lora_init"]["min"] - 1) < 1e-9  # the same seed's random A as LoRA's
    for kind in a_directions.KINDS:
        shares = prepared[kind]
        assert shares["layers"] == 36 and abs(shares["random"] - 8 / 384) < 1e-12  # the median layer is 384 wide
        assert all(0 <= shares[key] <= 1 for key in ("final", "init", "added"))
        # LoRA's A moved little in 2 steps: its final space holds about what its initial one does.
        assert abs(shares["final"] - shares["init"]) < 0.01
