"""Adapter layers that wrap a frozen `base_layer`, and the one memory-saving autograd function.

LoRA-FA (Zhang et al., 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning", arXiv:2308.03303, §3) freezes the projection-down A, so the gradient of B needs only `z = A·x`
(Eq. 4) and the input gradient needs only the weights (Eq. 5): the full-rank input is never kept for backward.
`FrozenAAdapterFunction` implements exactly that for any base kind (nn.Linear, transformers' Conv1D, bitsandbytes
4-bit and 8-bit) and is shared by LoRA-FA and LaMDA (which adds a trained r×r core S between A and B).
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import ADAPTER_PREFIX
from .quantization import dequantize_weight, is_bnb_layer

# PEFT's default A (kaiming-uniform, a=√5) has rows of squared norm 1/3; our orthonormal A keeps that scale.
A_ROW_NORM = 1.0 / math.sqrt(3.0)


def is_fan_in_fan_out(base_layer: nn.Module) -> bool:
    """Whether the base stores its weight transposed, `(in_features, out_features)`: transformers' `Conv1D` (GPT-2's
    family), what PEFT calls `fan_in_fan_out`. Adapters are the same either way; only reading W differs."""
    return isinstance(base_layer, Conv1D)


def layer_features(base_layer: nn.Module) -> tuple[int, int]:
    """`(in_features, out_features)` of a base layer of any kind."""
    if is_fan_in_fan_out(base_layer):
        return base_layer.nx, base_layer.nf
    return base_layer.in_features, base_layer.out_features


def base_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as a dense `(out_features, in_features)` tensor; quantized kinds are dequantized and
    a Conv1D's weight is read transposed (a view).

    This is the only place the autograd function, merge and LaMDA's spectrum read a base weight, so every base kind
    plugs in here.
    """
    if is_bnb_layer(base_layer):
        return dequantize_weight(base_layer)
    return base_layer.weight.t() if is_fan_in_fan_out(base_layer) else base_layer.weight


def adapter_dtype(base_layer: nn.Module) -> torch.dtype:
    """Adapters stay in fp32 over half-precision or quantized bases (as PEFT's `autocast_adapter_dtype`)."""
    weight = getattr(base_layer, "weight", None)
    if weight is not None and weight.dtype in (torch.float32, torch.float64):
        return weight.dtype
    return torch.float32


MASK_GENERATORS = ("sfc64", "torch")


def keep_mask(
    shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype, generator: str | None = None
) -> torch.Tensor:
    """Dropout's keep decisions (bool, True = kept) for `seed`: the same call in backward regenerates the forward's.

    On CPU (numpy's SFC64) an element is dropped with probability `round(p · 2³²) / 2³²`, decided from one random
    byte against the threshold's top byte and, in the 1/256 of elements that tie, 24 more random bits against its
    low bits: the distribution of a 32-bit comparison at a quarter of the random words. On GPUs torch's seeded
    `bernoulli_` (Philox) in `dtype`. Both are pure functions of `seed`; `generator` ("sfc64" or "torch") overrides
    the choice.
    """
    if generator not in (None, *MASK_GENERATORS):
        raise ValueError(f"`generator` must be one of {', '.join(MASK_GENERATORS)} or None; got {generator!r}.")
    if (generator or ("sfc64" if device.type == "cpu" else "torch")) == "sfc64":
        n = math.prod(shape)
        threshold = round(p * 2**32)
        high, low = threshold >> 24, threshold & 0xFFFFFF
        words = np.random.SFC64(seed)
        first = words.random_raw((n + 7) // 8).view(np.uint8)[:n]
        keep = first > high
        ties = np.flatnonzero(first == high)
        keep[ties] = (words.random_raw(ties.size) & 0xFFFFFF) >= low
        return torch.from_numpy(keep).view(shape).to(device)
    draws = torch.Generator(device=device)
    draws.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=draws).bool()


def dropout_mask(
    shape: torch.Size, p: float, seed: int, device: torch.device, dtype: torch.dtype, generator: str | None = None
) -> torch.Tensor:
    """The inverted-dropout mask for `seed` (`keep_mask` as 0 or `1 / (1 − p)` in `dtype`)."""
    return keep_mask(shape, p, seed, device, dtype, generator).to(dtype).mul_(1.0 / (1.0 - p))


class _ReplayedMasks:
    """Keep decisions drawn by a forward that runs inside a backward (a checkpoint's replay), for the backward of the
    same adapter call that follows it, which would otherwise draw them a third time.

    Keyed by seed; an entry is taken by the first backward that asks for its seed. Entries of an earlier backward
    that never reached them (an error, or an adapter whose backward needs no mask) are dropped when another backward
    stores one, so at most one backward's worth is ever held.
    """

    def __init__(self) -> None:
        self.task, self.masks = -1, {}

    def store(self, seed: int, mask: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task == -1:  # a forward outside any backward: its own backward regenerates the mask
            return
        if task != self.task:
            self.task, self.masks = task, {}
        self.masks[seed] = mask

    def take(self, seed: int) -> torch.Tensor | None:
        return self.masks.pop(seed, None)


_REPLAYED_MASKS = _ReplayedMasks()


class _TokenLayout:
    """The real tokens of the padded batch in training now (`dropout_follows_tokens`): a bool `(batch, length)` mask
    and its count, or None."""

    def __init__(self) -> None:
        self.real, self.count = None, 0

    def of(self, x: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """`(mask, count)` where `x` is one `d_in`-wide vector per position of that batch; else None."""
        return (self.real, self.count) if self.real is not None and x.shape[:-1] == self.real.shape else None


_TOKEN_LAYOUT = _TokenLayout()


@contextlib.contextmanager
def dropout_follows_tokens(real: torch.Tensor | None):
    """Inside it, an adapter call over a padded batch draws dropout for its real tokens only, as one row of them.

    `real` is the batch's `(batch, length)` mask of real tokens (its `attention_mask`, as bool). An adapter input of
    shape `(batch, length, d_in)` then gets, for the tokens where `real` is True in row-major order, the mask a
    `(1, tokens, d_in)` input draws for the same seed, and every padding position is dropped whole (its output is
    attended by no real token and its label is ignored). A padded batch thus sees the masks of its padding-free form
    (module `training.padding_free`), token for token. None leaves every draw as it is. LoRA-FA and LaMDA adapters
    read it (`FrozenAAdapterFunction`); `LoRAFATrainer` sets it around each training step of a padded batch.
    """
    saved = _TOKEN_LAYOUT.real, _TOKEN_LAYOUT.count
    _TOKEN_LAYOUT.real = None if real is None else real.bool()
    _TOKEN_LAYOUT.count = 0 if real is None else int(_TOKEN_LAYOUT.real.sum())
    try:
        yield
    finally:
        _TOKEN_LAYOUT.real, _TOKEN_LAYOUT.count = saved


def _keep_for(
    shape: torch.Size,
    p: float,
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
    layout: tuple[torch.Tensor, int] | None,
) -> torch.Tensor:
    """`keep_mask`, or with a token layout (`dropout_follows_tokens`) the real tokens' draws and padding dropped."""
    if layout is None:
        return keep_mask(shape, p, seed, device, dtype)
    real, count = layout
    keep = torch.zeros(shape, dtype=torch.bool, device=device)
    keep[real] = keep_mask(torch.Size((count, shape[-1])), p, seed, device, dtype)
    return keep


def _common_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The widest dtype among the adapter's tensors: the one its products run in outside autocast.

    Adapters are fp32 (`adapter_dtype`), but a trainer may cast the trained ones (TRL casts QLoRA adapters to bf16)
    while the frozen A stays fp32; every product then runs in the wider dtype and each gradient is cast back to its
    parameter's dtype by autograd.
    """
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors if t is not None])


def _dropout_scaled(lora_A: torch.Tensor, p: float) -> torch.Tensor:
    """A with inverted dropout's `1 / (1 − p)` folded in (r × d_in, cheaper than scaling the d_in-wide input)."""
    return lora_A * (1.0 / (1.0 - p)) if p > 0.0 else lora_A


def _add_products(out: torch.Tensor, products: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """`out += Σ a @ b` in place over the last dimension: one `addmm_` each (the sum accumulated inside the matrix
    product, no d_out-wide temporary) where the dtypes agree and autocast is off, else a product cast to `out`'s
    dtype and added."""
    flat = out.view(-1, out.shape[-1]) if out.is_contiguous() else None
    fused = flat is not None and not torch.is_autocast_enabled(out.device.type)
    for a, b in products:
        if fused and a.dtype == b.dtype == out.dtype:
            flat.addmm_(a.reshape(-1, a.shape[-1]), b)
        else:
            out += (a @ b).to(out.dtype)
    return out


class FrozenAAdapterFunction(torch.autograd.Function):
    """`y = base(x) + s · (B (S) − C) A dropout(x)` with A frozen, keeping only `z = A·dropout(x)` for backward.

    `offset` C (d_out×r, frozen, optional) is LaMDA's starting `B₀S₀`, so the adapter adds nothing at step 0 (for the
    residual init `s·C A` is W's principal part and `W − s·C A` the residual base, never stored): the base weight
    (dense or quantized) is left as it is.

    Backward: `dB = s·gᵀ(Sz)`, `dS = s·(gB)ᵀz`, `dx = Wᵀg + dropout'(Aᵀ Sᵀ s Bᵀg)` with W from `base_weight` and the
    dropout mask regenerated from a seed drawn in forward (an int on `ctx`, not a tensor; over a padded batch, with
    the batch's `(batch, length)` token mask, `dropout_follows_tokens`). Every other tensor saved goes through
    `ctx.save_for_backward`: z (r values per token) plus the adapter's own parameters and buffers.
    """

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, lora_S, b_grad_transform, base_layer, scaling, p, training, offset=None):
        with torch.no_grad():
            result = base_layer(x)
        dtype = _common_dtype(lora_A, lora_B, lora_S)
        h = x.to(dtype)
        seed = None
        if p > 0.0 and training:
            # Drawn from the global generator: reproducible under torch.manual_seed and replayed by checkpointing.
            seed = int(torch.randint(0, 2**62, (1,)).item())
            ctx.layout = _TOKEN_LAYOUT.of(h)
            keep = _keep_for(h.shape, p, seed, h.device, h.dtype, ctx.layout)
            _REPLAYED_MASKS.store(seed, keep)
            h = torch.where(keep, h, 0.0)
        z = h @ _dropout_scaled(lora_A.to(dtype), p if seed is not None else 0.0).t()
        u = z if lora_S is None else z @ lora_S.to(dtype).t()
        # The scaling goes on the (d_out × r) factors, not on the d_out-wide product, which is added to the base's
        # fresh output in place (inside the product where the dtypes allow).
        factors = [(u, (scaling * lora_B.to(dtype)).t())]
        if offset is not None:
            factors.append((z, (-scaling * offset.to(dtype)).t()))
        _add_products(result, factors)
        ctx.save_for_backward(z, lora_A, lora_B, lora_S, b_grad_transform, offset)
        ctx.base_layer, ctx.scaling, ctx.p, ctx.seed = base_layer, scaling, p, seed
        return result

    @staticmethod
    def backward(ctx, grad_out):
        z, lora_A, lora_B, lora_S, b_grad_transform, offset = ctx.saved_tensors
        keep = None if ctx.seed is None else _REPLAYED_MASKS.take(ctx.seed)
        # Under autocast the forward's products ran in half precision (z is bf16/fp16, and is kept so: half the
        # bytes); the parameter gradients are computed in the adapter's own dtype, as autograd does for LoRA.
        dtype = _common_dtype(lora_A, lora_B, lora_S)
        z, g, lora_A, lora_B = (t.to(dtype) for t in (z, grad_out, lora_A, lora_B))
        lora_S, b_grad_transform, offset = (
            None if t is None else t.to(dtype) for t in (lora_S, b_grad_transform, offset)
        )
        r = z.shape[-1]
        grad_x = grad_B = grad_S = None
        gu = g @ (ctx.scaling * lora_B)
        if ctx.needs_input_grad[2]:
            u = z if lora_S is None else z @ lora_S.t()
            grad_B = ctx.scaling * (g.reshape(-1, g.shape[-1]).t() @ u.reshape(-1, r))
            if b_grad_transform is not None:
                # (r×r) LoRA-FA v2 preconditioner, or a (1×r) LaMDA column mask: both right-multiply/scale columns.
                grad_B = grad_B @ b_grad_transform if b_grad_transform.shape[0] == r else grad_B * b_grad_transform
        if lora_S is not None and ctx.needs_input_grad[3]:
            grad_S = gu.reshape(-1, r).t() @ z.reshape(-1, r)
        if ctx.needs_input_grad[0]:
            gz = gu if lora_S is None else gu @ lora_S
            if offset is not None:
                gz = gz - ctx.scaling * (g @ offset)
            gh = gz @ _dropout_scaled(lora_A, ctx.p if ctx.seed is not None else 0.0)
            if ctx.seed is not None:
                if keep is None:
                    keep = _keep_for(gh.shape, ctx.p, ctx.seed, gh.device, gh.dtype, ctx.layout)
                # In place: gh is this call's own product (a second d_in-wide block would be one more allocation).
                gh = torch.where(keep, gh, gh.new_zeros(()), out=gh)
            # dx = Wᵀg + the adapter's part: the base's product is accumulated into the adapter's in place.
            weight = base_weight(ctx.base_layer).to(grad_out.dtype)
            grad_x = _add_products(gh.to(grad_out.dtype), [(grad_out, weight)])
        return grad_x, None, grad_B, grad_S, None, None, None, None, None, None, None


class AdapterLayer(nn.Module):
    """Common part of every adapter: the wrapped `base_layer`, `lora_A (r×d_in)`, `lora_B (d_out×r)`, scaling."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_features(base_layer)
        if not 0 < r <= min(self.in_features, self.out_features):
            raise ValueError(
                f"`r`={r} does not fit a {self.in_features}→{self.out_features} layer; "
                f"use a rank between 1 and {min(self.in_features, self.out_features)}."
            )
        self.r, self.scaling, self.dropout = r, alpha / r, dropout
        device = next(base_layer.parameters()).device
        kwargs = {"bias": False, "device": device, "dtype": adapter_dtype(base_layer)}
        self.lora_A = nn.Linear(self.in_features, r, **kwargs)
        self.lora_B = nn.Linear(r, self.out_features, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight, for model code that reads it (T5 checks `wo.weight.dtype`), as PEFT's layers."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped layer's bias (None when it has none)."""
        return getattr(self.base_layer, "bias", None)

    def init_lora(self, seed: int) -> None:
        """A with orthonormal rows of PEFT's scale (`A Aᵀ = I/3`), B = 0: the output starts unchanged."""
        generator = torch.Generator().manual_seed(seed)
        gaussian = torch.randn(self.in_features, self.r, generator=generator, dtype=torch.float64)
        q, _ = torch.linalg.qr(gaussian)
        with torch.no_grad():
            self.lora_A.weight.copy_(q.t() * A_ROW_NORM)
            self.lora_B.weight.zero_()

    def set_frozen_a(self, a: torch.Tensor) -> None:
        """Replace the frozen A (r×d_in) after init, e.g. from the training data's gradient (calibration.py)."""
        with torch.no_grad():
            self.lora_A.weight.copy_(a)

    def delta_weight(self) -> torch.Tensor:
        """`s · B A`, the dense update the adapter adds to the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter's own parameters by local name (`lora_A.weight`, `lora_B.weight`, ...)."""
        return {name: p for name, p in self.named_parameters() if name.startswith(ADAPTER_PREFIX)}

    def peft_weights(self, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """This adapter in PEFT's LoRA format (`lora_A.weight`, `lora_B.weight`).

        `tensors` replaces the layer's own parameters by local name: the full tensors an FSDP or ZeRO-3 state dict
        gathered, where the layer itself holds only this rank's shard.
        """
        t = tensors or self.adapter_tensors()
        return {"lora_A.weight": t["lora_A.weight"], "lora_B.weight": t["lora_B.weight"]}

    def load_peft_weights(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_A)
            self.lora_B.weight.copy_(lora_B)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dropout={self.dropout:g}"


class LoRALayer(AdapterLayer):
    """Plain LoRA (Hu et al., 2021): A and B trained, ordinary autograd. The baseline the others are measured by."""

    method = "lora"

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__(base_layer, r, alpha, dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        h = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return result + (self.scaling * self.lora_B(self.lora_A(h))).to(result.dtype)


class LoRAFALayer(AdapterLayer):
    """LoRA-FA: A frozen after init, only B trained; keeps r values per token for backward.

    With `gradient_correction`, B's gradient is right-multiplied by `(A Aᵀ)⁻¹ / s²` (LoRA-FA v2, as PEFT's
    `create_lorafa_optimizer`), here inside backward so it composes with any optimizer.
    """

    method = "lorafa"

    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, gradient_correction: bool = True
    ) -> None:
        super().__init__(base_layer, r, alpha, dropout)
        self.lora_A.weight.requires_grad_(False)
        self.gradient_correction = gradient_correction
        self.register_buffer("lorafa_precondition", None, persistent=False)

    def refresh_preconditioner(self) -> None:
        """Recompute `(A Aᵀ)⁻¹ / s²` after A is set (init or load); a PEFT-initialised A is not orthonormal."""
        if not self.gradient_correction:
            self.lorafa_precondition = None
            return
        a = self.lora_A.weight.detach().double()
        precondition = torch.linalg.pinv(a @ a.t()) / self.scaling**2
        self.lorafa_precondition = precondition.to(self.lora_A.weight.dtype)

    def init_lora(self, seed: int) -> None:
        super().init_lora(seed)
        self.refresh_preconditioner()

    def load_peft_weights(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        super().load_peft_weights(lora_A, lora_B)
        self.refresh_preconditioner()

    def set_frozen_a(self, a: torch.Tensor) -> None:
        super().set_frozen_a(a)
        self.refresh_preconditioner()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FrozenAAdapterFunction.apply(
            x,
            self.lora_A.weight,
            self.lora_B.weight,
            None,
            self.lorafa_precondition,
            self.base_layer,
            self.scaling,
            self.dropout,
            self.training,
            None,
        )
