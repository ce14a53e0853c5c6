"""LaMDA and LaMDA++: spectrally initialised low-dimensional adaptation.

Azizi, Kundu & Pedram, 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional
Adaptation" (arXiv:2406.12832):

- §3.1: `y = W x + s·B S A x` with the projection matrix A (PMA, r×d_in) frozen, a trained r×r low-dimensional
  adapter S, and the projection matrix B (PMB, d_out×r) trained only early on. A and B come from the SVD of the
  pretrained W: A = V_rᵀ (top-r right singular vectors, orthonormal rows), B = U_r·diag(σ_r) (top-r left singular
  vectors weighted by their singular values, so B A is W's rank-r principal part). The paper leaves B's scale open;
  with columns of norm σ_i an Adam step on S moves W by about `s·lr·σ_i` along u_i v_jᵀ, the size of a LoRA step.
  Normalising by σ_1 (columns of norm ≤ 1, this module's first choice) made S's steps σ_1/σ_i times smaller
  (2-30x on MiniLM and SmolLM2); measured on chatterbot, 15 steps: held-out loss 2.92 with it, 2.36 without
  (LoRA 1.90). At LoRA's learning rate LaMDA still trains slowly (BENCHMARKS.md). S = 0, so the output at step 0
  is the base model's.
- §3.2: PMB is frozen gradually during early training, so that afterwards only S (r² per layer) trains. The paper
  freezes it over an early window; here the window is `lamda_freeze_fraction` of the total steps and, with the
  default order `"ascending"`, B's columns freeze one by one from the smallest singular value up (the least
  important directions settle first), linearly in progress; `"all"` freezes B whole at the window's end.
- §3.3 (LaMDA++): ranks per layer from a normalized spectrum analysis of each W, using singular values only. A
  layer's score is the share of its energy (Σσ²) *outside* its top-r directions at the mean rank r: layers whose
  top singular values hold less of the energy get more rank. Ranks are proportional to the score, at least
  `lamda_min_rank`, and sum exactly to the budget (largest-remainder rounding).

Frozen columns are kept fixed against optimizer momentum and weight decay by restoring them after each step from
a snapshot (`lamda_schedule_step`), so any `torch.optim` optimizer can be used.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import AdapterLayer, FrozenAAdapterFunction, base_weight


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters between steps); any other tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class LaMDALayer(AdapterLayer):
    """LaMDA adapter: frozen A (PMA), trained r×r core `lora_S`, B (PMB) frozen column by column early on."""

    method = "lamda"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, alpha, dropout)
        self.lora_S = nn.Linear(r, r, bias=False, device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype)
        self.lora_A.weight.requires_grad_(False)
        # 1 = column of B still trains; B's columns are in decreasing singular-value order.
        self.register_buffer("lamda_column_mask", torch.ones(1, r, dtype=self.lora_A.weight.dtype), persistent=False)
        self.register_buffer("lamda_frozen_B", None, persistent=False)

    def init_lora(self, seed: int) -> None:
        weight = base_weight(self.base_layer).detach().double()
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
        with torch.no_grad():
            self.lora_A.weight.copy_(vh[: self.r])
            self.lora_B.weight.copy_(u[:, : self.r] * sigma[: self.r])
            self.lora_S.weight.zero_()

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B.weight @ self.lora_S.weight @ self.lora_A.weight)

    def peft_weights(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        # Folded on save: B' = B S, so PEFT's `s·B'A` is exactly this adapter.
        t = tensors or self.adapter_tensors()
        return {"lora_A.weight": t["lora_A.weight"], "lora_B.weight": t["lora_B.weight"] @ t["lora_S.weight"]}

    def load_peft_weights(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """A folded adapter resumes as S = I over B' = B S, with B frozen: only S trains, as after the schedule."""
        super().load_peft_weights(lora_A, lora_B)
        with torch.no_grad():
            self.lora_S.weight.copy_(torch.eye(self.r))
        self.set_frozen_columns(self.r)

    @property
    def frozen_columns(self) -> int:
        return int((self.lamda_column_mask == 0).sum())

    def set_frozen_columns(self, n: int) -> None:
        """Freeze the last `n` columns of B (smallest singular values); all `r` frozen turns B's grad off."""
        n = max(self.frozen_columns, min(n, self.r))  # freezing never goes back
        if n == self.frozen_columns and n < self.r:
            return
        with torch.no_grad():
            self.lamda_column_mask[:, self.r - n :] = 0
            if n == self.r:
                self.lora_B.weight.requires_grad_(False)
                self.lora_B.weight.grad = None
                self.lamda_frozen_B = None
            else:
                self.lamda_frozen_B = self.lora_B.weight.detach().clone()

    def restore_frozen_columns(self) -> None:
        """Undo what momentum or weight decay did to frozen columns in the last optimizer step."""
        if self.lamda_frozen_B is not None:
            with torch.no_grad():
                frozen = self.lamda_column_mask == 0
                # Under FSDP2 B and its snapshot are DTensors sharded by rows: every shard holds all r columns, so
                # the column mask applies to the local shards as it does to the whole matrix.
                weight, snapshot = (_local(t) for t in (self.lora_B.weight, self.lamda_frozen_B))
                weight.copy_(torch.where(frozen, snapshot, weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None if self.frozen_columns in (0, self.r) else self.lamda_column_mask
        return FrozenAAdapterFunction.apply(
            x,
            self.lora_A.weight,
            self.lora_B.weight,
            self.lora_S.weight,
            mask,
            self.base_layer,
            self.scaling,
            self.dropout,
            self.training,
        )


def frozen_columns_at(progress: float, r: int, freeze_fraction: float, order: str) -> int:
    """How many of B's r columns are frozen at `progress` ∈ [0, 1] of training."""
    if freeze_fraction <= 0 or progress >= freeze_fraction:
        return r
    if order == "all":
        return 0
    return int(math.floor(r * progress / freeze_fraction))


def lamda_schedule_step(model: nn.Module, progress: float) -> int:
    """Advance LaMDA's freezing of B to `progress` ∈ [0, 1]; call after each optimizer step.

    Returns the number of trainable parameters left in the model.

    Example:

    ```python
    >>> lamda_schedule_step(model, progress=global_step / max_steps)  # doctest: +SKIP
    ```
    """
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"`progress` must be the fraction of training done, in [0, 1]; got {progress}.")
    config = getattr(model, "hf_lorafa_config", None)
    for module in model.modules():
        if isinstance(module, LaMDALayer):
            module.restore_frozen_columns()
            module.set_frozen_columns(
                frozen_columns_at(progress, module.r, config.lamda_freeze_fraction, config.lamda_freeze_order)
            )
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def spectrum_scores(weights: dict[str, torch.Tensor], r: int) -> dict[str, float]:
    """Per layer, the normalized share of spectral energy outside the top-r singular directions."""
    scores = {}
    for name, weight in weights.items():
        sigma = torch.linalg.svdvals(weight.detach().float())
        energy = sigma.square()
        scores[name] = float(1.0 - energy[:r].sum() / energy.sum().clamp_min(1e-30))
    return scores


def lamda_plus_plus_ranks(
    weights: dict[str, torch.Tensor], r: int, budget: int | None = None, min_rank: int = 2
) -> dict[str, int]:
    """LaMDA++ ranks: proportional to each layer's spectrum score, ≥ `min_rank`, summing exactly to `budget`.

    Example:

    ```python
    >>> import torch
    >>> peaked = torch.diag(torch.tensor([9.0] + [0.1] * 7))
    >>> ranks = lamda_plus_plus_ranks({"a": torch.eye(8), "b": peaked}, r=2, min_rank=1)
    >>> ranks, sum(ranks.values())  # the flat spectrum gets more rank than the peaked one
    ({'a': 3, 'b': 1}, 4)
    ```
    """
    names = list(weights)
    budget = budget if budget is not None else r * len(names)
    caps = {n: min(weights[n].shape) for n in names}
    if budget < min_rank * len(names) or budget > sum(caps.values()):
        raise ValueError(
            f"`lamda_rank_budget`={budget} cannot be split over {len(names)} layers with at least {min_rank} each "
            f"and at most their size; use a budget between {min_rank * len(names)} and {sum(caps.values())}."
        )
    scores = spectrum_scores(weights, r)
    ranks = {n: min_rank for n in names}
    # Water-filling: hand out the rest in proportion to the scores, never past a layer's size.
    remaining = budget - min_rank * len(names)
    while remaining > 0:
        open_layers = [n for n in names if ranks[n] < caps[n]]
        total = sum(scores[n] for n in open_layers) or float(len(open_layers))
        shares = {n: remaining * ((scores[n] / total) if total else 1.0 / len(open_layers)) for n in open_layers}
        grants = {n: min(int(shares[n]), caps[n] - ranks[n]) for n in open_layers}
        leftover = remaining - sum(grants.values())
        by_remainder = sorted(open_layers, key=lambda n: shares[n] - int(shares[n]), reverse=True)
        for n in by_remainder:
            if leftover == 0:
                break
            if ranks[n] + grants[n] < caps[n]:
                grants[n] += 1
                leftover -= 1
        for n, g in grants.items():
            ranks[n] += g
        remaining = budget - sum(ranks.values())
    return ranks
