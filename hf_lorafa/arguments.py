"""`LoRAFATrainingArguments`: `TrainingArguments` plus the adapter, quantization and memory fields.

The fields live in `LoRAFAArguments`, a dataclass mixin, so any `TrainingArguments` subclass gets them by one more
base: `LoRAFATrainingArguments(LoRAFAArguments, TrainingArguments)` here, `LoRAFASFTConfig(LoRAFAArguments,
SFTConfig)` in `hf_lorafa.trl`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .config import LoRAFAConfig

logger = logging.getLogger(__name__)


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


ADAPTER_METHODS = "{lora,lorafa,lamda,lamda++}"


@dataclass
class LoRAFAArguments:
    r"""
    hf-lorafa's fields for any [`~transformers.TrainingArguments`] subclass (listed before it among the bases).

    Adapter fields (`adapter_method`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`,
    `lora_modules_to_save`, `lorafa_gradient_correction`, `lorafa_lr_ratio`, `lamda_freeze_fraction`,
    `lamda_freeze_order`, `lamda_init`, `lamda_lr_ratio`, `lamda_rank_budget`) map onto [`LoRAFAConfig`]; see its
    docstring for their meaning. `hub_base_model_id` names the base model on the Hub when it was loaded from a local
    folder.
    """

    # Adapter
    adapter_method: str = field(
        default="lorafa",
        metadata={"help": "Adapter method: lora, lorafa, lamda or lamda++.", "metavar": ADAPTER_METHODS},
    )
    lora_r: int = field(default=16, metadata={"help": "Adapter rank (LaMDA++: the mean rank)."})
    lora_alpha: float = field(default=32, metadata={"help": "Adapter scaling numerator: output × alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={
            "help": "'all-linear' (every linear layer but the output head), comma-separated module names "
            "(q_proj,v_proj) or a regular expression over full module names."
        },
    )
    lora_modules_to_save: str | None = field(
        default=None,
        metadata={"help": "Comma-separated modules trained in full and saved with the adapter (e.g. classifier)."},
    )
    lorafa_gradient_correction: bool = field(
        default=True, metadata={"help": "LoRA-FA v2: precondition B's gradient by (A Aᵀ)⁻¹ / s²."}
    )
    lorafa_lr_ratio: float = field(
        default=LoRAFAConfig.lorafa_lr_ratio,
        metadata={"help": "Learning-rate multiplier of LoRA-FA's B (A is frozen, so B takes larger steps)."},
    )
    lamda_freeze_fraction: float = field(
        default=LoRAFAConfig.lamda_freeze_fraction,
        metadata={"help": "LaMDA: fraction of the training steps over which B (PMB) is frozen."},
    )
    lamda_freeze_order: str = field(
        default="ascending",
        metadata={
            "help": "LaMDA: 'ascending' (freeze B's columns from the smallest singular value) or 'all'.",
            "metavar": "{ascending,all}",
        },
    )
    lamda_init: str = field(
        default=LoRAFAConfig.lamda_init,
        metadata={
            "help": "LaMDA: 'residual' (SVD over the residual base), 'svd' (S = 0) or 'published' (random A).",
            "metavar": "{residual,svd,published}",
        },
    )
    lamda_lr_ratio: float = field(
        default=LoRAFAConfig.lamda_lr_ratio,
        metadata={"help": "Learning-rate multiplier of LaMDA's S and B."},
    )
    lamda_rank_budget: int | None = field(
        default=None, metadata={"help": "LaMDA++: total rank over all adapted layers (default r × layers)."}
    )

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
