"""LoRA-FA's optimizer parameter groups: B at `lorafa_lr_ratio` times the learning rate, weight decay as Trainer's."""

from __future__ import annotations

from torch import nn


def lorafa_param_groups(
    model: nn.Module, decay: set[str], learning_rate: float, weight_decay: float, ratio: float
) -> list[dict]:
    """Trainable parameters in up to four groups: (decayed or not) × (LoRA-FA's B at `ratio` × lr, or the rest).

    Example:

    ```python
    >>> groups = lorafa_param_groups(model, decay_names, 2e-4, 0.0, ratio=4.0)  # doctest: +SKIP
    >>> torch.optim.AdamW(groups, lr=2e-4)  # doctest: +SKIP
    ```
    """
    groups = []
    for boosted in (False, True):
        for decayed in (True, False):
            params = [
                p
                for n, p in model.named_parameters()
                if p.requires_grad and (n in decay) == decayed and ("lora_B" in n) == boosted
            ]
            if params:
                group = {"params": params, "weight_decay": weight_decay if decayed else 0.0}
                if boosted:
                    group["lr"] = learning_rate * ratio
                groups.append(group)
    return groups
