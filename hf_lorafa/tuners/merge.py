"""Fold adapters into their plain base layers (`W ← W + s·B(S)A`); quantized bases are dequantized first."""

from __future__ import annotations

import torch
from torch import nn

from .injection import adapter_layers
from .layers import base_weight, is_fan_in_fan_out
from .param_layers import ParamAdapter
from .quantization import dequantize_model


def merged_linear(layer: nn.Module) -> nn.Module:
    """The adapter's base with the adapter folded in (`merge_adapters` dequantizes bnb bases first); a Conv1D base
    stays a Conv1D, its weight stored transposed as before."""
    base = layer.base_layer
    weight = base_weight(base).detach()
    delta = layer.delta_weight().detach().to(torch.float32 if weight.dtype != torch.float64 else weight.dtype)
    with torch.no_grad():
        merged = (weight.to(delta.dtype) + delta).to(base.weight.dtype)
        base.weight.data = merged.t().contiguous() if is_fan_in_fan_out(base) else merged
    base.weight.requires_grad_(False)
    return base


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer of `model` by its plain base layer (nn.Linear, Conv1D) with the adapter folded in.

    The result has no hf-lorafa modules and saves with `save_pretrained` like any transformers model.

    Example:

    ```python
    >>> from hf_lorafa import load_adapter, merge_adapters
    >>> merged = merge_adapters(load_adapter(base_model, "outputs/my-adapter"))  # doctest: +SKIP
    >>> merged.save_pretrained("outputs/merged")  # doctest: +SKIP
    ```
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("`model` has no hf-lorafa adapters to merge; load or inject an adapter first.")
    # A quantized base merges into a dense model: every bitsandbytes layer, adapted or not, first becomes an
    # nn.Linear in the model's dtype and the quantization config goes, so save_pretrained writes a normal model.
    dequantize_model(model)
    for name, layer in reversed(layers.items()):  # nested adapters (`experts.base_layer`) before their wrappers
        parent_name, _, child = name.rpartition(".")
        merged = layer.merged_base() if isinstance(layer, ParamAdapter) else merged_linear(layer)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, merged)
    if "hf_lorafa_config" in model.__dict__:
        del model.hf_lorafa_config
    return model
