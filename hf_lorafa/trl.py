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
        given = {**dict(zip(("data_collator", "train_dataset", "eval_dataset", "processing_class"), a)), **kw}
        _check_chat_template(
            given.get("processing_class"), args, given.get("train_dataset"), given.get("eval_dataset")
        )
        super().__init__(model, args, *a, **kw)


def _check_chat_template(processing_class, args: LoRAFASFTConfig | None, *datasets) -> None:
    """Conversational rows need a chat template: say what to set, before TRL's tokenizing traceback."""
    from trl.data_utils import is_conversational

    if processing_class is None or getattr(args, "chat_template_path", None):
        return  # TRL loads the model's own tokenizer, or applies the template file it was given
    if getattr(processing_class, "chat_template", None) or getattr(
        getattr(processing_class, "tokenizer", None), "chat_template", None
    ):
        return
    for name, dataset in zip(("train_dataset", "eval_dataset"), datasets):
        row = next(iter(dataset), None) if dataset is not None and not isinstance(dataset, dict) else None
        if isinstance(row, dict) and is_conversational(row):
            raise ValueError(
                f"`{name}` holds conversations ({', '.join(row)} of {{'role', 'content'}} turns) but the tokenizer "
                "has no chat template (`tokenizer.chat_template` is None). Set `tokenizer.chat_template` to a Jinja "
                "template (e.g. the instruct model's), pass `chat_template_path` in LoRAFASFTConfig, or give "
                "prompt/completion text rows instead."
            )
