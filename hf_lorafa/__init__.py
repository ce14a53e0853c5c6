"""hf-lorafa: LoRA-FA, LaMDA and LaMDA++ fine-tuning for Hugging Face Trainer, with the least training memory."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .version import __version__ as __version__  # re-exported

# transformers' Trainer imports peft, which imports bitsandbytes, which on AVX512-BF16 CPUs tries to fetch its fused
# 4-bit CPU kernel from the Hub (through `kernels`) and warns when it cannot. Safe to hide: that kernel only runs on
# weights repacked for CPU inference, which hf-lorafa never lets bitsandbytes make (`bnb.keep_canonical_layout`).
# Set here, before any of our modules imports transformers.
for _logger in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_logger).addFilter(
        lambda record: not any(s in str(record.msg) for s in ("gemm_4bit_forward", "quantization-bitsandbytes"))
    )

# Exports are imported on first use: `import hf_lorafa` stays cheap for the demo and the CLI, which need only parts.
_EXPORTS = {
    "HubUploadError": "hub",
    "LoRAFAArguments": "arguments",
    "LoRAFAConfig": "config",
    "LoRAFATrainer": "trainer",
    "LoRAFATrainerMixin": "trainer",
    "LoRAFATrainingArguments": "arguments",
    "apply_activation_savers": "savers",
    "count_parameters": "injection",
    "estimate_memory": "estimate",
    "init_frozen_a_from_data": "calibration",
    "inject_adapters": "injection",
    "lamda_plus_plus_ranks": "lamda",
    "lamda_schedule_step": "lamda",
    "load_adapter": "saving",
    "load_raw_dataset": "dataprep",
    "load_base_model": "loading",
    "merge_adapters": "merge",
    "pad_collator": "dataprep",
    "push_adapter": "hub",
    "resolve_model": "data",
    "save_adapter": "saving",
    "saved_tensor_bytes": "memory",
    "take_rows": "dataprep",
    "tokenize_for_causal_lm": "dataprep",
    "write_model_card": "model_card",
}
__all__ = sorted(_EXPORTS)  # one table: what is exported is what is lazily importable

if TYPE_CHECKING:
    from .arguments import LoRAFAArguments, LoRAFATrainingArguments
    from .calibration import init_frozen_a_from_data
    from .config import LoRAFAConfig
    from .data import resolve_model
    from .dataprep import load_raw_dataset, pad_collator, take_rows, tokenize_for_causal_lm
    from .estimate import estimate_memory
    from .hub import HubUploadError, push_adapter
    from .injection import count_parameters, inject_adapters
    from .lamda import lamda_plus_plus_ranks, lamda_schedule_step
    from .loading import load_base_model
    from .memory import saved_tensor_bytes
    from .merge import merge_adapters
    from .model_card import write_model_card
    from .savers import apply_activation_savers
    from .saving import load_adapter, save_adapter
    from .trainer import LoRAFATrainer, LoRAFATrainerMixin


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_lorafa' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
