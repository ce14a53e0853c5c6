"""`hf-lorafa`: train | merge | push | estimate | bench | demo."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

USAGE = """usage: hf-lorafa COMMAND [ARGS]

commands:
  train      fine-tune with LoRA-FA / LaMDA (every LoRAFATrainingArguments field as --flag; no flags: the default)
  merge      ADAPTER_DIR OUT_DIR: fold an adapter into its base and save a plain model
  push       ADAPTER_DIR REPO_ID: upload an adapter folder with its model card to the Hub
  estimate   predict training memory per method before training
  bench      run the memory/speed benchmark
  demo       serve base + adapters in a Gradio app
"""


# PEFT task_type -> load_base_model task
MERGE_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_2_SEQ_LM": "seq2seq-lm", "SEQ_CLS": "classification"}


def check_merge_target(target: Path, adapter_dir: Path, overwrite: bool, base: str) -> None:
    """Refuse an output folder whose replacement could destroy files the user did not ask to replace.

    The base model's own folder is refused even with `--overwrite`: its weights are what the merge reads, and the
    adapter would no longer apply to the folder its config names.
    """
    if Path(base).is_dir() and Path(base).resolve() == target:
        raise ValueError(
            f"`OUT_DIR` {str(target)!r} is the base model's own folder; the merge would replace the weights it was "
            f"made from (--overwrite does not cover that). Pass a new folder, e.g. {str(target) + '-merged'!r}."
        )
    adapter = adapter_dir.resolve()
    if target == adapter or target in adapter.parents:
        raise ValueError(
            f"`OUT_DIR` {str(target)!r} is or contains the adapter folder {str(adapter)!r}; writing the merged model "
            "there would mix it with (or replace) the adapter. Pass a new folder, e.g. "
            f"{str(target / 'merged') if target != adapter else str(adapter) + '-merged'!r}."
        )
    if target.exists() and not target.is_dir():
        raise ValueError(f"`OUT_DIR` {str(target)!r} is a file; pass a folder for the merged model.")
    entries = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if entries and not overwrite:
        listed = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"`OUT_DIR` {str(target)!r} is not empty (it holds {listed}); pass an empty or new folder, or add "
            "--overwrite to replace the merged model's files in it (other files there are kept)."
        )


def install_merged(staging: Path, target: Path) -> None:
    """Move a finished merge into `target`: a rename when it is new or empty, else file by file (`--overwrite`).

    Only the merged model's own files are replaced; weight shards of an earlier merge that the new one does not
    rewrite go too, since transformers would otherwise load a mix of the two. Nothing else in `target` is touched.
    """
    if not target.exists() or not any(target.iterdir()):
        os.replace(staging, target)  # an empty folder is replaced in one atomic rename
        return
    written = {p.name for p in staging.iterdir()}
    for stale in target.glob("model*.safetensors*"):
        if stale.name not in written and stale.is_file():
            stale.unlink()
    for name in sorted(written):
        os.replace(staging / name, target / name)


def merge_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="hf-lorafa merge", description="Fold an adapter into its base model.")
    parser.add_argument("adapter", help="adapter folder or Hub id")
    parser.add_argument("output_dir", help="where to save the merged model (a new or empty folder)")
    parser.add_argument("--base-model", help="base model id/folder (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--revision", help="Hub revision of the adapter")
    parser.add_argument("--load-in-4bit", action="store_true", help="load the base in 4-bit (merge dequantizes)")
    parser.add_argument("--load-in-8bit", action="store_true", help="load the base in 8-bit (merge dequantizes)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the merged model's files in a non-empty OUT_DIR"
    )
    args = parser.parse_args(argv)
    from transformers import AutoTokenizer

    from ..adapter_io.checks import read_lora_config
    from ..adapter_io.peft_format import (
        ADAPTER_CONFIG,
        classifier_outputs,
        load_adapter,
        read_adapter_facts,
        resolve_adapter_dir,
    )
    from ..data.base_model import load_base_model
    from ..data.offline import resolve_model
    from ..tuners.merge import merge_adapters

    adapter_dir = resolve_adapter_dir(args.adapter, args.revision)
    target = Path(args.output_dir).resolve()
    peft_config = read_lora_config(adapter_dir / ADAPTER_CONFIG)
    base = args.base_model or peft_config.base_model_name_or_path
    if not base:
        raise ValueError("the adapter does not name its base model; pass `--base-model` with its id or folder.")
    path = resolve_model(base)
    # Before the model loads: a wrong OUT_DIR fails in a second and never costs a user's files.
    check_merge_target(target, adapter_dir, args.overwrite, path)
    # Merge into the weights the adapter was trained on: a 4-bit-trained adapter folds into the dequantized base.
    trained = (read_adapter_facts(adapter_dir).get("quantization") or {}) if not args.base_model else {}
    args.load_in_4bit = args.load_in_4bit or bool(trained.get("load_in_4bit"))
    args.load_in_8bit = args.load_in_8bit or bool(trained.get("load_in_8bit"))
    # The base loads with the head the adapter was trained for (adapter_config.json's task_type): a classifier's
    # adapter on a causal LM would fail on its `score` weights, or fold into the wrong model.
    task_type = getattr(peft_config.task_type, "value", peft_config.task_type) or "CAUSAL_LM"
    task = MERGE_TASKS.get(task_type)
    if task is None:
        raise ValueError(
            f"the adapter's task_type is {peft_config.task_type!r}; merge loads {', '.join(MERGE_TASKS)} adapters. "
            "Merge it with PEFT: PeftModel.from_pretrained(base, dir).merge_and_unload()."
        )
    labels = {"num_labels": classifier_outputs(adapter_dir)} if task == "classification" else {}
    model = load_base_model(path, load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, task=task, **labels)
    merged = merge_adapters(load_adapter(model, adapter_dir))
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Written beside the target, then moved in: a failure half-way never leaves a folder that looks like a model.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        install_merged(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"merged model saved to {target}")


def push_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="hf-lorafa push", description="Upload an adapter folder to the Hub.")
    parser.add_argument("adapter_dir")
    parser.add_argument("repo_id")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to")
    args = parser.parse_args(argv)
    from ..hub.push import push_adapter

    url = push_adapter(args.adapter_dir, args.repo_id, token=args.token, private=args.private, revision=args.revision)
    print(f"pushed {args.adapter_dir} to {url}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            from .main_job import main as train_main

            train_main(rest)
        elif command == "merge":
            merge_main(rest)
        elif command == "push":
            push_main(rest)
        elif command == "demo":
            from .demo import main as demo_main

            return demo_main(rest) or 0
        elif command == "estimate":
            from .estimate import main as estimate_main

            return estimate_main(rest) or 0
        elif command == "bench":
            from .bench import main as bench_main

            return bench_main(rest) or 0
        else:
            # argparse's order: the usage, then the error as the last line, where the eye lands.
            print(
                f"{USAGE}\nhf-lorafa: error: unknown command {command!r}; choose one of the commands above.",
                file=sys.stderr,
            )
            return 2
    except (ValueError, TypeError, ImportError, OSError, RuntimeError) as err:
        print(f"hf-lorafa {command}: error: {err}", file=sys.stderr)
        return 1
    return 0
