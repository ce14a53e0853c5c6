"""Where the default's peak goes (`hf-lorafa bench --preset mainjob --breakdown`): a real tiny run taken apart.

The tiny Llama trains under LoRAFATrainer with activation savers and block recompute on; the parts of its highest
sampled resident memory must sum to it, the forward must leave block inputs and LoRA-FA's z and no attention or
SwiGLU tensors, and BENCHMARKS.md's table must come from the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_trainer import make_args, token_dataset

from hf_lorafa import LoRAFAConfig, LoRAFATrainer, apply_activation_savers, inject_adapters
from hf_lorafa.cli import bench
from hf_lorafa.cli.bench_breakdown import measure_training, table
from hf_lorafa.memory.measure import saved_tensor_bytes
from hf_lorafa.memory.peak_breakdown import heap_info
from hf_lorafa.memory.saved_by_kind import SavedByKind

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from mainjob_tables import breakdown_section  # noqa: E402

glibc = pytest.mark.skipif(heap_info() is None, reason="needs glibc's mallinfo2")
BATCH, SEQ, HIDDEN, LAYERS, R = 4, 16, 64, 2, 4


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    args = make_args(
        tmp_path_factory.mktemp("breakdown"), activation_savers=True, block_recompute=True, max_steps=3, lora_r=R
    )
    trainer = LoRAFATrainer(model=tiny_llama(HIDDEN, LAYERS), args=args, train_dataset=token_dataset(length=SEQ))
    assert "block_recompute" in trainer.model.hf_lorafa_savers
    return measure_training(trainer)


def savers_model(block_recompute: bool):
    model = inject_adapters(tiny_llama(HIDDEN, LAYERS), LoRAFAConfig(r=R))
    return apply_activation_savers(model, block_recompute=block_recompute)


@glibc
def test_the_parts_sum_to_the_highest_sampled_resident_memory(report):
    parts = {p["key"]: p["bytes"] for p in report["components"]}
    assert sum(parts.values()) == report["peak_rss_bytes"]
    assert all(n >= 0 for n in parts.values()), parts
    assert parts["base_files"] > 0 and parts["base_anonymous"] > 0 and parts["heap_at_start"] > 0
    heap = report["heap"]
    assert heap["uordblks"] + heap["fordblks"] == heap["arena"]
    # the kernel's high-water mark covers the same steps, between the readings too (its counters lag a little)
    assert report["vmhwm_bytes"] > 0.95 * report["peak_rss_bytes"]
    weights = sum(t.numel() * t.element_size() for t in tiny_llama(HIDDEN, LAYERS).parameters())
    assert weights < parts["weights_frozen"] + parts["weights_trainable"] < 1.2 * weights  # plus the adapters
    assert report["peak"]["step"] in (1, 2, 3) and report["peak"]["batch_shape"] == [BATCH, SEQ]
    assert report["peak"]["phase"] in ("forward", "backward", "optimizer") and report["samples"] > 100


def test_the_forward_keeps_block_inputs_and_z_and_backward_replays_attention_and_swiglu(report):
    kept = report["saved_after_forward"]
    tokens = BATCH * SEQ
    assert kept["block_inputs"] == LAYERS * 2 * tokens * HIDDEN * 4  # each attention and MLP block's fp32 input
    assert kept["lora_z"] == LAYERS * 2 * tokens * R * 4  # o_proj's and down_proj's z; the rest replay
    assert kept["attention"] == kept["swiglu"] == kept["embeddings"] == 0
    assert report["replay_max_bytes"]["attention"] > 0 and report["replay_max_bytes"]["swiglu"] > 0
    assert not report["notes"]


def test_without_block_recompute_attention_and_swiglu_are_kept_instead(input_ids):
    model = savers_model(block_recompute=False).train()
    saved = SavedByKind(model)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    kept = saved.alive()
    assert kept["attention"] > 0 and kept["swiglu"] > 0 and kept["block_inputs"] == 0
    loss.backward()
    saved.remove()


@pytest.mark.parametrize("block_recompute", [True, False])
def test_kinds_add_up_to_the_documented_count_and_backward_frees_them(input_ids, block_recompute):
    model = savers_model(block_recompute).train()
    saved = SavedByKind(model)
    counted, loss = saved_tensor_bytes(model, lambda: model(input_ids=input_ids, labels=input_ids).loss)
    assert sum(saved.alive().values()) == counted > 0  # the same tensors as SavedTensorCounter (docs/memory.md)
    loss.backward()
    assert sum(saved.alive().values()) == 0
    saved.remove()
    assert not any(m._forward_pre_hooks for m in model.modules() if m is not model)


def test_the_table_comes_from_the_json(report):
    full = {
        **json.loads(json.dumps(report)),
        "settings": {"variant": "ours", "steps": 3},
        "device": {"cpu": "a test CPU", "cores": 2},
        "torch": torch.__version__,
        "transformers": "5",
        "command": "hf-lorafa bench --preset mainjob --breakdown --steps 3",
        "seconds": 1.0,
    }
    section = breakdown_section(full)
    assert section[0] == "### Where the default's peak goes"
    assert f"`{full['command']}`" in section[2] and "a test CPU" in section[2]
    rows = [line for line in section if line.startswith("| ") and "| MiB |" not in line]
    shown = [part for part in report["components"] if part["bytes"]]
    assert len(rows) == len(shown) + 1
    peak = full["peak_rss_bytes"]
    for part, row in zip(shown, rows):
        assert row == f"| {part['what']} | {part['bytes'] / 2**20:.1f} | {part['bytes'] / peak:.1%} |"
    assert f"**{report['peak_rss_bytes'] / 2**20:.1f}**" in rows[-1]
    zero = [part["what"] for part in report["components"] if not part["bytes"]]  # embeddings keep nothing here
    assert zero and all(what in next(line for line in section if line.startswith("Nothing at")) for what in zero)
    assert all(part["what"] in table(report) for part in report["components"])


def test_breakdown_belongs_to_the_main_job_alone():
    with pytest.raises(SystemExit):
        bench.main(["--preset", "cpu-small", "--breakdown"])
    with pytest.raises(SystemExit, match="drop --variants"):
        bench.main(["--preset", "mainjob", "--breakdown", "--variants", "ours"])
