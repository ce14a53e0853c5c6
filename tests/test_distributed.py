"""Multi-process training on CPU (gloo): `accelerate launch` of scripts/finetune.py and `hf-lorafa train`; FSDP2.

Each 2-process run trains a tiny Llama folder (tests/fixtures/tiny_folder.py) for a few steps with a per-device
batch of 2; the same run in one process with a batch of 4 is the reference. Equal tokens per row, dropout 0: the
data-parallel run must give the same adapter within float tolerance, on every rank, saved once by rank 0.

On CPU, `accelerate launch --cpu` starts ONE process whatever `--num_processes` says (its simple launcher), so the
runs use `--multi_gpu` (torchrun underneath) with the script's `--use_cpu`, which makes accelerate pick gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures.tiny_folder import adapter_tensors, build_tiny_llama_folder, job_trainer, write_qa_jsonl
from safetensors import safe_open
from safetensors.torch import load_file

from hf_lorafa.training.checkpoints import TRAINING_STATE_FILE, complete_checkpoints

REPO = Path(__file__).resolve().parent.parent
LAUNCH = [
    sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
    "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
]  # fmt: skip
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "hf_lorafa.json", TRAINING_STATE_FILE}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_llama_folder(root / "model"), write_qa_jsonl(root / "qa.jsonl")


def flags(tiny, output_dir: Path, batch: int, method: str, steps: int, use_cpu: bool = True) -> list[str]:
    model, data = tiny
    return [
        *(["--use_cpu"] if use_cpu else []),
        "--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(output_dir),
        "--adapter_method", method, "--lora_r", "4", "--lora_dropout", "0", "--lamda_freeze_fraction", "0.5",
        "--max_steps", str(steps), "--per_device_train_batch_size", str(batch), "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "2",
        "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
    ]  # fmt: skip


def launch(*args: str, launcher: list[str] = LAUNCH) -> subprocess.CompletedProcess:
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=420, cwd=REPO, env={**os.environ, **env}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def single_process(argv: list[str]) -> dict[str, torch.Tensor]:
    """The same job in this process (one rank, the global batch); its adapter tensors after training."""
    trainer = job_trainer(argv)
    trainer.train()
    return adapter_tensors(trainer.model)


def check_two_ranks(output_dir: Path, reference: dict[str, torch.Tensor], steps: int) -> None:
    """Both ranks hold the reference adapter; rank 0 alone saved, once, complete; memory was logged."""
    ranks = []
    for rank in (0, 1):
        path = output_dir / "rank-probe" / f"rank-{rank}.safetensors"
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"should_save": str(rank == 0), "world_size": "2"}
        ranks.append(load_file(path))
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    for name, tensor in ranks[0].items():
        assert torch.equal(tensor, ranks[1][name]), f"{name} differs between the two ranks"
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)
    assert any("lora_B" in n and ranks[0][n].abs().sum() > 0 for n in ranks[0])  # it trained
    saved = load_file(output_dir / TRAINING_STATE_FILE)
    assert all(torch.equal(saved[n], ranks[0][n]) for n in ranks[0])  # what rank 0 wrote is what the ranks hold
    names = {p.name for p in output_dir.iterdir()}
    assert ADAPTER_FILES <= names and not any(n.startswith(".") or n.endswith(".tmp") for n in names), names
    expected = [f"checkpoint-{s}" for s in sorted({*range(2, steps + 1, 2), steps})]  # every 2 steps, and the last
    assert [c.name for c in complete_checkpoints(output_dir)] == expected
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == expected
    for checkpoint in complete_checkpoints(output_dir):
        # One RNG state per rank (Trainer's DDP layout), one adapter: the ranks did not each save.
        assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}
    history = json.loads((output_dir / expected[-1] / "trainer_state.json").read_text())["log_history"]
    steps_logged = [h for h in history if "loss" in h]
    assert len(steps_logged) == steps
    assert steps_logged[0]["epoch"] == pytest.approx(4 / 28)  # global batch 4 over 28 rows: two ranks took part
    for entry in steps_logged:
        assert {"memory/peak_mib", "trainable_params", "memory/activation_mib"} <= entry.keys()
        assert entry["memory/peak_mib"] > 0 and entry["memory/activation_mib"] > 0
    assert json.loads((output_dir / "memory.json").read_text())["peak_bytes"] > 0


def test_ddp_finetune_script_equals_one_process_on_the_global_batch(tiny, tmp_path):
    # Plain torchrun and no --use_cpu: on a machine without GPUs the arguments switch to CPU/gloo themselves (else
    # each process would train alone and write the same folder).
    out = tmp_path / "ddp"
    script = ["tests/fixtures/rank_probe.py", "scripts/finetune.py", *flags(tiny, out, 2, "lorafa", 3, use_cpu=False)]
    launch(*script, launcher=TORCHRUN)
    reference = single_process(flags(tiny, tmp_path / "one", 4, "lorafa", 3))
    check_two_ranks(out, reference, steps=3)


def test_ddp_cli_train_equals_one_process_on_the_global_batch(tiny, tmp_path):
    # LaMDA: its schedule flips B's requires_grad mid-run, under DDP's gradient buckets. The job evaluates before
    # training, which must not leave the model unwrapped (each rank would then train alone).
    out = tmp_path / "ddp"
    argv = ["--max_eval_samples", "4"]
    launch("tests/fixtures/rank_probe.py", "-m", "hf_lorafa.cli", "train", *flags(tiny, out, 2, "lamda", 4), *argv)
    reference = single_process([*flags(tiny, tmp_path / "one", 4, "lamda", 4), *argv])
    check_two_ranks(out, reference, steps=4)


def test_fsdp2_sharded_parameters_give_the_one_process_adapter(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fixtures" / "fsdp_check.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=420,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("lorafa", "lamda"):
        sharded = load_file(tmp_path / f"fsdp-{method}.safetensors")
        single = load_file(tmp_path / f"single-{method}.safetensors")
        assert sharded.keys() == single.keys()
        for name in single:
            torch.testing.assert_close(sharded[name], single[name], rtol=1e-4, atol=2e-5, msg=f"{method} {name}")
        assert any("lora_B" in n and not torch.equal(single[n], torch.zeros_like(single[n])) for n in single)
        # The adapter saved from the gathered state dict is the one-process adapter (LaMDA folded B' = B S).
        saved = load_file(tmp_path / f"fsdp-adapter-{method}" / "adapter_model.safetensors")
        reference = load_file(tmp_path / f"single-adapter-{method}" / "adapter_model.safetensors")
        assert saved.keys() == reference.keys() and len(saved) > 0
        for name in reference:
            torch.testing.assert_close(saved[name], reference[name], rtol=1e-4, atol=2e-5, msg=f"{method} {name}")
        # Saving the shards without the gathered state dict is refused before anything is written.
        assert "`state_dict` is needed" in (tmp_path / f"fsdp-shard-error-{method}.txt").read_text()
        assert not (tmp_path / f"fsdp-unsaved-{method}").exists()


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step_with_one_checkpoint(tiny, tmp_path):
    """An eviction that reaches rank 1 only: both ranks save checkpoint-2 together and exit 143, instead of rank 0
    training on alone and waiting forever for rank 1's gradients."""
    out = tmp_path / "run"
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "HF_LORAFA_SIGTERM_AT_STEP": "2", "HF_LORAFA_SIGTERM_RANK": "1",
    }  # fmt: skip
    argv = flags(tiny, out, 2, "lorafa", 6)
    argv[argv.index("--save_steps") + 1] = "100"
    result = subprocess.run(
        [*TORCHRUN, "tests/fixtures/pause_probe.py", "scripts/finetune.py", *argv],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )  # fmt: skip
    assert result.returncode != 0, result.stderr[-3000:]  # the run did not finish: torchrun reports the 143s
    assert "exitcode  : 143" in result.stderr or "exitcode: 143" in result.stderr, result.stderr[-3000:]
    assert f"stopped by SIGTERM at step 2 of 6; saved {out / 'checkpoint-2'}" in result.stderr, result.stderr[-3000:]
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()
