"""The adapter methods, one registry entry each: everything the rest of the package needs to know about a method.

Injection builds `build(config, base_layer, r)`; the trainer's optimizer trains each tensor named in
`lr_ratio_fields` at the product of its config fields × the learning rate; the model card takes its texts and option
rows from here; the memory estimator its parameter and activation counts. Adding a method is its layer class plus
one entry in `METHODS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .config import LoRAFAConfig
from .lamda import LaMDALayer
from .layers import AdapterLayer, LoRAFALayer, LoRALayer


@dataclass(frozen=True)
class AdapterMethod:
    """One adapter method.

    Args:
        name (`str`): the `LoRAFAConfig.method` value.
        display_name, hub_tag, paper_id, paper_title, summary (`str`): what the model card says of it.
        build (`Callable`): `(config, base_layer, r) -> AdapterLayer`.
        tensors (`tuple[str, ...]`): the layer's parameter names (`lora_A`, `lora_B`, LaMDA's `lora_S`).
        trains_a (`bool`): whether A trains (LoRA) or stays frozen after init (the others).
        keeps_input (`bool`): whether backward keeps the layer's full-rank input (LoRA, for A's gradient).
        lr_ratio_fields (`tuple`): `(tensor, config fields)` pairs: the product of the fields' values multiplies the
            learning rate of that tensor (LoRA-FA's `lora_B`; LaMDA's `lora_S` and `lora_B`).
        card_options (`tuple`): `(label, config field, suffix)` rows of the card's adapter table.
        ranks_from_spectrum (`bool`): per-layer ranks from each weight's spectrum at injection (LaMDA++).
    """

    name: str
    display_name: str
    hub_tag: str
    paper_id: str
    paper_title: str
    summary: str
    build: Callable[[LoRAFAConfig, nn.Module, int], AdapterLayer]
    tensors: tuple[str, ...] = ("lora_A", "lora_B")
    trains_a: bool = False
    keeps_input: bool = False
    lr_ratio_fields: tuple[tuple[str, tuple[str, ...]], ...] = ()
    card_options: tuple[tuple[str, str, str], ...] = ()
    ranks_from_spectrum: bool = False

    def lr_ratios(self, config: LoRAFAConfig) -> dict[str, float]:
        """`{tensor: learning-rate multiple}` under `config`; tensors not named train at the learning rate."""
        fields = self.lr_ratio_fields
        return {tensor: math.prod(float(getattr(config, name)) for name in names) for tensor, names in fields}

    def adapter_numel(self, d_in: int, d_out: int, r: int) -> int:
        """Parameters the adapter of one `d_in → d_out` layer holds."""
        return r * (d_in + d_out) + (r * r if "lora_S" in self.tensors else 0)

    def trainable_numel(self, d_in: int, d_out: int, r: int) -> int:
        """Parameters of one layer's adapter that train at the step's peak (LaMDA's B trains early on, then S only)."""
        return self.adapter_numel(d_in, d_out, r) - (0 if self.trains_a else r * d_in)


def _lamda(config: LoRAFAConfig, base: nn.Module, r: int) -> AdapterLayer:
    return LaMDALayer(base, r, config.alpha, config.dropout, config.lamda_init)


_LAMDA_CARD = (
    ("B frozen over the first", "lamda_freeze_fraction", " of training"),
    ("B freeze order", "lamda_freeze_order", ""),
    ("Initialisation", "lamda_init", ""),
    ("Learning-rate multiplier of S and B", "lamda_lr_ratio", ""),
    ("Further learning-rate multiplier of S", "lamda_s_lr_ratio", ""),
    ("Frozen A from", "frozen_a_init", ""),
)
_LAMDA_SUMMARY = (
    "LaMDA adapts each layer with s·B·S·A, where A is random and frozen and B and S start from the weight's "
    "singular vectors and values (`lamda_init`); B is frozen gradually early in training so that only the r×r core "
    "S keeps training. It trains far fewer parameters than LoRA and keeps only r values per token for backward."
)
# What LaMDA and LaMDA++ share (Azizi et al., 2024, arXiv:2406.12832): the layer, its tensors, the lr rule, the paper.
_LAMDA = dict(
    paper_id="2406.12832",
    paper_title="LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional Adaptation",
    build=_lamda,
    tensors=("lora_A", "lora_S", "lora_B"),
    lr_ratio_fields=(("lora_S", ("lamda_lr_ratio", "lamda_s_lr_ratio")), ("lora_B", ("lamda_lr_ratio",))),
)

METHODS: dict[str, AdapterMethod] = {
    method.name: method
    for method in (
        AdapterMethod(
            name="lora",
            display_name="LoRA",
            hub_tag="lora",
            paper_id="2106.09685",
            paper_title="LoRA: Low-Rank Adaptation of Large Language Models",
            summary="LoRA freezes the pretrained weight W and learns a low-rank update s·B·A beside it, with B = 0 at "
            "the start. Both A and B are trained, so only r·(d_in + d_out) values per adapted layer change.",
            build=lambda config, base, r: LoRALayer(base, r, config.alpha, config.dropout),
            trains_a=True,
            keeps_input=True,
        ),
        AdapterMethod(
            name="lorafa",
            display_name="LoRA-FA",
            hub_tag="lora-fa",
            paper_id="2308.03303",
            paper_title="LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models Fine-tuning",
            summary="LoRA-FA keeps LoRA's update s·B·A but freezes the projection-down A after its random orthonormal "
            "initialisation and trains only B. Backward then needs only the r-dimensional A·x per token instead of "
            "the full input x, which cuts the activation memory of every adapted layer.",
            build=lambda config, base, r: LoRAFALayer(
                base, r, config.alpha, config.dropout, config.lorafa_gradient_correction
            ),
            lr_ratio_fields=(("lora_B", ("lorafa_lr_ratio",)),),
            card_options=(
                ("B gradient correction (LoRA-FA v2)", "lorafa_gradient_correction", ""),
                ("Learning-rate multiplier of B", "lorafa_lr_ratio", ""),
                ("Frozen A from", "frozen_a_init", ""),
            ),
        ),
        AdapterMethod(
            name="lamda",
            display_name="LaMDA",
            hub_tag="lamda",
            summary=_LAMDA_SUMMARY,
            card_options=_LAMDA_CARD,
            **_LAMDA,
        ),
        AdapterMethod(
            name="lamda++",
            display_name="LaMDA++",
            hub_tag="lamda-plus-plus",
            summary="LaMDA++ is LaMDA with per-layer ranks chosen from a normalized spectrum analysis of each "
            "pretrained weight: layers whose top singular values hold less of the energy get more rank. The ranks "
            "sum to the same total budget as a uniform rank would.",
            card_options=(*_LAMDA_CARD, ("Total rank budget", "lamda_rank_budget", "")),
            ranks_from_spectrum=True,
            **_LAMDA,
        ),
    )
}
