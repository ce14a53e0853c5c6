"""Which checkpoint to resume from, and whether its files can be read, decided before `Trainer` touches them.

`Trainer` would load a truncated `optimizer.pt` or `trainer_state.json` half-way into resuming and stop with a
`PytorchStreamReader`/`JSONDecodeError` traceback. Here every state file of the chosen checkpoint is read first, with
the loader transformers itself uses (`torch.load(weights_only=True)`, json, safetensors), and a damaged one is one
`ValueError` naming the file and the newest earlier checkpoint that reads cleanly.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..adapter_io.peft_format import read_adapter_facts
from ..tuners.config import INIT_ONLY, OPTIONS, LoRAFAConfig, argument_name

# `--resume_from_checkpoint` arrives as text from the command line; these mean "the newest complete checkpoint".
NEWEST = ("true", "last")
TORCH_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth")
# hf-lorafa's own state in a checkpoint (LaMDA's frozen columns, the adapters' RNG), written after Trainer's.
TRAINING_STATE_FILE = "hf_lorafa_state.safetensors"


def complete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """`checkpoint-N` folders whose save finished (trainer state written last), oldest first."""
    found = []
    for folder in Path(output_dir).glob("checkpoint-*"):
        step = folder.name.rsplit("-", 1)[-1]
        if step.isdigit() and (folder / "trainer_state.json").exists() and (folder / TRAINING_STATE_FILE).exists():
            found.append((int(step), folder))
    return [folder for _, folder in sorted(found)]


def damaged_file(folder: Path) -> tuple[str, str] | None:
    """`(file name, what is wrong)` for the first state file of `folder` that does not load, else `None`."""
    import torch
    from safetensors.torch import load_file
    from transformers.trainer_pt_utils import safe_globals  # the numpy types transformers allows in rng_state.pth

    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
            return "trainer_state.json", "it holds no trainer state (no integer 'global_step')"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return "trainer_state.json", f"{type(err).__name__}: {err}"
    try:
        load_file(folder / TRAINING_STATE_FILE)
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...: every failure is "cannot be read"
        return TRAINING_STATE_FILE, f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    for pattern in TORCH_FILES:
        for path in sorted(folder.glob(pattern)):
            try:
                with safe_globals():
                    torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, ...
                detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"
                return path.name, f"{type(err).__name__}: {detail}"
    return None


def check_checkpoint(folder: Path) -> None:
    """Raise one `ValueError` naming the damaged file of `folder` and the checkpoint to resume from instead."""
    problem = damaged_file(folder)
    if problem is None:
        return
    earlier = [c for c in complete_checkpoints(folder.parent) if _step(c) < _step(folder)]
    previous = next((c for c in reversed(earlier) if damaged_file(c) is None), None)
    instead = (
        f"resume from the previous complete checkpoint {str(previous)!r} instead (--resume_from_checkpoint "
        f"{previous}), or delete {folder.name}"
        if previous is not None
        else "there is no earlier complete checkpoint: train from scratch (drop --resume_from_checkpoint)"
    )
    raise ValueError(
        f"`resume_from_checkpoint`: {str(folder / problem[0])!r} is truncated or corrupt ({problem[1]}); {instead}."
    )


def check_same_adapter(folder: Path, config: LoRAFAConfig) -> None:
    """Raise one `ValueError` naming every adapter option of this run that differs from checkpoint `folder`'s.

    Another rank, method, target set or learning-rate multiple changes the adapter's tensors or the optimizer's
    parameter groups, which `Trainer` would otherwise meet as torch's size-mismatch dump or "a different number of
    parameter groups". Options that only set initial values (and LaMDA++'s ranks, which follow from the others) are
    not compared: resuming loads the saved tensors.
    """
    saved = read_adapter_facts(folder).get("config") or {}
    ours = config.to_dict()
    compared = [name for name in OPTIONS if name not in (*INIT_ONLY, "rank_pattern") and name in saved]
    differ = [f"`{argument_name(n)}` {saved[n]!r} in the checkpoint, {ours[n]!r} in this run" for n in compared
              if saved[n] != ours[n]]  # fmt: skip
    if differ:
        raise ValueError(
            f"`resume_from_checkpoint`={str(folder)!r} holds an adapter trained with other options: "
            f"{'; '.join(differ)}. Resume with the checkpoint's options, or start a new run (another `output_dir`, "
            "or no `resume_from_checkpoint`)."
        )


def check_writable(output_dir: str | os.PathLike) -> None:
    """Raise one `ValueError` unless `output_dir` can be created and written (checked before any training step)."""
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".hf-lorafa-write-check-"):
            pass
    except OSError as err:
        raise ValueError(
            f"`output_dir`={str(folder)!r} cannot be written ({type(err).__name__}: {err.strerror or err}); "
            "checkpoints and the adapter are saved there. Choose a writable folder or fix its permissions."
        ) from None


def _step(folder: Path) -> int:
    step = folder.name.rsplit("-", 1)[-1]
    return int(step) if step.isdigit() else -1


def resolve_resume(value: str | bool | None, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder `Trainer.train(resume_from_checkpoint=value)` should load, checked; `None`: start over.

    `True`, `"true"` and `"last"` (any case, as the command line passes them) pick the newest complete
    `checkpoint-N` of `output_dir`; `"false"` means none; a path must be a complete checkpoint.
    """
    if isinstance(value, str) and not Path(value).is_dir():
        lowered = value.strip().lower()
        value = True if lowered in NEWEST else None if lowered in ("false", "none", "") else value
    if value is None or value is False:
        return None
    if value is True:
        complete = complete_checkpoints(output_dir)
        if not complete:
            raise ValueError(
                f"`resume_from_checkpoint`=True but {str(output_dir)!r} has no complete checkpoint-N folder; "
                "train from scratch (drop the flag) or point it at a checkpoint folder."
            )
        folder = complete[-1]
    else:
        folder = Path(value)
        good = complete_checkpoints(folder.parent)
        if folder not in good:
            raise ValueError(
                f"`resume_from_checkpoint`={str(value)!r} is not a complete checkpoint (missing, or its save was "
                f"interrupted); resume from {str(good[-1]) if good else 'a complete checkpoint-N'}."
            )
    check_checkpoint(folder)
    return str(folder)
