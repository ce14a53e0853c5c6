"""Fold adapters into plain linear layers (`W ← W + s·B(S)A`); quantized bases are dequantized first."""

from __future__ import annotations

import torch
from torch import nn

from .injection import adapter_layers
from .layers import base_weight, is_bnb_layer


def merged_linear(layer: nn.Module) -> nn.Linear:
    """A plain `nn.Linear` equal to `layer` (an adapter over any base kind) with the adapter folded in."""
    base = layer.base_layer
    weight = base_weight(base).detach()
    delta = layer.delta_weight().detach().to(torch.float32 if weight.dtype != torch.float64 else weight.dtype)
    merged = weight.to(delta.dtype) + delta
    if is_bnb_layer(base):
        # A quantized base merges into full precision: the adapter's dtype (fp32), re-quantize on load if wanted.
        dtype = delta.dtype
        linear = nn.Linear(
            layer.in_features, layer.out_features, bias=base.bias is not None, device=weight.device, dtype=dtype
        )
    else:
        linear, dtype = base, base.weight.dtype
    with torch.no_grad():
        linear.weight.data = merged.to(dtype)
        if base.bias is not None and linear is not base:
            linear.bias.copy_(base.bias.to(dtype))
    linear.weight.requires_grad_(False)
    return linear


def merge_adapters(model: nn.Module) -> nn.Module:
    """Replace every adapter layer of `model` by a plain linear layer with the adapter folded in.

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
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, merged_linear(layer))
    if "hf_lorafa_config" in model.__dict__:
        del model.hf_lorafa_config
    return model
