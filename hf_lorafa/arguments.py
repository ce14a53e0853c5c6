"""`LoRAFATrainingArguments`: `TrainingArguments` plus the adapter, quantization and memory fields.

The fields live in `LoRAFAArguments`, a dataclass mixin, so any `TrainingArguments` subclass gets them by one more
base: `LoRAFATrainingArguments(LoRAFAArguments, TrainingArguments)` here, `LoRAFASFTConfig(LoRAFAArguments,
SFTConfig)` in `hf_lorafa.trl`.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments

from .config import METHODS, LoRAFAConfig

logger = logging.getLogger(__name__)


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


ADAPTER_METHODS = "{" + ",".join(METHODS) + "}"


def _config_help(name: str) -> str:
    """The first sentence LoRAFAConfig's docstring gives field `name`, on one line (`%` escaped for argparse)."""
    entry = re.search(rf"^ {{8}}{re.escape(name)} \(.*?\):\n((?: {{12}}.*\n)+)", LoRAFAConfig.__doc__ or "", re.M)
    if entry is None:
        raise AssertionError(f"LoRAFAConfig's docstring does not describe `{name}`")
    text = " ".join(line.strip() for line in entry.group(1).splitlines())
    return re.split(r"(?<=[.)])\s(?=[A-Z`])", text, maxsplit=1)[0].replace("%", "%%")


def adapter_field(name: str, *, help_suffix: str = "", **metadata: str) -> Any:
    """A training-argument field whose default and help are those of `LoRAFAConfig.<name>`."""
    default = LoRAFAConfig.__dataclass_fields__[name].default
    return field(default=default, metadata={"help": _config_help(name) + help_suffix, **metadata})


@dataclass
class LoRAFAArguments:
    r"""
    hf-lorafa's fields for any [`~transformers.TrainingArguments`] subclass (listed before it among the bases).

    Adapter fields (`adapter_method`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`,
    `lora_modules_to_save`, `lorafa_gradient_correction`, `lorafa_lr_ratio`, `lamda_freeze_fraction`,
    `lamda_freeze_order`, `lamda_init`, `lamda_lr_ratio`, `lamda_s_lr_ratio`, `frozen_a_init`,
    `lamda_rank_budget`) map onto [`LoRAFAConfig`]; see its docstring for their meaning. `hub_base_model_id` names the
    base model on the Hub when it was loaded from a local folder.
    """

    # Adapter: defaults and help come from LoRAFAConfig (one source); the CLI takes lists comma-separated.
    adapter_method: str = adapter_field("method", metavar=ADAPTER_METHODS)
    lora_r: int = adapter_field("r")
    lora_alpha: float = adapter_field("alpha")
    lora_dropout: float = adapter_field("dropout")
    lora_target_modules: str = adapter_field("target_modules", help_suffix=" Names comma-separated: q_proj,v_proj.")
    lora_modules_to_save: str | None = adapter_field("modules_to_save", help_suffix=" Comma-separated.")
    lorafa_gradient_correction: bool = adapter_field("lorafa_gradient_correction")
    lorafa_lr_ratio: float = adapter_field("lorafa_lr_ratio")
    lamda_freeze_fraction: float = adapter_field("lamda_freeze_fraction")
    lamda_freeze_order: str = adapter_field("lamda_freeze_order", metavar="{ascending,all}")
    lamda_init: str = adapter_field("lamda_init", metavar="{residual,svd,published,identity,spectral}")
    lamda_lr_ratio: float = adapter_field("lamda_lr_ratio")
    lamda_s_lr_ratio: float = adapter_field("lamda_s_lr_ratio")
    frozen_a_init: str = adapter_field("frozen_a_init", metavar="{random,gradient,activations}")
    lamda_rank_budget: int | None = adapter_field("lamda_rank_budget")

    # Quantization of the base model (bitsandbytes)
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantize the base model to 4 bits (QLoRA-FA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Quantize the base model to 8 bits."})
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 or fp4.", "metavar": "{nf4,fp4}"}
    )

    # Memory
    log_memory: bool = field(
        default=True,
        metadata={"help": "Log peak memory since the last log, sampled activation bytes and trainable parameters."},
    )
    activation_savers: bool = field(
        default=True,
        metadata={"help": "Chunked LM-head loss and cheap recomputation in the frozen path (Llama-family models)."},
    )

    # Hub
    hub_base_model_id: str | None = field(
        default=None,
        metadata={
            "help": "Hub id of the base model, for the card and adapter_config.json when it was loaded from a "
            "local folder (default: the model's name_or_path when that is a Hub id)."
        },
    )

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("`load_in_4bit` and `load_in_8bit` are both set; choose one of the two.")
        if self.fp16 and (self.use_cpu or not _has_accelerator()):
            # transformers would train in fp32 without a word; say so, with the precision CPUs do support.
            raise ValueError("`fp16`=True needs a CUDA/XPU GPU; on CPU use `bf16=True` (bf16 autocast) instead.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"`bnb_4bit_quant_type` must be 'nf4' or 'fp4'; got {self.bnb_4bit_quant_type!r}.")
        try:
            self.to_lorafa_config()
        except (ValueError, TypeError) as err:
            # Name the command-line flag: `method` → `adapter_method`, `r` → `lora_r`, ...
            message = str(err)
            for ours, theirs in (
                ("`method`", "`adapter_method`"),
                ("`r`", "`lora_r`"),
                ("`alpha`", "`lora_alpha`"),
                ("`dropout`", "`lora_dropout`"),
                ("`target_modules`", "`lora_target_modules`"),
            ):
                message = message.replace(ours, theirs)
            raise type(err)(message) from None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not self.use_cpu and not _has_accelerator():
            # torchrun / `accelerate launch --multi_gpu` on a machine without GPUs: without `use_cpu` every process
            # would train alone and write the same output_dir. With it, accelerate joins them over gloo.
            logger.warning("WORLD_SIZE>1 and no GPU: training on CPU over gloo (use_cpu=True).")
            self.use_cpu = True
        accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6; torch's own test before pinning
        if not (accelerator.is_available() if accelerator else torch.cuda.is_available()):
            # Pinned memory only speeds copies to an accelerator: without one torch ignores it, with a warning.
            self.dataloader_pin_memory = False
        super().__post_init__()  # the TrainingArguments subclass this mixin is combined with

    def to_lorafa_config(self) -> LoRAFAConfig:
        """The [`LoRAFAConfig`] these arguments describe."""
        targets = self.lora_target_modules
        if targets != "all-linear" and "," in targets:
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        elif targets != "all-linear" and targets.replace("_", "").isalnum():
            targets = [targets]
        to_save = [m.strip() for m in self.lora_modules_to_save.split(",")] if self.lora_modules_to_save else None
        return LoRAFAConfig(
            method=self.adapter_method,
            r=self.lora_r,
            alpha=self.lora_alpha,
            dropout=self.lora_dropout,
            target_modules=targets,
            modules_to_save=to_save,
            lorafa_gradient_correction=self.lorafa_gradient_correction,
            lorafa_lr_ratio=self.lorafa_lr_ratio,
            lamda_freeze_fraction=self.lamda_freeze_fraction,
            lamda_freeze_order=self.lamda_freeze_order,
            lamda_init=self.lamda_init,
            lamda_lr_ratio=self.lamda_lr_ratio,
            lamda_s_lr_ratio=self.lamda_s_lr_ratio,
            frozen_a_init=self.frozen_a_init,
            lamda_rank_budget=self.lamda_rank_budget,
            init_seed=self.seed,
        )


@dataclass
class LoRAFATrainingArguments(LoRAFAArguments, TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] with hf-lorafa's fields ([`LoRAFAArguments`]). Every field parses from the
    command line (`--lora_r 8`) and from JSON/YAML files through [`~transformers.HfArgumentParser`].

    Example:

    ```python
    >>> from hf_lorafa import LoRAFATrainingArguments
    >>> args = LoRAFATrainingArguments(output_dir="out", adapter_method="lamda", lora_r=8)
    >>> args.to_lorafa_config().method
    'lamda'
    ```
    """
