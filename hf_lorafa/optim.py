"""Optimizer parameter groups: LoRA-FA's B, or LaMDA's S and B, at a multiple of the learning rate."""

from __future__ import annotations

from torch import nn

from .config import LoRAFAConfig
from .methods import METHODS


def boosted_lr(config: LoRAFAConfig) -> tuple[float, tuple[str, ...]]:
    """`(ratio, parameter names)` of `config.method` (`hf_lorafa.methods`): LoRA-FA's B, LaMDA's S and B."""
    method = METHODS[config.method]
    return method.lr_ratio(config), method.boosted


def lorafa_param_groups(
    model: nn.Module,
    decay: set[str],
    learning_rate: float,
    weight_decay: float,
    ratio: float,
    boosted: tuple[str, ...] = ("lora_B",),
) -> list[dict]:
    """Trainable parameters in up to four groups: (decayed or not) × (named in `boosted`, at `ratio` × lr, or not).

    Example:

    ```python
    >>> groups = lorafa_param_groups(model, decay_names, 2e-4, 0.0, ratio=4.0)  # doctest: +SKIP
    >>> torch.optim.AdamW(groups, lr=2e-4)  # doctest: +SKIP
    ```
    """
    groups = []
    for is_boosted in (False, True):
        for decayed in (True, False):
            params = [
                p
                for n, p in model.named_parameters()
                if p.requires_grad and (n in decay) == decayed and any(b in n for b in boosted) == is_boosted
            ]
            if params:
                group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
                if is_boosted:
                    group["lr"] = learning_rate * ratio
                groups.append(group)
    return groups
