"""hf-lorafa: LoRA-FA, LaMDA and LaMDA++ fine-tuning for Hugging Face Trainer, with the least training memory."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__  # re-exported

# transformers' Trainer imports peft, which imports bitsandbytes, which on AVX512-BF16 CPUs tries to fetch its fused
# 4-bit CPU kernel from the Hub (through `kernels`) and warns when it cannot. Safe to hide: that kernel only runs on
# weights repacked for CPU inference, which hf-lorafa never lets bitsandbytes make
# (`tuners.quantization.keep_canonical_layout`).
# Set here, before any of our modules imports transformers.
for _logger in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_logger).addFilter(
        lambda record: not any(s in str(record.msg) for s in ("gemm_4bit_forward", "quantization-bitsandbytes"))
    )

# Exports are imported on first use: `import hf_lorafa` stays cheap for the demo and the CLI, which need only parts.
_EXPORTS = {
    "HubUploadError": "hub.push",
    "LoRAFAArguments": "training.arguments",
    "LoRAFAConfig": "tuners.config",
    "LoRAFATrainer": "training.trainer",
    "LoRAFATrainerMixin": "training.trainer",
    "LoRAFATrainingArguments": "training.arguments",
    "adapter_layers": "tuners.injection",
    "apply_activation_savers": "training.activation_savers",
    "chatterbot_pairs": "data.offline",
    "classification_metrics": "data.preprocessing",
    "count_parameters": "tuners.injection",
    "drugreview_split": "data.offline",
    "estimate_memory": "memory.estimate",
    "init_frozen_a_from_data": "tuners.calibration",
    "inject_adapters": "tuners.injection",
    "lamda_plus_plus_ranks": "tuners.lamda",
    "lamda_schedule_step": "tuners.lamda",
    "load_adapter": "adapter_io.peft_format",
    "load_base_model": "data.base_model",
    "load_raw_dataset": "data.preprocessing",
    "merge_adapters": "tuners.merge",
    "pad_collator": "data.preprocessing",
    "push_adapter": "hub.push",
    "resolve_model": "data.offline",
    "save_adapter": "adapter_io.peft_format",
    "saved_tensor_bytes": "memory.measure",
    "take_rows": "data.preprocessing",
    "tokenize_for_causal_lm": "data.preprocessing",
    "tokenize_for_classification": "data.preprocessing",
    "write_model_card": "hub.card",
}
__all__ = sorted(_EXPORTS)  # one table: what is exported is what is lazily importable

if TYPE_CHECKING:
    from .adapter_io.peft_format import load_adapter, save_adapter
    from .data.base_model import load_base_model
    from .data.offline import chatterbot_pairs, drugreview_split, resolve_model
    from .data.preprocessing import (
        classification_metrics,
        load_raw_dataset,
        pad_collator,
        take_rows,
        tokenize_for_causal_lm,
        tokenize_for_classification,
    )
    from .hub.card import write_model_card
    from .hub.push import HubUploadError, push_adapter
    from .memory.estimate import estimate_memory
    from .memory.measure import saved_tensor_bytes
    from .training.activation_savers import apply_activation_savers
    from .training.arguments import LoRAFAArguments, LoRAFATrainingArguments
    from .training.trainer import LoRAFATrainer, LoRAFATrainerMixin
    from .tuners.calibration import init_frozen_a_from_data
    from .tuners.config import LoRAFAConfig
    from .tuners.injection import adapter_layers, count_parameters, inject_adapters
    from .tuners.lamda import lamda_plus_plus_ranks, lamda_schedule_step
    from .tuners.merge import merge_adapters


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_lorafa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
