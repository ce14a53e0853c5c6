"""Activation savers: cut what the *frozen* model keeps for backward, exactly, in plain PyTorch.

Once LoRA-FA keeps r values per adapter (Zhang et al., 2023, arXiv:2308.03303, §3), the floor is what the frozen
Llama-family model itself keeps: the LM head's `(tokens × vocab)` fp32 log-probabilities, SwiGLU's gate, act and up,
and each RMSNorm's fp32 input copy. Four exact savers remove most of it:

- **chunked_loss** (module `chunked_loss`): with `labels` and gradients on, the LM head and the causal-LM
  cross-entropy run over chunks of tokens with each chunk's gradient computed in forward, so only `tokens × hidden`
  is kept instead of the `(tokens × vocab)` logits.
- **swiglu_recompute**: `act(gate) * up` keeps gate and up only; `act(gate)` is recomputed in backward.
- **rmsnorm_recompute**: an RMSNorm over a half-precision input keeps only that input (no fp32 copy, not even
  `rstd`); the normalisation is replayed in backward. Over an fp32 input the stock ops already keep only the input
  and `rstd`, and run as they are.
- **block_recompute** (module `block_recompute`): each attention and MLP block keeps only its input; backward replays
  it up to its output projection, which LoRA-FA needs no input for.

Supported modules are found by structure and then *checked numerically* against their own stock forward on a probe
input, so a variant (Gemma's `(1 + weight)` norm is handled; anything else is left alone) never gives a silently wrong
result. Savers wrap the module's forward, not its linear layers, so adapters on gate/up/down compose unchanged.
"""

from __future__ import annotations

import logging
import types

import torch
from torch import nn

from ..compat import replace_forward
from .block_recompute import apply_block_recompute, blocks_to_replay
from .chunked_loss import install_chunked_loss, same_randomness

logger = logging.getLogger(__name__)


def _rmsnorm(x, weight, eps, unit_offset):
    """transformers' RMSNorm, op for op: Llama `w * (x̂).to(dtype)`, Gemma `(x̂ * (1 + w)).to(dtype)`, x̂ in fp32."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.float())).type_as(x)
    return weight * normed.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm keeping only its input (model dtype); backward replays the stock ops, so gradients are bit-identical."""

    @staticmethod
    def forward(ctx, x, weight, eps, unit_offset):
        ctx.save_for_backward(x, weight)
        ctx.eps, ctx.unit_offset = eps, unit_offset
        return _rmsnorm(x, weight, eps, unit_offset)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(n) for t, n in zip((x, weight), ctx.needs_input_grad[:2])]
            out = _rmsnorm(*leaves, ctx.eps, ctx.unit_offset)
        wanted = [leaf for leaf in leaves if leaf.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return *(next(grads) if leaf.requires_grad else None for leaf in leaves), None, None


class _GatedActFunction(torch.autograd.Function):
    """`act(gate) * up` keeping gate and up only; backward replays `act` on gate (any elementwise activation)."""

    @staticmethod
    def forward(ctx, gate, up, act_fn):
        ctx.save_for_backward(gate, up)
        ctx.act_fn = act_fn
        return act_fn(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            leaf = gate.detach().requires_grad_(True)
            activated = ctx.act_fn(leaf)
        grad_gate = torch.autograd.grad(activated, leaf, grad * up)[0] if ctx.needs_input_grad[0] else None
        grad_up = grad * activated.detach() if ctx.needs_input_grad[1] else None
        return grad_gate, grad_up, None


def _rmsnorm_forward(self, hidden_states):
    if hidden_states.dtype in (torch.float32, torch.float64):
        # No fp32 copy to avoid: the stock ops keep the input and one value per token, and backward needs no replay.
        return _rmsnorm(hidden_states, self.weight, self.hf_lorafa_eps, self.hf_lorafa_unit_offset)
    return _RMSNormFunction.apply(hidden_states, self.weight, self.hf_lorafa_eps, self.hf_lorafa_unit_offset)


def _swiglu_forward(self, x):
    return self.down_proj(_GatedActFunction.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


# Under block recompute the MLP replays its class's forward instead (module `block_recompute`).
_swiglu_forward.hf_lorafa_replay_stock = True


def _matches(module: nn.Module, forward, probe: torch.Tensor) -> bool:
    """Whether `forward` reproduces the module's stock output on `probe` (to a couple of ulps of its dtype)."""
    try:
        expected, got = same_randomness(
            probe.device, lambda: module(probe), lambda: types.MethodType(forward, module)(probe)
        )
    except Exception as err:  # a module that only looks like one we support: leave it alone
        logger.debug("Activation savers: probe of %s failed: %s", type(module).__name__, err)
        return False
    eps = torch.finfo(expected.dtype).eps
    return expected.shape == got.shape and torch.allclose(got.float(), expected.float(), rtol=4 * eps, atol=eps)


def _patch_recompute(model: nn.Module, dtype: torch.dtype) -> set[str]:
    """Give every SwiGLU MLP and RMSNorm whose stock output the recomputing forward reproduces that forward."""
    found = set()
    for module in model.modules():
        names = ("gate_proj", "up_proj", "down_proj", "act_fn")
        gate, act_fn, weight = getattr(module, "gate_proj", None), getattr(module, "act_fn", None), module._parameters
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if all(hasattr(module, n) for n in names) and callable(act_fn) and hasattr(gate, "in_features"):
            name, forward, width, variants = "swiglu_recompute", _swiglu_forward, gate.in_features, [{}]
        elif isinstance(eps, float) and list(weight) == ["weight"] and weight["weight"].dim() == 1:
            name, forward, width = "rmsnorm_recompute", _rmsnorm_forward, weight["weight"].shape[0]
            # Llama's `w * x̂` or Gemma's `(1 + w) * x̂`: the probe tells which one this module computes.
            variants = [{"hf_lorafa_eps": eps, "hf_lorafa_unit_offset": offset} for offset in (False, True)]
        else:
            continue
        device = next(module.parameters()).device
        if device.type == "meta":
            continue
        probe = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        for attributes in variants:
            module.__dict__.update(attributes)
            if _matches(module, forward, probe):
                replace_forward(module, forward)
                found.add(name)
                break
        else:
            for key in variants[0]:
                del module.__dict__[key]
    return found


def apply_activation_savers(
    model: nn.Module,
    chunked_loss: bool = True,
    recompute: bool = True,
    loss_chunk_tokens: int | None = None,
    block_recompute: bool | str = True,
) -> nn.Module:
    """Install the exact activation savers the model supports; what does not apply is left alone (an INFO log).

    Sets `model.hf_lorafa_savers` to the active savers' names (a subset of `"chunked_loss"`, `"swiglu_recompute"`,
    `"rmsnorm_recompute"`, `"block_recompute"`). Call it after adapters are injected; calling it again adds nothing.

    Args:
        model (`nn.Module`):
            A causal LM (`LlamaForCausalLM`, Mistral, Qwen2/3, SmolLM, Gemma …), modified in place. Models that
            transform their logits after the head (Gemma 2/3 soft-capping) get the recomputation only.
        chunked_loss (`bool`, *optional*, defaults to `True`):
            With `labels` and gradients on, compute the LM head and cross-entropy per chunk of tokens
            (`outputs.logits` is then `None`).
        recompute (`bool`, *optional*, defaults to `True`):
            Recompute SwiGLU's activation and (over half-precision inputs) RMSNorm's normalisation in backward.
        loss_chunk_tokens (`int`, *optional*):
            Tokens per loss chunk; defaults to about 8M logits (`LOSS_CHUNK_ELEMENTS // vocab_size`).
        block_recompute (`bool` or `str`, *optional*, defaults to `True`):
            Which blocks keep only their input, backward replaying them up to their output projection (module
            `block_recompute`): `"all"` (or `True`) attention and MLP blocks, `"attention"`, `"mlp"`, or `"none"`
            (or `False`). Leave it off under gradient checkpointing, which replays whole layers.

    Example:

    ```python
    >>> from hf_lorafa.training.activation_savers import apply_activation_savers
    >>> model = apply_activation_savers(model)  # doctest: +SKIP
    >>> model.hf_lorafa_savers  # doctest: +SKIP
    ['chunked_loss', 'swiglu_recompute', 'rmsnorm_recompute']
    ```
    """
    active = list(getattr(model, "hf_lorafa_savers", []))
    if getattr(model, "use_kernels", False):
        # transformers kernelizes hub-kernel layers (RMSNorm, ...) again at every train()/eval() switch, which puts
        # their class forward back over a saver's; the savers replace those forwards, so kernelization goes.
        model.reset_kernels()
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.device.type == "meta":
        logger.info("Activation savers: %s has no materialised input embeddings; none applied.", type(model).__name__)
        return model
    if chunked_loss and "chunked_loss" not in active:
        reason = install_chunked_loss(model, loss_chunk_tokens)
        if reason is None:
            active.append("chunked_loss")
        else:
            logger.info("Activation savers: chunked loss not applied to %s: %s.", type(model).__name__, reason)
    if recompute and "swiglu_recompute" not in active and "rmsnorm_recompute" not in active:
        found = _patch_recompute(model, weight.dtype)
        active += [name for name in ("swiglu_recompute", "rmsnorm_recompute") if name in found]
        if not found:
            logger.info(
                "Activation savers: no SwiGLU MLP or RMSNorm matched in %s; no recomputation.", type(model).__name__
            )
    blocks = blocks_to_replay(block_recompute)
    if blocks != "none" and "block_recompute" not in active:
        if apply_block_recompute(model, blocks):
            active.append("block_recompute")
        else:
            logger.info(
                "Activation savers: no attention or MLP block of %s could be recomputed exactly; none is.",
                type(model).__name__,
            )
    model.hf_lorafa_savers = active
    return model
