"""LoRA and LoRA-FA on a parameter rather than a linear layer: the stacked expert weights of Mixture-of-Experts models.

transformers keeps an MoE block's experts as parameters of shape `(num_experts, out, in)` (Qwen3-MoE, Mixtral; the
experts module says `is_transposed` for `(num_experts, in, out)`, as gpt-oss) and multiplies by them in its own code,
so there is no linear layer to wrap. As PEFT's `target_parameters` (`lora.ParamWrapper`), the adapter wraps the module
that holds the parameter and, for the length of that module's forward, gives it `W_e + s·B_e A_e` for every expert e
in place of W (`torch.func.functional_call`). Same tensors, layout and key names as PEFT, so state dicts map 1:1:
expert e's A is rows `e·r … e·r+r−1` of `lora_A.weight` (r·E × in), its B the columns `e, E+e, 2E+e, …` of
`lora_B.weight` (out × r·E), and a module's second targeted parameter nests a wrapper in the first
(`experts.base_layer`).

Memory: the model's own product with `W + ΔW` keeps, for backward, its input (the routed tokens at full width) and
`W + ΔW` (the size of the adapted expert weights). LoRA-FA's r-wide saving (`FrozenAAdapterFunction`) needs the
adapter to own the product `x Wᵀ`; here the model's code owns it, so LoRA-FA on an expert parameter freezes A and
corrects B's gradient (v2) but keeps what LoRA keeps, and the memory estimator counts it so.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import A_ROW_NORM, AdapterLayer, adapter_dtype


class _RightMultiplyGrad(torch.autograd.Function):
    """Identity in forward; in backward the gradient of each expert's B is right-multiplied by its `(A Aᵀ)⁻¹ / s²`."""

    @staticmethod
    def forward(ctx, b: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(transform)
        return b.view_as(b)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (transform,) = ctx.saved_tensors
        return grad @ transform.to(grad.dtype), None


class ParamAdapter(AdapterLayer):
    """A LoRA (`train_a=True`) or LoRA-FA adapter on parameter `parameter_name` of `base_layer` (or of the module a
    nested `ParamAdapter` wraps): a 2-D `(out, in)` weight or a 3-D stack of experts' weights."""

    def __init__(
        self,
        base_layer: nn.Module,
        parameter_name: str,
        r: int,
        alpha: float,
        *,
        train_a: bool,
        gradient_correction: bool = True,
    ) -> None:
        nn.Module.__init__(self)  # the in/out features come from the parameter, not from a linear base layer
        self.base_layer, self.parameter_name = base_layer, parameter_name
        weight = self.weight
        if weight.dim() not in (2, 3):
            raise ValueError(
                f"`target_parameters` selected {parameter_name!r} of shape {tuple(weight.shape)}; adapters fit 2-D "
                "weights and 3-D stacks of expert weights."
            )
        self.transposed = self.is_transposed(weight, self.holder)
        self.in_features, self.out_features, self.num_experts = self.dims(weight, self.holder)
        if not 0 < r <= min(self.in_features, self.out_features):
            raise ValueError(
                f"`r`={r} does not fit {parameter_name!r} ({self.in_features}→{self.out_features} per expert); use a "
                f"rank between 1 and {min(self.in_features, self.out_features)}."
            )
        self.r, self.scaling, self.dropout = r, alpha / r, 0.0
        kwargs = {"bias": False, "device": weight.device, "dtype": adapter_dtype(self)}
        self.lora_A = nn.Linear(self.in_features, r * self.num_experts, **kwargs)
        self.lora_B = nn.Linear(r * self.num_experts, self.out_features, **kwargs)
        self.lora_A.weight.requires_grad_(train_a)
        self.gradient_correction = gradient_correction and not train_a
        self.register_buffer("lorafa_precondition", None, persistent=False)

    @staticmethod
    def is_transposed(weight: torch.Tensor, holder: nn.Module) -> bool:
        """Whether a stack of experts is stored `(E, in, out)`: transformers' experts modules say so (gpt-oss)."""
        return weight.dim() == 3 and bool(getattr(holder, "is_transposed", False))

    @classmethod
    def dims(cls, weight: torch.Tensor, holder: nn.Module) -> tuple[int, int, int]:
        """`(in_features, out_features, num_experts)` of parameter `weight` of module `holder` (experts: 1 for 2-D)."""
        out_dim, in_dim = (-1, -2) if cls.is_transposed(weight, holder) else (-2, -1)
        return weight.shape[in_dim], weight.shape[out_dim], weight.shape[0] if weight.dim() == 3 else 1

    @property
    def holder(self) -> nn.Module:
        """The model's own module that holds the parameter, below any nested adapters."""
        module = self.base_layer
        while isinstance(module, ParamAdapter):
            module = module.base_layer
        return module

    @property
    def weight(self) -> torch.Tensor:
        """The adapted parameter as the model stores it (without the adapter)."""
        return getattr(self.holder, self.parameter_name)

    @property
    def bias(self) -> None:
        return None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert's `B_e (E×out×r)` and `A_e (E×r×in)`, B's gradient preconditioned for LoRA-FA."""
        a = self.lora_A.weight.reshape(self.num_experts, self.r, self.in_features)
        b = self.lora_B.weight.reshape(self.out_features, self.r, self.num_experts).permute(2, 0, 1)
        if self.lorafa_precondition is not None and self.lora_B.weight.requires_grad:
            b = _RightMultiplyGrad.apply(b, self.lorafa_precondition)
        return b, a

    def _lhs_rhs(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        b, a = self.factors()
        lhs, rhs = (a.transpose(1, 2), b.transpose(1, 2)) if self.transposed else (b, a)
        return lhs.to(dtype), rhs.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """`s · B_e A_e` for every expert, shaped as the parameter."""
        return (self.scaling * torch.bmm(*self._lhs_rhs(self.lora_A.weight.dtype))).reshape(self.weight.shape)

    def forward(self, *args, **kwargs):
        weight = self.weight
        # One fused `W + s·lhs @ rhs` (as PEFT's `_LoraFactorsProxy`): no second expert-sized tensor for ΔW alone.
        with torch.autocast(device_type=weight.device.type, enabled=False):
            stacked = weight.reshape(self.num_experts, *weight.shape[-2:])
            adapted = torch.baddbmm(stacked, *self._lhs_rhs(weight.dtype), alpha=self.scaling).view_as(weight)
        path, module = self.parameter_name, self.base_layer
        while isinstance(module, ParamAdapter):
            path, module = f"base_layer.{path}", module.base_layer
        return torch.func.functional_call(self.base_layer, {path: adapted}, args, kwargs)

    def init_lora(self, seed: int) -> None:
        """Each expert's A with orthonormal rows of PEFT's scale (`A_e A_eᵀ = I/3`), B = 0: unchanged at the start."""
        generator = torch.Generator().manual_seed(seed)
        shape = (self.num_experts, self.in_features, self.r)
        q, _ = torch.linalg.qr(torch.randn(*shape, generator=generator, dtype=torch.float64))
        with torch.no_grad():
            self.lora_A.weight.copy_(q.transpose(1, 2).reshape(-1, self.in_features) * A_ROW_NORM)
            self.lora_B.weight.zero_()
        self.refresh_preconditioner()

    def load_peft_weights(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        super().load_peft_weights(lora_A, lora_B)
        self.refresh_preconditioner()

    def refresh_preconditioner(self) -> None:
        """LoRA-FA v2's `(A_e A_eᵀ)⁻¹ / s²` per expert, after A is set (init or load)."""
        if not self.gradient_correction:
            self.lorafa_precondition = None
            return
        a = self.lora_A.weight.detach().double().reshape(self.num_experts, self.r, self.in_features)
        precondition = torch.linalg.pinv(a @ a.transpose(1, 2)) / self.scaling**2
        self.lorafa_precondition = precondition.to(self.lora_A.weight.dtype)

    def merged_base(self) -> nn.Module:
        """Fold the adapter into the parameter and return the module it wrapped (`merge_adapters`)."""
        weight = self.weight
        delta = self.delta_weight().detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32)
        with torch.no_grad():
            weight.data = (weight.detach().to(delta.dtype) + delta).to(weight.dtype)
        return self.base_layer

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}, {super().extra_repr()}"
