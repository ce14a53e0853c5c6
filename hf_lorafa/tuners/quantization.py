"""bitsandbytes 4-bit / 8-bit bases: dequantized weights, k-bit training preparation, checks, dequantized merge.

QLoRA (Dettmers et al., 2023, arXiv:2305.14314, §3) trains adapters over a frozen NF4 base whose weight is
dequantized for each product; LoRA-FA over such a base needs the dense weight only in backward (`dx = Wᵀg`), which
`dequantize_weight` provides to `hf_lorafa.tuners.layers.FrozenAAdapterFunction`. This is the only module that imports
bitsandbytes, and only inside functions, so the package imports and trains full-precision models without it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .config import is_adapter_tensor

INSTALL_HINT = 'pip install "hf-lorafa[quant]"'
# Module paths of other quantization libraries' layers: their weights are not dense tensors we could read.
FOREIGN_QUANTIZED = ("torch.ao.nn.quantized", "auto_gptq", "gptqmodel", "awq", "optimum.quanto", "hqq", "torchao")


def is_bnb_layer(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes quantized linear layer (checked without importing bitsandbytes)."""
    return type(module).__module__.startswith("bitsandbytes")


def require_bitsandbytes(feature: str = "`load_in_4bit` / `load_in_8bit`") -> Any:
    """Import and return bitsandbytes, or raise an `ImportError` that names `feature` and the install command.

    Example:

    ```python
    >>> bnb = require_bitsandbytes("`load_in_4bit`")  # doctest: +SKIP
    ```
    """
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            f"{feature} needs bitsandbytes, which is not installed; install it with `{INSTALL_HINT}` "
            "(or `pip install bitsandbytes`), or train in full precision without load_in_4bit / load_in_8bit."
        ) from err
    return bitsandbytes


def _canonical_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The packed data and quant state of a `Params4bit` in bitsandbytes' canonical layout."""
    data, state = weight.data, weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU inference kernel the first time a layer runs in
        # eval mode; undo that on copies so the module itself is left as bitsandbytes expects it.
        from ..compat import unpack_4bit_for_cpu

        data, state = unpack_4bit_for_cpu(data, state)
    return data, state


def dequantize_weight(base_layer: nn.Module) -> torch.Tensor:
    """The dense `(out_features, in_features)` weight of a bitsandbytes `Linear4bit` or `Linear8bitLt`.

    4-bit (NF4 / FP4, with or without double quantization) comes back in the dtype it was quantized from, 8-bit in
    float32 (`int8 · row scale / 127`). A fresh tensor each call: nothing is cached on the module.

    Example:

    ```python
    >>> from hf_lorafa.tuners.quantization import dequantize_weight
    >>> dequantize_weight(model.model.layers[0].self_attn.q_proj).shape  # doctest: +SKIP
    torch.Size([64, 64])
    ```
    """
    bnb = require_bitsandbytes("a bitsandbytes base layer")
    weight = base_layer.weight
    if isinstance(base_layer, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(*_canonical_4bit(weight))
    if isinstance(base_layer, bnb.nn.Linear8bitLt):
        if base_layer.state.has_fp16_weights:
            return weight
        # The row scales live on the weight until the first forward, then on the layer's matmul state.
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else base_layer.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scb)
    raise TypeError(_unsupported_layer_message("", base_layer))


def _quant_method(model: nn.Module) -> str | None:
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method))


def _unsupported_layer_message(name: str, module: nn.Module) -> str:
    where = f"layer {name!r}" if name else "the layer"
    return (
        f"{where} is a {type(module).__module__}.{type(module).__name__}, a quantized kind hf-lorafa cannot put an "
        "adapter on (it wraps nn.Linear and bitsandbytes Linear4bit / Linear8bitLt). Leave it out of "
        "`target_modules`, or load the base in full precision and quantize it with "
        "load_base_model(name_or_path, load_in_4bit=True)."
    )


def check_quantization(model: nn.Module) -> None:
    """Raise a `TypeError` if `model` is quantized by anything but bitsandbytes (GPTQ, AWQ, torch.ao, quanto, …).

    Call it before choosing target layers: such layers are not `nn.Linear`, so `"all-linear"` would silently
    skip them.

    Example:

    ```python
    >>> from hf_lorafa.tuners.quantization import check_quantization
    >>> check_quantization(model)  # doctest: +SKIP
    ```
    """
    method = _quant_method(model)
    if method not in (None, "bitsandbytes"):
        raise TypeError(
            f"`model` is quantized with {method!r}; hf-lorafa trains adapters over full-precision or bitsandbytes "
            "4-bit / 8-bit bases only. Load the full-precision checkpoint with "
            "load_base_model(name_or_path, load_in_4bit=True) (or load_in_8bit=True) instead."
        )
    for name, module in model.named_modules():
        if type(module).__module__.startswith(FOREIGN_QUANTIZED):
            raise TypeError(_unsupported_layer_message(name, module))


def check_base_layer(name: str, module: nn.Module) -> None:
    """Raise a `TypeError` naming the layer if an adapter cannot wrap `module` (an unsupported quantized kind).

    Example:

    ```python
    >>> from hf_lorafa.tuners.quantization import check_base_layer
    >>> check_base_layer("model.layers.0.self_attn.q_proj", model.model.layers[0].self_attn.q_proj)  # doctest: +SKIP
    ```
    """
    if is_bnb_layer(module):
        bnb = require_bitsandbytes("a bitsandbytes base layer")
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            return
        raise TypeError(_unsupported_layer_message(name, module))
    weight = getattr(module, "weight", None)
    # An integer weight or a quantized tensor subclass (torchao, quanto) is not the dense W of `dx = Wᵀg`; other
    # subclasses (DTensor under FSDP2 / tensor parallel) are.
    if (
        not isinstance(weight, torch.Tensor)
        or not weight.is_floating_point()
        or type(weight.data).__module__.startswith(FOREIGN_QUANTIZED)
    ):
        raise TypeError(_unsupported_layer_message(name, module))


def bnb_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every bitsandbytes layer in `model` (adapters' `base_layer`s included), by module name."""
    return {name: m for name, m in model.named_modules() if is_bnb_layer(m)}


def keep_canonical_layout(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel.

    That repacking happens the first time a layer runs without gradients (which includes the inside of our
    autograd function's forward), rounds the scales to bf16 and so changes the layer's output: training, evaluation
    and the merged model would then disagree. `load_base_model`, `quantize_model` and `prepare_kbit_model` call it.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def prepare_kbit_model(model: nn.Module, use_gradient_checkpointing: bool = False) -> nn.Module:
    """Make a bitsandbytes-quantized model ready for adapter training, in place.

    What it does: checks the quantization kind (`check_quantization`); turns on input gradients
    (`enable_input_require_grads`, needed by reentrant gradient checkpointing and the memory floor of docs/memory.md);
    optionally enables gradient checkpointing (non-reentrant); and keeps 4-bit weights in bitsandbytes' canonical
    layout on CPUs, where bitsandbytes would otherwise repack them (rounding their scales to bf16) the first time a
    layer runs in eval mode, so an evaluation never changes the frozen base. Freezing is left to `inject_adapters`
    (which freezes every non-adapter weight), so this runs before or after injection alike.

    What PEFT's `prepare_model_for_kbit_training` does that this does not: it casts *every* fp16/bf16 parameter to
    fp32, embeddings and output head included (doubling their memory: about 1 GB more for a 7B model's two
    32000×4096 matrices, and fp32 activations all along the residual stream), and turns on gradient checkpointing
    by default. The stability it buys is already there: transformers' norm layers compute in fp32 internally, its
    causal-LM loss upcasts the logits, bitsandbytes leaves the head unquantized, and the adapters are fp32
    (`tuners.layers.adapter_dtype`). Casting only the norms would not do either: their fp32 output would reach
    a half-precision head and fail.

    Example:

    ```python
    >>> from hf_lorafa import LoRAFAConfig, inject_adapters, load_base_model
    >>> from hf_lorafa.tuners.quantization import prepare_kbit_model
    >>> model = prepare_kbit_model(load_base_model("HuggingFaceTB/SmolLM2-135M", load_in_4bit=True))  # doctest: +SKIP
    >>> model = inject_adapters(model, LoRAFAConfig(method="lorafa"))  # doctest: +SKIP
    ```
    """
    check_quantization(model)
    keep_canonical_layout(model)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if use_gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _plain_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's non-quantized, non-adapter weights (its embeddings, as a rule); fp32 if none."""
    for name, param in model.named_parameters():
        plain = type(param).__module__ == "torch.nn.parameter"
        if param.is_floating_point() and plain and not is_adapter_tensor(name):
            return param.dtype
    return torch.float32


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every bitsandbytes layer of `model` by a plain `nn.Linear`, and forget its quantization config.

    Adapters' `base_layer`s are replaced too, so `merge_adapters` can then fold into dense weights; afterwards
    `save_pretrained` writes a normal model (re-quantize on load: `load_base_model(dir, load_in_4bit=True)`).
    A model without bitsandbytes layers is returned as it is.

    Args:
        model (`nn.Module`):
            A model loaded with `load_in_4bit` / `load_in_8bit` (with or without adapters).
        dtype (`torch.dtype`, *optional*):
            dtype of the dense weights; defaults to that of the model's other weights, so the result is uniform.

    Example:

    ```python
    >>> from hf_lorafa.tuners.quantization import dequantize_model
    >>> dequantize_model(model).save_pretrained("outputs/dense")  # doctest: +SKIP
    ```
    """
    layers = bnb_layers(model)
    if not layers:
        return model
    dtype = dtype or _plain_dtype(model)
    for name, layer in layers.items():
        weight = dequantize_weight(layer).detach()
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        linear.requires_grad_(False)
        model.set_submodule(name, linear)
    _forget_quantization(model)
    return model


def _forget_quantization(model: nn.Module) -> None:
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        # transformers' own undo: drops `hf_quantizer`, `config.quantization_config`, sets `is_quantized = False`.
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        if attr in model.__dict__:
            delattr(model, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if config is not None and getattr(config, "_is_quantized", False):
        config._is_quantized = False


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` was loaded or quantized by bitsandbytes (transformers' flags)."""
    return bool(
        getattr(model, "is_quantized", False)
        or getattr(model, "is_loaded_in_4bit", False)
        or getattr(model, "is_loaded_in_8bit", False)
    )
