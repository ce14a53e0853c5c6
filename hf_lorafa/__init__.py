"""hf-lorafa: LoRA-FA, LaMDA and LaMDA++ fine-tuning for Hugging Face Trainer, with the least training memory."""

__version__ = "0.1.0"

from .arguments import LoRAFATrainingArguments  # noqa: E402
from .config import LoRAFAConfig  # noqa: E402
from .hub import HubUploadError, push_adapter  # noqa: E402
from .injection import count_parameters, inject_adapters  # noqa: E402
from .lamda import lamda_plus_plus_ranks, lamda_schedule_step  # noqa: E402
from .loading import load_base_model  # noqa: E402
from .memory import saved_tensor_bytes  # noqa: E402
from .merge import merge_adapters  # noqa: E402
from .model_card import write_model_card  # noqa: E402
from .saving import load_adapter, save_adapter  # noqa: E402
from .trainer import LoRAFATrainer  # noqa: E402

__all__ = [
    "HubUploadError",
    "LoRAFAConfig",
    "LoRAFATrainer",
    "LoRAFATrainingArguments",
    "count_parameters",
    "inject_adapters",
    "lamda_plus_plus_ranks",
    "lamda_schedule_step",
    "load_adapter",
    "load_base_model",
    "merge_adapters",
    "push_adapter",
    "save_adapter",
    "saved_tensor_bytes",
    "write_model_card",
]
