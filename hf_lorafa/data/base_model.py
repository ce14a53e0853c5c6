"""Load a base model for adapter training, optionally quantized by bitsandbytes through transformers.

Both entry points go through transformers' own bitsandbytes integration (`BitsAndBytesConfig` and its
quantizers), so the layers, the skipped output head and the saved format are exactly what transformers and PEFT
produce (QLoRA, Dettmers et al., 2023, arXiv:2305.14314: NF4 storage, double quantization, a 16/32-bit compute
dtype).
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..compat import keys_to_not_convert
from ..tuners.injection import has_adapters
from ..tuners.quantization import is_bnb_layer

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig


def _compute_dtype(dtype: torch.dtype | None) -> torch.dtype:
    # bf16 is QLoRA's compute dtype on GPUs; on CPUs bitsandbytes' fp32 4-bit kernel is exact and as fast.
    if dtype is not None:
        return dtype
    return torch.bfloat16 if torch.cuda.is_available() else torch.float32


def bnb_config(
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_compute_dtype: torch.dtype | None = None,
    bnb_4bit_use_double_quant: bool = False,
    skip_modules: list[str] | None = None,
) -> BitsAndBytesConfig | None:
    """The `transformers.BitsAndBytesConfig` for these arguments, or `None` when neither 4 nor 8 bit is asked.

    Example:

    ```python
    >>> from hf_lorafa.data.base_model import bnb_config
    >>> bnb_config(load_in_4bit=True).bnb_4bit_quant_type  # doctest: +SKIP
    'nf4'
    ```
    """
    if load_in_4bit and load_in_8bit:
        raise ValueError(
            "`load_in_4bit` and `load_in_8bit` are both True; pick one: load_in_4bit=True (QLoRA's NF4/FP4) or "
            "load_in_8bit=True (LLM.int8())."
        )
    if not (load_in_4bit or load_in_8bit):
        return None
    if bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ValueError(f"`bnb_4bit_quant_type` must be 'nf4' or 'fp4'; got {bnb_4bit_quant_type!r}.")
    from ..tuners.quantization import require_bitsandbytes

    require_bitsandbytes("`load_in_4bit`" if load_in_4bit else "`load_in_8bit`")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        bnb_4bit_quant_type=bnb_4bit_quant_type,
        bnb_4bit_compute_dtype=_compute_dtype(bnb_4bit_compute_dtype),
        bnb_4bit_use_double_quant=bnb_4bit_use_double_quant,
        llm_int8_skip_modules=skip_modules,
    )


def load_base_model(
    name_or_path: str | os.PathLike,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_compute_dtype: torch.dtype | None = None,
    bnb_4bit_use_double_quant: bool = False,
    dtype: torch.dtype | str | None = None,
    trust_remote_code: bool = False,
    task: Literal["causal-lm", "seq2seq-lm", "classification"] = "causal-lm",
    model_class: type | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a model from the Hub or a local folder (safetensors only), optionally quantized to 4 or 8 bits.

    Args:
        name_or_path (`str` or `os.PathLike`):
            Hub id or local folder of a transformers checkpoint in safetensors.
        load_in_4bit (`bool`, *optional*, defaults to `False`):
            Quantize the linear layers to 4 bits (bitsandbytes `Linear4bit`); the output head stays unquantized.
        load_in_8bit (`bool`, *optional*, defaults to `False`):
            Quantize the linear layers to 8 bits (bitsandbytes `Linear8bitLt`, LLM.int8()).
        bnb_4bit_quant_type (`str`, *optional*, defaults to `"nf4"`):
            `"nf4"` (NormalFloat, QLoRA's choice) or `"fp4"`.
        bnb_4bit_compute_dtype (`torch.dtype`, *optional*):
            dtype of the 4-bit products; defaults to bfloat16 on CUDA and float32 on CPU (bitsandbytes' CPU kernel
            runs fp32 without rounding the activations, and bf16 is no faster there without AMX).
        bnb_4bit_use_double_quant (`bool`, *optional*, defaults to `False`):
            Quantize the 4-bit scales too (QLoRA §3: about 0.4 bits per weight less).
        dtype (`torch.dtype` or `str`, *optional*):
            dtype of the non-quantized weights (transformers' `dtype`); transformers' default when unset.
        trust_remote_code (`bool`, *optional*, defaults to `False`):
            Allow the checkpoint's own modelling code; off unless you trust the repository.
        task (`str`, *optional*, defaults to `"causal-lm"`):
            `"causal-lm"` (`AutoModelForCausalLM`), `"seq2seq-lm"` (`AutoModelForSeq2SeqLM`: T5, BART) or
            `"classification"` (`AutoModelForSequenceClassification`; pass `num_labels`). Its head is left
            unquantized either way.
        model_class (`type`, *optional*):
            Any transformers class to load with instead (overrides `task`).
        kwargs:
            Passed on to `from_pretrained` (`revision`, `token`, `num_labels`, …).

    Example:

    ```python
    >>> from hf_lorafa import load_base_model
    >>> model = load_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", load_in_4bit=True)  # doctest: +SKIP
    ```
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

    if model_class is None:
        classes = {
            "causal-lm": AutoModelForCausalLM,
            "seq2seq-lm": AutoModelForSeq2SeqLM,
            "classification": AutoModelForSequenceClassification,
        }
        if task not in classes:
            raise ValueError(f"`task` must be one of {sorted(classes)}; got {task!r}. Or pass `model_class`.")
        model_class = classes[task]
    quantization_config = bnb_config(
        load_in_4bit, load_in_8bit, bnb_4bit_quant_type, bnb_4bit_compute_dtype, bnb_4bit_use_double_quant
    )
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = model_class.from_pretrained(
        name_or_path, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
    )
    if quantization_config is not None:
        from ..tuners.quantization import keep_canonical_layout

        keep_canonical_layout(model)
    return model


def quantize_model(
    model: nn.Module,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    bnb_4bit_quant_type: str = "nf4",
    bnb_4bit_compute_dtype: torch.dtype | None = None,
    bnb_4bit_use_double_quant: bool = False,
    keep_modules: list[str] | None = None,
) -> nn.Module:
    """A bitsandbytes-quantized copy of a full-precision transformers `model` the caller already holds.

    transformers quantizes while loading weights, so this loads the model's own state dict into a new instance of
    its class with a `BitsAndBytesConfig` (`from_pretrained(None, config=…, state_dict=…)`): transformers'
    quantizer replaces the linear layers and skips the same modules as on a normal load (the output head, tied
    weights), with no save/reload round trip. `model` itself is left unchanged.

    Args:
        model (`PreTrainedModel`):
            A full-precision transformers model without adapters.
        load_in_4bit, load_in_8bit, bnb_4bit_quant_type, bnb_4bit_compute_dtype, bnb_4bit_use_double_quant:
            As in [`load_base_model`].
        keep_modules (`list[str]`, *optional*):
            More modules to leave unquantized (e.g. the adapters' `modules_to_save`), besides transformers' defaults.

    Example:

    ```python
    >>> from hf_lorafa.data.base_model import quantize_model
    >>> model_4bit = quantize_model(model, load_in_4bit=True)  # doctest: +SKIP
    ```
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"`model` must be a transformers PreTrainedModel to be quantized; got {type(model).__name__}. "
            "Load it with load_base_model(name_or_path, load_in_4bit=True) instead."
        )
    if has_adapters(model) or any(is_bnb_layer(m) for m in model.modules()):
        raise ValueError(
            "`model` already has adapters or bitsandbytes layers; quantize the full-precision base first, then "
            "inject adapters."
        )
    skip = sorted(set(keys_to_not_convert(model)) | set(keep_modules or [])) if keep_modules else None
    quantization_config = bnb_config(
        load_in_4bit, load_in_8bit, bnb_4bit_quant_type, bnb_4bit_compute_dtype, bnb_4bit_use_double_quant, skip
    )
    if quantization_config is None:
        raise ValueError("`quantize_model` needs `load_in_4bit=True` or `load_in_8bit=True`.")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    quantized = type(model).from_pretrained(
        None,
        config=copy.deepcopy(model.config),
        state_dict=model.state_dict(),
        quantization_config=quantization_config,
        dtype=dtype,
    )
    if getattr(model, "generation_config", None) is not None:
        quantized.generation_config = copy.deepcopy(model.generation_config)
    from ..tuners.quantization import keep_canonical_layout

    return keep_canonical_layout(quantized)
