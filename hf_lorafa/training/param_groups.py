"""Optimizer parameter groups: LoRA-FA's B, or LaMDA's S and B, at multiples of the learning rate."""

from __future__ import annotations

from torch import nn

from ..tuners.config import LoRAFAConfig
from ..tuners.methods import METHODS


def lr_ratios(config: LoRAFAConfig) -> dict[str, float]:
    """`{tensor name: learning-rate multiple}` of `config.method` (`hf_lorafa.tuners.methods`), leaving out 1.0s."""
    return {name: ratio for name, ratio in METHODS[config.method].lr_ratios(config).items() if ratio != 1.0}


def lorafa_param_groups(
    model: nn.Module,
    decay: set[str],
    learning_rate: float,
    weight_decay: float,
    ratios: dict[str, float],
) -> list[dict]:
    """Trainable parameters grouped by (decayed or not) × their learning rate: `ratios[t]` × lr for the parameters
    of adapter tensor `t` (`lora_B`, `lora_S`), lr for the rest. A scaled group records its multiple as `lr_ratio`
    (the trainer's logs report the base rate from it).

    Example:

    ```python
    >>> groups = lorafa_param_groups(model, decay_names, 2e-4, 0.0, {"lora_B": 4.0})  # doctest: +SKIP
    >>> torch.optim.AdamW(groups, lr=2e-4)  # doctest: +SKIP
    ```
    """

    def ratio_of(name: str) -> float:
        return next((r for tensor, r in ratios.items() if f".{tensor}." in f".{name}"), 1.0)

    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((ratio_of(name), name in decay), []).append(param)
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0}
        | ({"lr": learning_rate * ratio, "lr_ratio": ratio} if ratio != 1.0 else {})
        for (ratio, decayed), params in groups.items()
    ]
