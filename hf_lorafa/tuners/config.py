"""The one configuration shared by LoRA, LoRA-FA, LaMDA and LaMDA++."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

METHODS = ("lora", "lorafa", "lamda", "lamda++")  # each described in full by `hf_lorafa.tuners.methods.METHODS`
# Adapter parameters keep PEFT's `lora_` prefix (lora_A, lora_B, LaMDA's lora_S): state dicts map 1:1 to PEFT's.
ADAPTER_PREFIX = "lora_"
Method = Literal["lora", "lorafa", "lamda", "lamda++"]
LAMDA_INITS = ("residual", "svd", "published", "identity", "spectral")
FROZEN_A_INITS = ("random", "gradient", "activations")


def is_adapter_tensor(name: str) -> bool:
    """Whether parameter or state-dict key `name` (`…q_proj.lora_B.weight`) belongs to an adapter."""
    return ADAPTER_PREFIX in name


@dataclass
class LoRAFAConfig:
    r"""
    Configuration of the adapters that [`inject_adapters`] puts into a model.

    Args:
        method (`str`, *optional*, defaults to `"lorafa"`):
            `"lora"` (A and B trained), `"lorafa"` (A frozen, only B trained, r values per token kept for
            backward), `"lamda"` (frozen A, trained r×r core `lora_S`, B frozen early in training) or
            `"lamda++"` (LaMDA with per-layer ranks from each weight's spectrum).
        r (`int`, *optional*, defaults to `16`):
            Adapter rank; for LaMDA++ the mean rank (the total budget is `r` × adapted layers by default). LoRA-FA
            at twice a LoRA's rank (alpha likewise) has about that LoRA's trainable parameters and matched its
            accuracy in BENCHMARKS.md, while its backward still keeps `r` values a token per layer instead of the
            input.
        alpha (`float`, *optional*, defaults to `32`):
            Scaling numerator: the adapter's output is multiplied by `alpha / r`.
        dropout (`float`, *optional*, defaults to `0.0`):
            Dropout on the adapter's input. LoRA-FA and LaMDA regenerate the mask in backward instead of keeping it.
        target_modules (`str` or `list[str]`, *optional*, defaults to `"all-linear"`):
            `"all-linear"` (every linear layer but the output head), a list of module names (matched on the full
            name or its last dotted parts, as PEFT does) or a regular expression matched on full module names.
        modules_to_save (`list[str]`, *optional*):
            Extra modules trained in full and saved with the adapter (e.g. a classification head), as in PEFT.
        lorafa_gradient_correction (`bool`, *optional*, defaults to `True`):
            LoRA-FA v2: precondition B's gradient by `(A Aᵀ)⁻¹ / s²` so the update matches full fine-tuning's
            projected onto A's row space.
        lorafa_lr_ratio (`float`, *optional*, defaults to `4.0`):
            Learning-rate multiplier of LoRA-FA's `lora_B`, applied by the trainer's optimizer. A frozen A removes
            half of LoRA's update directions (LoRA's A moves as far as its B in a short run); a larger step on B
            recovers the pace. Chosen on the main job's budget (chatterbot, 40 steps, 3 seeds; BENCHMARKS.md): at
            1.0 LoRA-FA ends 37% above LoRA's held-out loss, at 2.0 8% above, at 4.0 14% below it. On drug-review
            (MiniLM, 8 epochs, 8 seeds) 1.0, 2.0 and 4.0 all end 1.3-1.7 accuracy points below LoRA at the same r;
            at twice LoRA's r (about the same trainable parameters) LoRA-FA at 4.0 is within 0.4 points of LoRA, at
            1.0 still 2.1 points below it (3 seeds); PEFT's LoRA-FA optimizer at that rank 1.5 (8 seeds).
        lamda_freeze_fraction (`float`, *optional*, defaults to `0.75`):
            Fraction of the total training steps over which LaMDA's B (PMB) is frozen, column by column; after it
            only S (r² per layer) trains. Chosen by BENCHMARKS.md's LaMDA ablation: on chatterbot at the main job's
            defaults (40 steps) 0.1 leaves B training only during the warmup and LaMDA ends 65% above LoRA's
            held-out loss, 0.25 17% above, 0.5 level with LoRA and 0.75 14% below it (3 seeds); on drug-review
            (MiniLM, 304 steps) 0.75 raises macro-F1 over 0.5 on every seed (the S-only part of a run hardly lowers
            the training loss).
        lamda_freeze_order (`str`, *optional*, defaults to `"ascending"`):
            Order in which B's columns freeze: `"ascending"` singular value first (the least important directions
            stop moving first), or `"all"` (the whole of B at the end of the freezing window). With `"all"`,
            `lamda_init="identity"`, `lamda_lr_ratio=4` and `lamda_s_lr_ratio=0.25` at twice LoRA's r, LaMDA is LoRA-FA
            at that rank until the window's end and S alone after it: level with LoRA's accuracy and macro-F1 on
            drug-review (gaps +0.1 and -0.1 points, 8 seeds), 22% below its held-out loss on chatterbot (3 seeds;
            BENCHMARKS.md). The spectral init at 2r with B whole scores lower.
        lamda_init (`str`, *optional*, defaults to `"spectral"`):
            How LaMDA starts (`hf_lorafa/tuners/lamda.py` says which parts are the paper's): `"spectral"` (A random and
            orthonormal as LoRA-FA's; B = U_r, S = diag(σ_r)/s from W's SVD, with C = B S taken off inside the
            adapter so the output starts unchanged: S and B both get gradient from the first step), `"residual"`
            (the same over A = V_rᵀ, so that C A is W's principal part), `"svd"` (A = V_rᵀ, B = U_r·diag(σ_r),
            S = 0: B gets no gradient until S moves), `"published"` (the authors' code: random orthonormal A,
            B = 0, S at nn.Linear's default init) or `"identity"` (the published A and B = 0 with S = I: B's window
            trains exactly as LoRA-FA). Chosen by BENCHMARKS.md's ablation: `"residual"` and `"spectral"` reach
            LoRA's held-out loss on chatterbot, `"identity"` ends 16% above it; on drug-review (MiniLM) W's top-r
            right singular vectors are a poor frozen A (seed 0 stays at the class prior with them).
        lamda_lr_ratio (`float`, *optional*, defaults to `1.0`):
            Learning-rate multiplier of LaMDA's `lora_S` and `lora_B`, applied by the trainer's optimizer. With the
            spectral init a step on B's column i already moves W σ_i/s times as far as LoRA-FA's: on drug-review
            (MiniLM) B at 2x or 4x (S at 1x) and S and B at 0.5x all score below 1.0 (BENCHMARKS.md).
        lamda_s_lr_ratio (`float`, *optional*, defaults to `1.0`):
            Further learning-rate multiplier of LaMDA's r×r core `lora_S` alone (S trains at `lamda_lr_ratio` ×
            `lamda_s_lr_ratio` × the learning rate). An Adam step on one of S's r² entries moves W along one rank-1
            direction `B_i A_jᵀ`, a step on B's column i moves all of its d_out entries at once: once B is frozen,
            S's steps at the same rate change W far less than LoRA's do.
        frozen_a_init (`str`, *optional*, defaults to `"random"`):
            The frozen A of LoRA-FA, LaMDA and LaMDA++: `"random"` (orthonormal rows from `init_seed`), `"gradient"`
            (the top-r right singular vectors of each layer's gradient `Σ g xᵀ` over the first 4 training batches) or
            `"activations"` (the top-r principal directions of each layer's inputs over them), each row scaled to a
            random row's output scale; set by the trainer before the first step (`hf_lorafa/tuners/calibration.py`;
            outside it, `init_frozen_a_from_data`). With LaMDA it replaces the random A of `lamda_init`
            `"spectral"`, `"identity"` or `"published"`. Measured in BENCHMARKS.md ("The frozen A: random, or from
            the training data").
        lamda_rank_budget (`int`, *optional*):
            LaMDA++ total rank over all adapted layers; defaults to `r` × the number of adapted layers.
        lamda_min_rank (`int`, *optional*, defaults to `2`):
            Smallest rank LaMDA++ gives a layer.
        init_seed (`int`, *optional*, defaults to `0`):
            Seed of A's random orthonormal initialisation (LoRA / LoRA-FA), so the same config gives the same A.

    Example:

    ```python
    >>> from hf_lorafa import LoRAFAConfig
    >>> LoRAFAConfig(method="lorafa", r=8, target_modules=["q_proj", "v_proj"]).scaling
    4.0
    ```
    """

    method: Method = "lorafa"
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] | None = None
    lorafa_gradient_correction: bool = True
    lorafa_lr_ratio: float = 4.0
    lamda_freeze_fraction: float = 0.75
    lamda_freeze_order: Literal["ascending", "all"] = "ascending"
    lamda_init: Literal["residual", "svd", "published", "identity", "spectral"] = "spectral"
    lamda_lr_ratio: float = 1.0
    lamda_s_lr_ratio: float = 1.0
    frozen_a_init: Literal["random", "gradient", "activations"] = "random"
    lamda_rank_budget: int | None = None
    lamda_min_rank: int = 2
    init_seed: int = 0
    # Filled in by injection: per-layer ranks (LaMDA++, or a loaded PEFT adapter with a rank_pattern).
    rank_pattern: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {', '.join(METHODS)}; got {self.method!r}.")
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            raise TypeError(f"`r` must be an int (the adapter rank); got {type(self.r).__name__}.")
        if self.r <= 0:
            raise ValueError(f"`r` must be a positive rank such as 8 or 16; got {self.r}.")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"`alpha` must be a positive number (scaling = alpha / r); got {self.alpha!r}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout}.")
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                try:
                    re.compile(self.target_modules)
                except re.error as err:
                    raise ValueError(
                        f"`target_modules` is neither 'all-linear' nor a valid regular expression: {err}; "
                        "pass a list of module names such as ['q_proj', 'v_proj'] instead."
                    ) from None
        elif not (isinstance(self.target_modules, (list, tuple)) and self.target_modules):
            raise TypeError(
                "`target_modules` must be 'all-linear', a non-empty list of module names or a regex string; "
                f"got {self.target_modules!r}."
            )
        else:
            self.target_modules = list(self.target_modules)
        if self.lorafa_lr_ratio <= 0:
            raise ValueError(
                f"`lorafa_lr_ratio` must be positive (1.0 = LoRA's learning rate); got {self.lorafa_lr_ratio}."
            )
        if not 0.0 <= self.lamda_freeze_fraction <= 1.0:
            raise ValueError(
                f"`lamda_freeze_fraction` must be a fraction of training in [0, 1]; got {self.lamda_freeze_fraction}."
            )
        if self.lamda_freeze_order not in ("ascending", "all"):
            raise ValueError(f"`lamda_freeze_order` must be 'ascending' or 'all'; got {self.lamda_freeze_order!r}.")
        if self.lamda_init not in LAMDA_INITS:
            raise ValueError(f"`lamda_init` must be one of {', '.join(LAMDA_INITS)}; got {self.lamda_init!r}.")
        if self.lamda_lr_ratio <= 0:
            raise ValueError(f"`lamda_lr_ratio` must be positive (1.0 = the learning rate); got {self.lamda_lr_ratio}")
        if self.lamda_s_lr_ratio <= 0:
            raise ValueError(
                f"`lamda_s_lr_ratio` must be positive (1.0 = S at B's learning rate); got {self.lamda_s_lr_ratio}"
            )
        if self.frozen_a_init not in FROZEN_A_INITS:
            raise ValueError(
                f"`frozen_a_init` must be one of {', '.join(FROZEN_A_INITS)}; got {self.frozen_a_init!r}."
            )
        if self.frozen_a_init != "random" and self.method == "lora":
            raise ValueError(
                f"`frozen_a_init={self.frozen_a_init!r}` sets the frozen A of method 'lorafa', 'lamda' or 'lamda++'; "
                "LoRA trains its A. Use frozen_a_init='random' with method='lora'."
            )
        if self.frozen_a_init != "random" and self.method != "lorafa" and self.lamda_init in ("residual", "svd"):
            raise ValueError(
                f"`lamda_init={self.lamda_init!r}` takes A from W's singular vectors, so "
                f"`frozen_a_init={self.frozen_a_init!r}` cannot set it; use lamda_init='spectral', 'identity' or "
                "'published' with it."
            )
        if self.lamda_rank_budget is not None and self.lamda_rank_budget <= 0:
            raise ValueError(
                f"`lamda_rank_budget` must be a positive total rank or None; got {self.lamda_rank_budget}."
            )
        if self.lamda_min_rank <= 0:
            raise ValueError(f"`lamda_min_rank` must be at least 1; got {self.lamda_min_rank}.")

    @property
    def scaling(self) -> float:
        """`alpha / r`, the adapter output's multiplier at the config's rank."""
        return self.alpha / self.r

    def rank_for(self, name: str) -> int:
        """The rank of the adapter on module `name` (LaMDA++ and loaded PEFT adapters may vary it)."""
        return self.rank_pattern.get(name, self.r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoRAFAConfig:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)
