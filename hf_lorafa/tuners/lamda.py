"""LaMDA and LaMDA++: spectrally initialised low-dimensional adaptation.

Azizi, Kundu & Pedram, 2024, "LaMDA: Large Model Fine-Tuning via Spectrally Decomposed Low-Dimensional
Adaptation" (arXiv:2406.12832). What is the paper's and what is ours:

- §3.1 (the paper's): `y = W x + s·B S A x` with the projection matrix A (PMA, r×d_in) frozen, a trained r×r
  low-dimensional adapter S, and the projection matrix B (PMB, d_out×r) trained only early on. The paper's text takes
  the projections "from singular vectors" of W; its published code instead uses a random frozen A, B = 0 and S at
  nn.Linear's default init, with no SVD.
- Initialisation, `lamda_init` (ours):
  - `"spectral"` (default): A random with orthonormal rows (as in the published code and LoRA-FA), B = U_r
    (orthonormal columns), S = diag(σ_r)/s from W's SVD. The adapter subtracts C = B₀S₀ (`FrozenAAdapterFunction`'s
    `offset`, a frozen d_out×r buffer), so its output at step 0 is zero and the model is the base model, while
    B's gradient `s·gᵀ(S z)` and S's `s·(gB)ᵀz` are both non-zero from the first step. The stored base weight,
    dense or 4-/8-bit, never changes. The export folds C in exactly: PEFT's B' = B S − C over the same A (rank r).
  - `"residual"`: as `"spectral"` over A = V_rᵀ, so that C A = U_r Σ_r V_rᵀ is W's principal part and the model
    is the residual base W − U_r Σ_r V_rᵀ plus a trained principal adapter, the way PiSSA (Meng et al., 2024)
    starts LoRA.
  - `"svd"`: A = V_rᵀ, B = U_r·diag(σ_r), S = 0. B's gradient is exactly zero while S ≈ 0.
  - `"published"`: the authors' code: A random with orthonormal rows, B = 0, S at nn.Linear's default init.
  - `"identity"`: the published A and B = 0 with S = I, so that while B trains its update is exactly LoRA-FA's
    (`s·g zᵀ`) and S takes over the directions B learned.
  Why the default, and how the inits compare: research/design-notes.md.
- `lamda_lr_ratio` / `lamda_s_lr_ratio` (ours): S and B at a multiple of the learning rate, and S alone at a further
  multiple (one of S's r² entries carries a single rank-1 direction `B_i A_jᵀ` of W, one of B's columns d_out entries).
- §3.2 (the paper's): PMB is frozen gradually during early training, so that afterwards only S (r² per layer)
  trains. The window (`lamda_freeze_fraction` of the total steps, default the first three quarters) and the order
  are ours: with `"ascending"`, B's columns freeze one by one from the smallest singular value up (for `"published"`
  and `"identity"`, from the last), linearly in progress; `"all"` freezes B whole at the window's end.
- The frozen A from the training data (ours, experimental, `frozen_a_init`, `tuners/calibration.py`) replaces the
  random A of `"spectral"`, `"identity"` or `"published"`.
- §3.3 (LaMDA++): ranks per layer from a "normalized spectrum analysis" of each W, singular values only. The rule is
  our reading: a layer's score is the share of its energy (Σσ²) *outside* its top-r directions at the mean rank r,
  so layers whose top singular values hold less of the energy get more rank. Ranks are proportional to the score,
  at least `lamda_min_rank`, and sum exactly to the budget (largest-remainder rounding).

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

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, init: str = "spectral"
    ) -> None:
        super().__init__(base_layer, r, alpha, dropout)
        self.lamda_init = init
        self.lora_S = nn.Linear(r, r, bias=False, device=self.lora_A.weight.device, dtype=self.lora_A.weight.dtype)
        self.lora_A.weight.requires_grad_(False)
        # 1 = column of B still trains; B's columns are in decreasing singular-value order.
        self.register_buffer("lamda_column_mask", torch.ones(1, r, dtype=self.lora_A.weight.dtype), persistent=False)
        self.register_buffer("lamda_frozen_B", None, persistent=False)
        # The principal part C = B₀S₀ the residual init takes off the base; recomputed from W, so not saved.
        self.register_buffer("lamda_offset", None, persistent=False)

    def init_lora(self, seed: int) -> None:
        if self.lamda_init == "identity":
            super().init_lora(seed)  # LoRA-FA's A and B = 0
            with torch.no_grad():
                self.lora_S.weight.copy_(torch.eye(self.r))
            return
        if self.lamda_init == "published":
            super().init_lora(seed)
            generator = torch.Generator().manual_seed(seed + 1)
            bound = 1.0 / math.sqrt(self.r)  # nn.Linear's default (kaiming-uniform, a=√5) for an r×r weight
            with torch.no_grad():
                self.lora_S.weight.copy_(torch.rand(self.r, self.r, generator=generator) * 2 * bound - bound)
            return
        weight = base_weight(self.base_layer).detach().double()
        u, sigma, vh = torch.linalg.svd(weight, full_matrices=False)
        u, sigma = u[:, : self.r], sigma[: self.r]
        with torch.no_grad():
            if self.lamda_init == "spectral":
                super().init_lora(seed)  # A random (LoRA-FA's); B and S from W's spectrum below
            else:
                self.lora_A.weight.copy_(vh[: self.r])
            if self.lamda_init == "svd":
                self.lora_B.weight.copy_(u * sigma)
                self.lora_S.weight.zero_()
                return
            self.lora_B.weight.copy_(u)
            self.lora_S.weight.copy_(torch.diag(sigma / self.scaling))
            self.lamda_offset = (u * (sigma / self.scaling)).to(self.lora_B.weight.dtype)

    def folded_B(self, lora_B: torch.Tensor, lora_S: torch.Tensor) -> torch.Tensor:
        """`B S − C`: with A, the whole adapter, as PEFT's `lora_B` over the original base."""
        folded = lora_B @ lora_S
        return folded if self.lamda_offset is None else folded - self.lamda_offset

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.folded_B(self.lora_B.weight, self.lora_S.weight) @ self.lora_A.weight)

    def peft_weights(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        # Folded on save: B' = B S − C, so PEFT's `s·B'A` over the original W is exactly this adapter.
        t = tensors or self.adapter_tensors()
        return {
            "lora_A.weight": t["lora_A.weight"],
            "lora_B.weight": self.folded_B(t["lora_B.weight"], t["lora_S.weight"]),
        }

    def load_peft_weights(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """A folded adapter resumes as S = I over B' = B S, with B frozen: only S trains, as after the schedule."""
        super().load_peft_weights(lora_A, lora_B)
        self.lamda_offset = None  # a folded adapter already holds the principal part it took off the base
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
            self.lamda_offset,
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
