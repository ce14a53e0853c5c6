"""Installed as users install it: a built wheel, outside the checkout, trains and saves an adapter with its card."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_llama
from transformers import AutoTokenizer

from hf_lorafa.data.offline import smollm2_path

REPO = Path(__file__).resolve().parent.parent
# What the wheel is built from: pyproject.toml's inputs, so a file the build forgets cannot hide in the checkout, plus
# the lab and the scripts, which must stay out of it.
SOURCES = ("pyproject.toml", "README.md", "hf_lorafa", "model_cards", "research", "scripts")


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory) -> Path:
    """The package built as a wheel and installed with pip into a folder of its own (dependencies from this venv)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    (wheel,) = (root / "dist").glob("hf_lorafa-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(root / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    return root / "site"


def run_installed(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}  # before site-packages, so the checkout's editable copy is unseen
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_wheel_ships_the_card_template(installed_wheel, tmp_path):
    probe = "import hf_lorafa, hf_lorafa.hub.card as c; print(hf_lorafa.__file__); print(c.template_path())"
    result = run_installed(installed_wheel, tmp_path, "-c", probe)
    assert result.returncode == 0, result.stderr[-2000:]
    package, template = result.stdout.split()
    assert Path(package).is_relative_to(installed_wheel), package
    assert Path(template).is_relative_to(installed_wheel) and Path(template).name == "adapter_card.md"


def test_wheel_ships_every_room_and_public_name_and_no_experiment(installed_wheel, tmp_path):
    shipped = {p.name for p in installed_wheel.iterdir()}
    assert not shipped & {"research", "scripts", "benchmarks", "tests"}, shipped
    rooms = sorted(p.parent.name for p in (REPO / "hf_lorafa").glob("*/__init__.py"))
    assert rooms and all((installed_wheel / "hf_lorafa" / room / "__init__.py").exists() for room in rooms)
    probe = (
        "import hf_lorafa, hf_lorafa.trl, hf_lorafa.cli; "
        "print(all(getattr(hf_lorafa, n) is not None for n in hf_lorafa.__all__), hf_lorafa.trl.LoRAFASFTTrainer)"
    )
    result = run_installed(installed_wheel, tmp_path, "-c", probe)
    assert result.returncode == 0 and result.stdout.startswith("True"), result.stderr[-2000:]
    for command in ("train", "merge", "push", "estimate", "bench", "demo"):
        result = run_installed(installed_wheel, tmp_path, "-m", "hf_lorafa.cli", command, "--help")
        assert result.returncode == 0 and "usage: hf-lorafa" in result.stdout, (command, result.stderr[-2000:])


def test_wheel_install_trains_and_saves(installed_wheel, tmp_path):
    base = tmp_path / "base"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    tiny_llama(vocab=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    rows = [{"question": f"What is {i} plus {i}?", "answer": f"{i} plus {i} is {2 * i}."} for i in range(24)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    result = run_installed(
        installed_wheel, tmp_path, "-m", "hf_lorafa.cli", "train", "--model_name_or_path", str(base),
        "--dataset", str(data), "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1",
        "--per_device_train_batch_size", "4", "--lora_r", "4", "--max_eval_samples", "4", "--use_cpu", "true",
        "--frozen_a_init", "gradient",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    card = (out / "README.md").read_text()
    assert "LoRA-FA" in card and "for a local base model" in card and str(tmp_path) not in card
    assert "| Frozen A from | gradient |" in card  # calibration.py ships, and the CLI takes the option
    for folder in (out, out / "checkpoint-2"):
        assert {"adapter_config.json", "adapter_model.safetensors", "hf_lorafa.json", "README.md"} <= {
            p.name for p in folder.iterdir()
        }, folder
