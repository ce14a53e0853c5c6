"""Full adapter tensors from a model whose parameters DeepSpeed ZeRO-3 partitions across ranks.

Under ZeRO-3 each rank holds a shard of every parameter (`param.ds_numel` is the full size, `param.data` is empty
outside a gather). The consolidated state dict that `Trainer.save_model` passes holds the full tensors only when
`stage3_gather_16bit_weights_on_model_save` is on, and a consolidation that excludes frozen parameters (what
transformers does for PEFT models) drops LoRA-FA's and LaMDA's frozen A. The adapter is small (r × (d_in + d_out)
per layer), so it is gathered directly with DeepSpeed's public `deepspeed.zero.GatheredParameters`, whatever the
configuration says about the base weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..tuners.config import is_adapter_tensor


def is_zero3_partitioned(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a ZeRO-3 partitioned parameter (it carries its full size as `ds_numel`)."""
    return hasattr(tensor, "ds_numel")


def gather_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the adapter's tensors (frozen A included) and of every trainable one, by parameter name,
    where ZeRO-3 partitions them; empty when nothing is partitioned.

    Call it on every rank: gathering is a collective. Pass the result as `save_adapter(..., state_dict=...)` on the
    main one.

    Example:

    ```python
    >>> tensors = gather_adapter_tensors(engine.module)  # doctest: +SKIP
    >>> if rank == 0: save_adapter(engine.module, "out", state_dict=tensors)  # doctest: +SKIP
    ```
    """
    partitioned = {
        name: param
        for name, param in model.named_parameters()
        if (is_adapter_tensor(name) or param.requires_grad) and is_zero3_partitioned(param)
    }
    if not partitioned:
        return {}
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(partitioned.values())):
        return {name: param.detach().cpu().clone() for name, param in partitioned.items()}
