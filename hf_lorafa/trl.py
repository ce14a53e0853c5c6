"""TRL integration: `LoRAFASFTTrainer` is TRL's `SFTTrainer` with hf-lorafa's adapters, schedule, memory and saving.

Swap two names in a TRL script: `SFTConfig` → `LoRAFASFTConfig` (SFTConfig + [`LoRAFAArguments`]' fields) and
`SFTTrainer` → `LoRAFASFTTrainer`. Everything of TRL's stays: dataset preparation (conversational, prompt-completion,
completion-only loss, packing), its fused LM head (the loss without `(tokens × vocab)` logits, so hf-lorafa's own
chunked loss is left off), its entropy / token-accuracy metrics. Needs `pip install "hf-lorafa[trl]"`.
"""

from __future__ import annotations

from dataclasses import dataclass

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # an optional extra: say which
    raise ImportError('hf_lorafa.trl needs TRL: pip install "hf-lorafa[trl]" (or pip install trl).') from err

from .training.arguments import LoRAFAArguments
from .training.trainer import LoRAFATrainerMixin

__all__ = ["LoRAFASFTConfig", "LoRAFASFTTrainer"]


@dataclass
class LoRAFASFTConfig(LoRAFAArguments, SFTConfig):
    r"""
    TRL's [`~trl.SFTConfig`] with hf-lorafa's adapter, quantization and memory fields ([`LoRAFAArguments`]).

    Example:

    ```python
    >>> from hf_lorafa.trl import LoRAFASFTConfig
    >>> config = LoRAFASFTConfig(output_dir="out", adapter_method="lamda", lora_r=8, bf16=False)
    >>> config.to_lorafa_config().method, config.completion_only_loss
    ('lamda', None)
    ```
    """


class LoRAFASFTTrainer(LoRAFATrainerMixin, SFTTrainer):
    """
    TRL's [`~trl.SFTTrainer`] training hf-lorafa adapters (see [`LoRAFATrainerMixin`]): pass [`LoRAFASFTConfig`]
    as `args`. `save_model()` writes the adapter in PEFT's format with its card; PEFT's `peft_config` is not used
    (the adapter comes from the config's `adapter_method`, `lora_r`, ... fields).

    Example:

    ```python
    >>> from hf_lorafa.trl import LoRAFASFTConfig, LoRAFASFTTrainer
    >>> args = LoRAFASFTConfig(output_dir="out", adapter_method="lorafa", lora_r=16)
    >>> trainer = LoRAFASFTTrainer(model=model, args=args, train_dataset=dataset)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    lorafa_args_class = LoRAFASFTConfig
    # TRL patches the model with its own fused LM head (`add_fused_lm_head`), which does what the chunked loss does.
    lorafa_chunked_loss = False

    def __init__(self, model=None, args: LoRAFASFTConfig | None = None, *a, peft_config=None, **kw):
        if peft_config is not None:
            raise ValueError(
                "`peft_config` is not used by LoRAFASFTTrainer: the adapter comes from LoRAFASFTConfig's fields. "
                "Drop `peft_config` and set `adapter_method`, `lora_r`, `lora_alpha` and `lora_target_modules`."
            )
        super().__init__(model, args, *a, **kw)
