"""`LoRAFATrainingArguments`: `TrainingArguments` plus the adapter, quantization and memory fields.

The fields live in `LoRAFAArguments`, a dataclass mixin, so any `TrainingArguments` subclass gets them by one more
base: `LoRAFATrainingArguments(LoRAFAArguments, TrainingArguments)` here, `LoRAFASFTConfig(LoRAFAArguments,
SFTConfig)` in `hf_lorafa.trl`. Its adapter fields are made from [`LoRAFAConfig`]'s declarations (name, default,
help, choices), so the two cannot disagree.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import TrainingArguments

from ..tuners.config import OPTIONS, TYPES, LoRAFAConfig, argument_name, as_names, choices, validate_options
from .block_recompute import BLOCK_CHOICES, blocks_to_replay

logger = logging.getLogger(__name__)

# Set from the training arguments' own fields, not flags of their own: A's seed is the run's `seed`.
NOT_ARGUMENTS = {"init_seed": "seed", "rank_pattern": None}
# Options that take a list of names: comma-separated on the command line.
LIST_OPTIONS = tuple(n for n in OPTIONS if any(typing.get_origin(t) is list for t in typing.get_args(TYPES[n])))


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _adapter_field(name: str) -> tuple[str, Any, Any]:
    """The training-argument field of adapter option `name`: its flag name, a type argparse parses, its default."""
    option = OPTIONS[name]
    kind = TYPES[name]
    help_text = option.metadata["help"].replace("%", "%%")
    if name in LIST_OPTIONS:  # a list from Python, YAML or JSON; comma-separated names from the command line
        kind = str | None if option.default is None else str
        help_text += " Comma-separated on the command line: q_proj,v_proj."
    elif values := choices(name):
        kind = Literal[values]  # HfArgumentParser turns a Literal into argparse choices
    return argument_name(name), kind, field(default=option.default, metadata={"help": help_text})


# LoRAFAConfig's options as training-argument fields (their names, defaults, help and choices come from there).
_AdapterArguments = dataclasses.make_dataclass(
    "_AdapterArguments", [_adapter_field(name) for name in OPTIONS if name not in NOT_ARGUMENTS]
)


@dataclass
class LoRAFAArguments(_AdapterArguments):
    r"""
    hf-lorafa's fields for any [`~transformers.TrainingArguments`] subclass (listed before it among the bases).

    The adapter fields are [`LoRAFAConfig`]'s options, under the names PEFT users know (`adapter_method`, `lora_r`,
    `lora_alpha`, `lora_dropout`, `lora_target_modules`, `lora_modules_to_save`; the others keep the option's name);
    A's seed is the run's `seed`. Then the quantization, memory and Hub fields below; `--help` describes each.
    """

    # Quantization of the base model (bitsandbytes)
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantize the base model to 4 bits (QLoRA-FA)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Quantize the base model to 8 bits."})
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = field(default="nf4", metadata={"help": "4-bit data type."})

    # Memory
    log_memory: bool = field(
        default=True,
        metadata={
            "help": "Log peak memory since the last log, the largest step's activation bytes since the last log and "
            "trainable parameters."
        },
    )
    activation_savers: bool = field(
        default=True,
        metadata={"help": "Chunked LM-head loss and cheap recomputation in the frozen path (Llama-family models)."},
    )
    trim_cpu_memory: bool = field(
        default=False,
        metadata={
            "help": "On CPU with glibc: hand the memory each step freed back to the OS after the step (malloc_trim), "
            "so the process's resident memory between steps is what training holds. The next step faults those "
            "pages in again. No effect on GPU memory."
        },
    )
    cpu_mmap_threshold: int | None = field(
        default=2**20,
        metadata={
            "help": "On CPU with glibc: blocks of at least this many bytes are mapped on their own and returned to "
            "the OS when freed (mallopt M_MMAP_THRESHOLD, set when the trainer is built; process-wide), so the "
            "peak follows the batch in hand instead of the largest batch so far. 0 or None keeps glibc's own "
            "threshold; MALLOC_MMAP_THRESHOLD_ in the environment takes precedence. No effect on GPU memory."
        },
    )
    block_recompute: str = field(
        default="all",
        metadata={
            "help": "With activation_savers: which blocks keep only their input, backward replaying them up to their "
            "output projection (exact; less memory, slower steps): 'all' (attention and MLP blocks; also true), "
            "'attention' (each attention block), 'mlp', or 'none'. Has no effect when gradient_checkpointing is on.",
            "choices": ["none", *BLOCK_CHOICES],
        },
    )
    remove_padding: bool = field(
        default=True,
        metadata={
            "help": "Train each right-padded causal-LM batch as one row of its tokens without the padding (position "
            "ids restart per sequence; transformers' packed-sequence attention), when a probe shows the model gives "
            "the same outputs that way and the row costs fewer operations than the padded batch. Evaluation batches "
            "stay padded. False keeps batches as the collator made them."
        },
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
        for flag in (
            "load_in_4bit",
            "load_in_8bit",
            "log_memory",
            "activation_savers",
            "remove_padding",
            "trim_cpu_memory",
        ):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"`{flag}` must be true or false (a bool); got {getattr(self, flag)!r}.")
        self.block_recompute = blocks_to_replay(self.block_recompute)
        if self.cpu_mmap_threshold is not None and not (
            isinstance(self.cpu_mmap_threshold, int) and 0 <= self.cpu_mmap_threshold <= 2**25
        ):
            raise ValueError(
                f"`cpu_mmap_threshold` must be a byte count from 0 to 33554432 (32 MiB, glibc's largest) or None; "
                f"got {self.cpu_mmap_threshold!r}."
            )
        if self.fp16 and (self.use_cpu or not _has_accelerator()):
            # transformers would train in fp32 without a word; say so, with the precision CPUs do support.
            raise ValueError("`fp16`=True needs a CUDA/XPU GPU; on CPU use `bf16=True` (bf16 autocast) instead.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"`bnb_4bit_quant_type` must be 'nf4' or 'fp4'; got {self.bnb_4bit_quant_type!r}.")
        validate_options(self._adapter_options(), label=argument_name)
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

    def _adapter_options(self) -> dict[str, Any]:
        values = {}
        for name, option in OPTIONS.items():
            if name in NOT_ARGUMENTS:
                source = NOT_ARGUMENTS[name]
                values[name] = getattr(self, source) if source else option.default_factory()
                continue
            value = getattr(self, argument_name(name))
            if name in LIST_OPTIONS and isinstance(value, str) and value != "all-linear":
                # "q_proj,v_proj" and "q_proj" are names; any other string is a regular expression where one may be.
                if "," in value or value.replace("_", "").isalnum() or str not in typing.get_args(TYPES[name]):
                    value = [part.strip() for part in value.split(",") if part.strip()]
            values[name] = as_names(value)
        return values

    def to_lorafa_config(self) -> LoRAFAConfig:
        """The [`LoRAFAConfig`] these arguments describe."""
        return LoRAFAConfig(**self._adapter_options())


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
