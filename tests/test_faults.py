"""Faults and safety: kill -9 then resume, an interrupted save, a diverging loss, tokens that must never leak.

- A real `scripts/finetune.py` process is killed with SIGKILL mid-training (right after checkpoint-2, known through
  tests/fixtures/pause_probe.py, no polling); a half-written checkpoint-4 is left beside it; resuming picks
  checkpoint-2 and ends with exactly the adapter of an uninterrupted run (dropout on: the RNG state is restored).
- A loss that turns NaN/inf (a forward hook makes the model really produce it) stops training with
  `TrainingDivergedError`, and the last good checkpoint is left byte for byte as it was.
- Safe loading: `trust_remote_code` is off by default; a token in the environment and in `--hub_token` never
  reaches an output file, a card, a log or an error message.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from datasets import Dataset
from fixtures.tiny_folder import adapter_tensors, build_tiny_llama_folder, job_trainer, write_qa_jsonl
from hub_server import HubServer
from transformers import TrainerCallback

from hf_lorafa import LoRAFATrainer, LoRAFATrainingArguments
from hf_lorafa.training.checkpoints import TRAINING_STATE_FILE, complete_checkpoints
from hf_lorafa.training.trainer import TrainingDivergedError

REPO = Path(__file__).resolve().parent.parent
ENV_TOKEN = "hf_SECRETenvQ9wE2rT5yU8iO1pA4sD7fG0hJ"
FLAG_TOKEN = "hf_SECRETflagZ7xVbN4wRy6TfPj3sLmK2"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_llama_folder(root / "model"), write_qa_jsonl(root / "qa.jsonl")


def flags(tiny, output_dir: Path, *extra: str) -> list[str]:
    model, data = tiny
    return [
        "--model_name_or_path", str(model), "--dataset", str(data), "--output_dir", str(output_dir), "--use_cpu",
        "--max_steps", "6", "--save_steps", "2", "--save_total_limit", "5", "--per_device_train_batch_size", "4",
        "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1",
        "--lora_r", "4", "--lora_dropout", "0.1", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true",
        *extra,
    ]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_kill_9_mid_training_then_resume_gives_the_uninterrupted_adapter(tiny, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_LORAFA_PAUSE_AFTER_SAVE": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "tests/fixtures/pause_probe.py", "scripts/finetune.py", *flags(tiny, out)],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )  # fmt: skip
        try:
            for line in process.stdout:
                if line.startswith("PAUSED checkpoint-2"):
                    break
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2"]
    # Nothing at the top level a user could take for a finished result.
    assert not (out / "adapter_model.safetensors").exists() and not (out / "hf_lorafa.json").exists()

    # A save killed half-way: checkpoint-4 has a truncated adapter and no trainer state.
    partial = out / "checkpoint-4"
    partial.mkdir()
    weights = (out / "checkpoint-2" / "adapter_model.safetensors").read_bytes()
    (partial / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    good = snapshot(out / "checkpoint-2")
    with pytest.raises(ValueError, match=r"checkpoint-4.*not a complete checkpoint.*resume from .*checkpoint-2"):
        job_trainer(flags(tiny, out)).train(resume_from_checkpoint=str(partial))

    resumed = job_trainer(flags(tiny, out))
    resumed.train(resume_from_checkpoint=True)  # the last COMPLETE checkpoint: 2, not the partial 4
    straight = job_trainer(flags(tiny, tmp_path / "straight"))
    straight.train()
    expected, got = adapter_tensors(straight.model), adapter_tensors(resumed.model)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert snapshot(out / "checkpoint-2") == good
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert resumed.state.global_step == 6


class SnapshotSaves(TrainerCallback):
    """Records each checkpoint's bytes when its save completes."""

    def __init__(self) -> None:
        self.saved: dict[str, dict[str, bytes]] = {}

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.saved[folder.name] = snapshot(folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(bad, tmp_path):
    model = tiny_llama()
    forwards = []

    def poison(module, args, output):
        if torch.is_grad_enabled() and module.training:  # not the trainer's probes (in eval mode) at its start
            forwards.append(1)
            if len(forwards) == 3:  # the third training step: after checkpoint-2 was written
                return output * bad
        return output

    model.model.norm.register_forward_hook(poison)
    ids = torch.randint(0, 256, (24, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = LoRAFATrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, save_steps=2, per_device_train_batch_size=4, logging_steps=1,
        report_to="none", lora_r=4, use_cpu=True, disable_tqdm=True, activation_savers=False,
    )  # fmt: skip
    saves = SnapshotSaves()
    trainer = LoRAFATrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}), callbacks=[saves]
    )
    with pytest.raises(TrainingDivergedError) as info:
        trainer.train()
    message = str(info.value)
    assert re.search(r"loss became (nan|inf) at step 3; training stopped", message), message
    assert f"Last good checkpoint: {tmp_path / 'out' / 'checkpoint-2'}" in message
    assert "Lower `learning_rate`" in message and "max_grad_norm" in message
    out = Path(args.output_dir)
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2"] == sorted(saves.saved)
    assert snapshot(out / "checkpoint-2") == saves.saved["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()  # no final adapter that looks like a result
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-2" / TRAINING_STATE_FILE).values())


def test_trust_remote_code_is_never_on_by_default():
    from hf_lorafa.cli.main_job import ScriptArguments
    from hf_lorafa.data.base_model import load_base_model

    assert ScriptArguments().trust_remote_code is False
    assert inspect.signature(load_base_model).parameters["trust_remote_code"].default is False
    sources = [
        *(REPO / "hf_lorafa").glob("*.py"),
        *(REPO / "scripts").glob("*.py"),
        *(REPO / "spaces_demo").glob("*.py"),
    ]
    offenders = [p.name for p in sources if re.search(r"trust_remote_code\s*=\s*True", p.read_text())]
    assert offenders == []


def test_tokens_never_reach_outputs_cards_logs_or_errors(tiny, tmp_path):
    """A training run and a failed push with a token in the environment AND in `--hub_token`."""
    out = tmp_path / "run"
    with HubServer() as hub:
        env = {
            **os.environ, "HF_TOKEN": ENV_TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf-home"), "TOKENIZERS_PARALLELISM": "false",
        }  # fmt: skip
        argv = flags(tiny, out, "--hub_token", FLAG_TOKEN, "--hub_model_id", "user/leak")
        argv[argv.index("--max_steps") + 1] = "2"
        script = (
            "import sys; from hf_lorafa.cli import main; code = main(['train', *sys.argv[1:]]);"
            f"code = code or main(['push', {str(out)!r}, 'user/leak']); sys.exit(code)"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
        )
    assert result.returncode == 1, result.stderr[-2000:]  # trained, then the push was refused (401)
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-lorafa push: error:") and "HTTP 401" in last, last
    assert (out / "adapter_model.safetensors").exists() and (out / "README.md").exists()
    texts = {"stdout": result.stdout, "stderr": result.stderr}
    texts.update({str(p): p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file()})
    for where, text in texts.items():
        assert "SECRET" not in text, f"a token leaked into {where}"
    assert json.loads((out / "training_args.json").read_text())["hub_token"] != FLAG_TOKEN


def test_push_to_hub_flag_trains_pushes_the_adapter_and_no_token(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        token = "hf_testSECRETd8Kq2LmZ7xVbN4wRy6TfPj3s"  # accepted by the test server
        ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
        args = LoRAFATrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=2, save_steps=1, per_device_train_batch_size=4,
            report_to="none", lora_r=4, use_cpu=True, disable_tqdm=True, activation_savers=False,
            push_to_hub=True, hub_model_id="user/flag", hub_token=token,
        )  # fmt: skip
        trainer = LoRAFATrainer(
            model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
        )
        trainer.train()
        trainer.push_to_hub()
        repo = hub.state.repos["user/flag"]
        served = repo["commits"][repo["branches"]["main"]]
    assert {"adapter_model.safetensors", "README.md", "hf_lorafa.json"} <= set(served)
    assert not any(name.endswith((".bin", ".pt", ".pth")) for name in served)
    for folder in (Path(args.output_dir), *Path(args.output_dir).glob("checkpoint-*")):
        assert not (folder / "training_args.bin").exists()
    assert all(b"SECRET" not in content for content in served.values())


def tiny_trainer(output_dir: Path, max_steps: int = 4, **overrides) -> LoRAFATrainer:
    ids = torch.randint(0, 256, (16, 12), generator=torch.Generator().manual_seed(0)).tolist()
    values = dict(
        output_dir=str(output_dir), max_steps=max_steps, save_steps=2, per_device_train_batch_size=4,
        logging_steps=1, report_to="none", lora_r=4, use_cpu=True, disable_tqdm=True, activation_savers=False,
    )  # fmt: skip
    args = LoRAFATrainingArguments(**{**values, **overrides})
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    return LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=data)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run with checkpoint-2 and checkpoint-4 (optimizer, scheduler, RNG and trainer state in each)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    tiny_trainer(out).train()
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    return out


CHECKPOINT_FILES = ["optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", TRAINING_STATE_FILE]


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
@pytest.mark.parametrize("how", ["truncated", "emptied"])
def test_a_damaged_checkpoint_file_is_one_error_naming_it_and_the_previous_checkpoint(
    name, how, finished_run, tmp_path
):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    damaged = out / "checkpoint-4" / name
    data = damaged.read_bytes()
    damaged.write_bytes(data[: len(data) // 2] if how == "truncated" else b"")
    for resume in (True, "last", str(out / "checkpoint-4")):
        with pytest.raises(ValueError) as info:
            tiny_trainer(out, max_steps=6).train(resume_from_checkpoint=resume)
        message = str(info.value)
        assert f"{damaged}' is truncated or corrupt" in message, message
        assert f"resume from the previous complete checkpoint '{out / 'checkpoint-2'}' instead" in message, message
    resumed = tiny_trainer(out, max_steps=6)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-2"))  # the named way out works
    assert resumed.state.global_step == 6


def test_cli_resume_true_and_last_pick_the_newest_complete_checkpoint(tiny, tmp_path, capsys):
    from hf_lorafa.cli import main

    out = tmp_path / "run"
    argv = flags(tiny, out)
    argv[argv.index("--max_steps") + 1] = "4"
    assert main(["train", *argv]) == 0
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"PK\x03\x04 cut short")
    capsys.readouterr()
    assert main(["train", *argv, "--resume_from_checkpoint", "last"]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("hf-lorafa train: error: `resume_from_checkpoint`:") and "Traceback" not in err
    assert f"{out / 'checkpoint-4' / 'optimizer.pt'}' is truncated or corrupt" in last, last
    assert f"previous complete checkpoint '{out / 'checkpoint-2'}'" in last, last
    shutil.rmtree(out / "checkpoint-4")
    # A marker in checkpoint-2's history shows the run continued from it rather than starting over.
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    state["log_history"].append({"step": 2, "resume_marker": 1})
    (out / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    argv[argv.index("--max_steps") + 1] = "6"
    assert main(["train", *argv, "--resume_from_checkpoint", "True"]) == 0
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert {"step": 2, "resume_marker": 1} in history


@pytest.mark.parametrize("entry", ["scripts/finetune.py", "cli"])
def test_sigterm_saves_a_checkpoint_and_resuming_gives_the_uninterrupted_adapter(entry, tiny, tmp_path):
    """A real SIGTERM at step 2 of 6, long before the first `save_steps` checkpoint: checkpoint-2 is written, the
    process exits 143 without a traceback, and resuming from it ends with exactly the uninterrupted adapter."""
    out = tmp_path / "run"
    argv = flags(tiny, out)
    argv[argv.index("--save_steps") + 1] = "100"
    target = ["scripts/finetune.py"] if entry != "cli" else ["-m", "hf_lorafa.cli", "train"]
    env = {**os.environ, "HF_LORAFA_PAUSE_AT_STEP": "2", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(
        [sys.executable, "tests/fixtures/pause_probe.py", *target, *argv], cwd=REPO, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output = []
    try:
        for line in process.stdout:
            output.append(line)
            if line.startswith("PAUSED step-2"):
                process.send_signal(signal.SIGTERM)
            if line.startswith("hf-lorafa: SIGTERM received"):
                process.stdin.write("\n")  # the handler ran: let step 2 end
                process.stdin.flush()
        process.wait(timeout=120)
    finally:
        process.kill()
        process.wait(timeout=60)
    text = "".join(output)
    assert process.returncode == 143, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert f"stopped by SIGTERM at step 2 of 6; saved {out / 'checkpoint-2'}" in text, text[-3000:]
    assert "--resume_from_checkpoint last" in text
    assert [c.name for c in complete_checkpoints(out)] == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()  # no top-level adapter that looks finished

    if entry == "cli":  # the job evaluates before training: compare with the same job run straight through
        from safetensors.torch import load_file

        from hf_lorafa.cli import main

        assert main(["train", *flags(tiny, out), "--resume_from_checkpoint", "last"]) == 0
        assert main(["train", *flags(tiny, tmp_path / "straight")]) == 0
        got, expected = (load_file(d / "adapter_model.safetensors") for d in (out, tmp_path / "straight"))
        assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    else:
        resumed = job_trainer(flags(tiny, out))
        resumed.train(resume_from_checkpoint="last")
        straight = job_trainer(flags(tiny, tmp_path / "straight"))
        straight.train()
        expected, got = adapter_tensors(straight.model), adapter_tensors(resumed.model)
        assert resumed.state.global_step == 6
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("when, saved", [
    ("on_step_end", ["checkpoint-1"]),  # mid-run: saved at the end of that step
    ("on_train_end", ["checkpoint-2", "checkpoint-3"]),  # after the last step, which had no checkpoint yet
])  # fmt: skip
def test_sigterm_in_process_raises_training_preempted_and_restores_the_handler(when, saved, tmp_path):
    from hf_lorafa.training.preemption import TrainingPreempted

    class SendSigterm(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if when == "on_step_end" and state.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)

        def on_train_end(self, args, state, control, **kwargs):
            if when == "on_train_end":
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    trainer = tiny_trainer(tmp_path / "run", max_steps=3)
    trainer.add_callback(SendSigterm())
    with pytest.raises(TrainingPreempted) as info:
        trainer.train()
    assert info.value.code == 143
    assert [c.name for c in complete_checkpoints(tmp_path / "run")] == saved
    assert signal.getsignal(signal.SIGTERM) is before


def test_hub_500_during_checkpoint_pushes_warns_training_goes_on_and_the_final_push_reports(
    tmp_path, monkeypatch, caplog
):
    import huggingface_hub.constants

    from hf_lorafa.hub.push import HubUploadError

    class FlakyHub(TrainerCallback):
        """The Hub answers 500 to the commits of step 1's save; it recovers before step 2's."""

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 1:
                assert not (Path(args.output_dir) / "adapter_model.safetensors").exists()
                hub.state.fail = None

    with HubServer() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        trainer = tiny_trainer(
            tmp_path / "out", max_steps=3, save_steps=1, push_to_hub=True, hub_model_id="user/flaky",
            hub_token="hf_testSECRETd8Kq2LmZ7xVbN4wRy6TfPj3s",
        )  # fmt: skip
        trainer.add_callback(FlakyHub())
        hub.state.fail = (500, "/commit/")
        with caplog.at_level("WARNING", logger="hf_lorafa.hub.push"):
            trainer.train()
        assert trainer.state.global_step == 3  # the run went on
        warnings = [r.getMessage() for r in caplog.records if r.name == "hf_lorafa.hub.push"]
        assert len(warnings) == 1 and "HTTP 500" in warnings[0], warnings
        assert "Training goes on; the next checkpoint save pushes again" in warnings[0]
        repo = hub.state.repos["user/flaky"]
        served = repo["commits"][repo["branches"]["main"]]
        latest = Path(trainer.args.output_dir) / "checkpoint-3" / "adapter_model.safetensors"
        assert served["adapter_model.safetensors"] == latest.read_bytes()  # the retry pushed the newest adapter
        hub.state.fail = (500, "/commit/")
        with pytest.raises(
            HubUploadError,
            match=r"failed while uploading the files: the Hub answered with a server "
            r"error \(HTTP 500\)",
        ):
            trainer.push_to_hub()
        assert all("SECRET" not in w for w in warnings)


@pytest.mark.parametrize(
    "changed, named",
    [
        (dict(lora_r=8), ["`lora_r` 4 in the checkpoint, 8 in this run"]),
        (dict(adapter_method="lora"), ["`adapter_method` 'lorafa' in the checkpoint, 'lora' in this run"]),
        (dict(lorafa_lr_ratio=2.0), ["`lorafa_lr_ratio` 4.0 in the checkpoint, 2.0 in this run"]),
        (dict(adapter_method="lamda", lora_r=2), ["`adapter_method` 'lorafa'", "`lora_r` 4 in the checkpoint, 2"]),
    ],
    ids=["rank", "method", "param-groups", "two-options"],
)
def test_resuming_with_other_adapter_options_names_each_one_before_loading(changed, named, finished_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    before = snapshot(out / "checkpoint-4")
    trainer = tiny_trainer(out, max_steps=6, **changed)
    with pytest.raises(ValueError) as info:
        trainer.train(resume_from_checkpoint=True)
    message = str(info.value)
    assert message.startswith(f"`resume_from_checkpoint`='{out / 'checkpoint-4'}' holds an adapter trained with")
    assert all(needle in message for needle in named), message
    assert message.count(" in the checkpoint, ") == len(changed), message  # the options that differ, no others
    assert "start a new run (another `output_dir`, or no `resume_from_checkpoint`)" in message
    assert trainer.state.global_step == 0 and snapshot(out / "checkpoint-4") == before


@pytest.mark.parametrize("where", ["a file in its place", "a file in its parent's place", "a sysfs folder"])
def test_an_output_dir_that_cannot_be_written_fails_before_the_first_step(where, tmp_path):
    """Places even root cannot write (tests run as root, whom a chmod does not stop): a file where the folder or a
    folder above it should be, and an existing folder of sysfs, which refuses new files (as a read-only one would:
    today's Trainer creates nothing there until the first checkpoint, after the steps)."""
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder")
    out = {"a file in its place": blocker, "a file in its parent's place": blocker / "run"}.get(where, Path("/sys"))
    if where == "a sysfs folder" and not (out.is_dir() and sys.platform == "linux"):
        pytest.skip("sysfs is Linux's")
    with pytest.raises(ValueError) as info:
        tiny_trainer(out)
    assert str(info.value).startswith(f"`output_dir`={str(out)!r} cannot be written ("), info.value
    assert "Choose a writable folder or fix its permissions" in str(info.value)
    assert blocker.read_text() == "a file, not a folder"


# -- writing files loses nothing (issue 35, class 1) ---------------------------------------------------------------
SAVE_R16_UNDER_A_FILE_SIZE_LIMIT = """
import resource, signal, sys
sys.path.insert(0, {tests!r})
from conftest import tiny_llama
from hf_lorafa import LoRAFAConfig, inject_adapters, save_adapter
# Ignored (Python's default), the write fails with EFBIG as on a full disk; default, the kernel kills the process.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN if {ignore!r} else signal.SIG_DFL)
model = inject_adapters(tiny_llama(), LoRAFAConfig(r=16, target_modules=["q_proj", "v_proj"]))
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))  # the config fits, the weights do not
try:
    save_adapter(model, {folder!r})
except OSError as err:
    print(err, file=sys.stderr)
    sys.exit(1)
"""


@pytest.mark.parametrize("case", ["write fails (disk full)", "killed mid-write"])
def test_an_interrupted_save_leaves_the_earlier_adapter_whole(case, tmp_path):
    from hf_lorafa import LoRAFAConfig, inject_adapters, load_adapter, save_adapter

    folder = tmp_path / "adapter"
    save_adapter(inject_adapters(tiny_llama(), LoRAFAConfig(r=8, target_modules=["q_proj", "v_proj"])), folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    script = SAVE_R16_UNDER_A_FILE_SIZE_LIMIT.format(
        tests=str(REPO / "tests"), ignore=case.startswith("write"), folder=str(folder)
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    if case.startswith("write"):
        assert result.returncode == 1, result.stderr[-2000:]
        assert f"Saving to {str(folder)!r} failed" in result.stderr and "nothing in it was replaced" in result.stderr
    else:
        assert result.returncode == -signal.SIGXFSZ, result.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in folder.iterdir() if not p.name.startswith(".")} == before
    model = load_adapter(tiny_llama(), folder)  # still loads, as the r=8 adapter it was
    assert model.hf_lorafa_config.r == 8


@pytest.mark.parametrize("name", ["hf_lorafa.json", "adapter_config.json", "memory.json"])
def test_saving_replaces_a_link_and_never_writes_through_it(name, tmp_path):
    from hf_lorafa import LoRAFAConfig, inject_adapters, save_adapter
    from hf_lorafa.training.memory_logging import MemoryTracker

    outside = tmp_path / "someone-elses.json"
    outside.write_text('{"mine": true}')
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / name).symlink_to(outside)
    model = inject_adapters(tiny_llama(), LoRAFAConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, folder)
    MemoryTracker(model).write(folder)
    assert outside.read_text() == '{"mine": true}'
    assert not (folder / name).is_symlink() and json.loads((folder / name).read_text())


def test_a_readme_that_is_not_our_card_is_kept(tmp_path, caplog):
    from hf_lorafa import LoRAFAConfig, inject_adapters, save_adapter
    from hf_lorafa.hub.card import write_model_card

    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "README.md").write_text("# My project\n\nHand-written.\n")
    save_adapter(inject_adapters(tiny_llama(), LoRAFAConfig(r=4, target_modules=["q_proj"])), folder)
    assert write_model_card(folder) is None and write_model_card(folder) is None
    assert (folder / "README.md").read_text() == "# My project\n\nHand-written.\n"
    assert caplog.text.count("is not a card hf-lorafa wrote") == 1  # said once
    ours = tmp_path / "adapter"
    save_adapter(inject_adapters(tiny_llama(), LoRAFAConfig(r=4, target_modules=["q_proj"])), ours)
    first = write_model_card(ours).read_text()
    assert write_model_card(ours, extra={"repo_id": "me/x"}).read_text() != first  # our own card is refreshed


def base_model_folder(path: Path) -> dict[str, bytes]:
    tiny_llama().save_pretrained(path)
    return {p.name: p.read_bytes() for p in path.iterdir()}


def test_an_adapter_is_never_written_into_a_base_model_folder(tmp_path):
    from hf_lorafa import LoRAFAConfig, inject_adapters, save_adapter

    base = tmp_path / "base"
    before = base_model_folder(base)
    with pytest.raises(ValueError, match="holds a model"):
        save_adapter(inject_adapters(tiny_llama(), LoRAFAConfig(r=4, target_modules=["q_proj"])), base)
    ids = torch.randint(0, 256, (8, 12), generator=torch.Generator().manual_seed(0)).tolist()
    args = LoRAFATrainingArguments(
        output_dir=str(base), max_steps=1, per_device_train_batch_size=8, report_to="none", use_cpu=True, lora_r=4
    )
    trainer = LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"input_ids": ids}))
    with pytest.raises(ValueError, match="`output_dir`.*holds a model"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_merge_never_replaces_the_base_models_own_folder(tmp_path, capsys):
    from hf_lorafa import LoRAFAConfig, inject_adapters, save_adapter
    from hf_lorafa.cli import main

    base = tmp_path / "base"
    before = base_model_folder(base)
    adapter = tmp_path / "adapter"
    save_adapter(inject_adapters(tiny_llama(), LoRAFAConfig(r=4, target_modules=["q_proj"])), adapter)
    for extra in ([], ["--overwrite"]):
        assert main(["merge", str(adapter), str(base), "--base-model", str(base), *extra]) == 1
        assert "base model's own folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


HOLD_OUTPUT_DIR = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
from datasets import Dataset
from transformers import TrainerCallback
from conftest import tiny_llama
from hf_lorafa import LoRAFATrainer, LoRAFATrainingArguments

class Hold(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        Path({ready!r}).write_text("training")
        time.sleep(120)

ids = torch.randint(0, 256, (8, 12)).tolist()
args = LoRAFATrainingArguments(output_dir={out!r}, max_steps=1, per_device_train_batch_size=8, report_to="none",
                               use_cpu=True, lora_r=4, save_strategy="no", log_memory=False)
LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({{"input_ids": ids, "labels": ids}}),
              callbacks=[Hold()]).train()
"""


def test_a_second_live_run_on_one_output_dir_is_refused(tmp_path):
    import time

    out, ready = tmp_path / "out", tmp_path / "ready"
    script = HOLD_OUTPUT_DIR.format(tests=str(REPO / "tests"), ready=str(ready), out=str(out))
    first = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), first.stderr.read()[-2000:] if first.poll() is not None else "first run never started"
        ids = torch.randint(0, 256, (8, 12)).tolist()
        args = LoRAFATrainingArguments(
            output_dir=str(out), max_steps=1, per_device_train_batch_size=8, report_to="none", use_cpu=True, lora_r=4
        )
        second = LoRAFATrainer(
            model=tiny_llama(), args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids})
        )
        with pytest.raises(
            RuntimeError, match=f"{re.escape(repr(str(out)))} is in use by another training run \\(pid {first.pid}\\)"
        ):
            second.train()
        assert second.state.global_step == 0
    finally:
        first.kill()
        first.wait()
    assert (out / ".hf-lorafa.lock").exists()  # killed: its lock file stays behind, but no process holds it
    second.train()  # so the lock is free again
    assert second.state.global_step == 1
    assert not (out / ".hf-lorafa.lock").exists()  # a run that ends removes its lock: the folder holds what it saved
