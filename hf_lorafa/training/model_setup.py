"""The model a trainer is handed, made ready: loaded, quantized, converted from PEFT or injected as `args` say.

A `peft.PeftModel`'s LoRA adapter continues in hf-lorafa's layers. Users who kept `get_peft_model(...)` in their
script pass a model whose linear layers are already PEFT's `LoraLayer`s. Wrapping those again would nest adapters
(and PEFT's layers keep the full-rank input for backward, which is what LoRA-FA exists to avoid), so the adapter goes
through the same path as a saved PEFT adapter: saved in PEFT's format, PEFT's layers removed, and loaded by
`load_adapter` (all its checks included).
"""

from __future__ import annotations

import logging
import tempfile

from torch import nn

from ..compat import mark_adapters_attached
from ..tuners.injection import has_adapters, inject_adapters
from ..tuners.methods import METHODS
from ..tuners.quantization import is_quantized

logger = logging.getLogger(__name__)

# A PEFT LoRA continues as a method without LaMDA's core (whose projections come from the base's SVD).
CONVERTIBLE_METHODS = tuple(name for name, method in METHODS.items() if "lora_S" not in method.tensors)


def is_peft_model(model: nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel`."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def from_peft_model(model: nn.Module, method: str) -> nn.Module:
    """The base of PEFT model `model` with its LoRA adapter in hf-lorafa's layers, continuing as `method`.

    Args:
        model (`peft.PeftModel`): a model from `get_peft_model` or `PeftModel.from_pretrained` with one LoRA adapter.
        method (`str`): `"lorafa"` (A frozen from here on) or `"lora"` (A and B keep training).

    Example:

    ```python
    >>> from peft import LoraConfig, get_peft_model
    >>> model = from_peft_model(get_peft_model(base, LoraConfig(r=8)), "lorafa")  # doctest: +SKIP
    ```
    """
    from ..adapter_io.peft_format import load_adapter

    configs = model.peft_config
    config = configs.get(model.active_adapter)
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    if len(configs) != 1 or peft_type != "LORA":
        kinds = ", ".join(f"{name}: {getattr(c.peft_type, 'value', c.peft_type)}" for name, c in configs.items())
        raise ValueError(
            f"`model` is a PeftModel with adapters ({kinds}); LoRAFATrainer continues exactly one LoRA adapter. Pass "
            "the base model instead (`model.unload()` or the model before `get_peft_model`) and set `adapter_method`."
        )
    if method not in CONVERTIBLE_METHODS:
        raise ValueError(
            f"`model` is a PeftModel with a LoRA adapter, which can continue as 'lorafa' or 'lora', not as "
            f"`adapter_method`={method!r}: LaMDA builds its projections from the base weights' SVD. Pass the base "
            "model (`model.unload()`) to train LaMDA, or set `adapter_method='lorafa'`."
        )
    logger.warning(
        "hf-lorafa: `model` is a PeftModel; its LoRA adapter (r=%s, lora_alpha=%s) continues as %s in hf-lorafa's "
        "layers, so the adapter fields of the arguments other than `adapter_method` are not used.",
        config.r,
        config.lora_alpha,
        method,
    )
    with tempfile.TemporaryDirectory(prefix="hf-lorafa-peft-") as folder:
        model.save_pretrained(folder, safe_serialization=True)
        base = model.unload()
        return load_adapter(base, folder, method=method)


def prepare_model(model: nn.Module | str | None, args, *, chunked_loss: bool = True, trainer: str = "LoRAFATrainer"):
    """`model` with hf-lorafa adapters, as [`LoRAFAArguments`] `args` describe (in place where it can be).

    A name or folder is loaded with [`load_base_model`]; a PeftModel's LoRA continues as `args.adapter_method`;
    the base is quantized if asked; adapters are injected unless present; the activation savers go on last
    (`chunked_loss=False` where the trainer brings its own fused LM-head loss).
    """
    if model is None:
        raise ValueError(f"`model` is required: {trainer} injects adapters into a model you pass in.")
    if isinstance(model, str):
        from ..data.base_model import load_base_model

        model = load_base_model(
            model,
            load_in_4bit=args.load_in_4bit,
            load_in_8bit=args.load_in_8bit,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        )
    if is_peft_model(model):
        model = from_peft_model(model, args.adapter_method)
    if (args.load_in_4bit or args.load_in_8bit) and not is_quantized(model):
        from ..data.base_model import quantize_model

        model = quantize_model(
            model,
            load_in_4bit=args.load_in_4bit,
            load_in_8bit=args.load_in_8bit,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        )
    if not has_adapters(model):
        inject_adapters(model, args.to_lorafa_config())
    if is_quantized(model):
        from ..tuners.quantization import prepare_kbit_model

        prepare_kbit_model(model)
        mark_adapters_attached(model)  # transformers refuses to train "purely quantized" models; ours has adapters
    if args.hub_base_model_id:
        # Cards and adapter_config.json name the Hub original of a base loaded from a local folder.
        model.config.name_or_path = args.hub_base_model_id
    if args.activation_savers:
        from .activation_savers import apply_activation_savers

        apply_activation_savers(
            model,
            chunked_loss=chunked_loss,
            block_recompute="none" if args.gradient_checkpointing else args.block_recompute,
        )
    return model
