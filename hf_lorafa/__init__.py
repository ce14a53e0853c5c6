"""hf-lorafa: LoRA-FA, LaMDA and LaMDA++ fine-tuning for Hugging Face Trainer, with the least training memory."""

from .config import LoRAFAConfig
from .injection import count_parameters, inject_adapters
from .lamda import lamda_plus_plus_ranks, lamda_schedule_step
from .memory import saved_tensor_bytes
from .merge import merge_adapters
from .saving import load_adapter, save_adapter

__version__ = "0.1.0"

__all__ = [
    "LoRAFAConfig",
    "count_parameters",
    "inject_adapters",
    "lamda_plus_plus_ranks",
    "lamda_schedule_step",
    "load_adapter",
    "merge_adapters",
    "save_adapter",
    "saved_tensor_bytes",
]
