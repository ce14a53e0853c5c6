"""Activation savers: cut what the *frozen* model keeps for backward, exactly, in plain PyTorch.

Once LoRA-FA keeps r values per adapter (Zhang et al., 2023, arXiv:2308.03303, §3), the floor is what the frozen
Llama-family model itself keeps: the LM head's `(tokens × vocab)` fp32 log-probabilities, SwiGLU's gate, act and up,
and each RMSNorm's fp32 input copy. Three exact savers remove most of it:

- **chunked_loss**: with `labels` (and gradients on), the LM head and the causal-LM cross-entropy run over chunks of
  tokens and the gradient of the hidden states is computed per chunk in forward (the fused linear cross-entropy of
  Liger / Cut Cross-Entropy, here without kernels), so at most one chunk's logits exist and only `tokens × hidden`
  is kept. Without labels, or under `no_grad` (evaluation, `generate`), the stock forward runs and logits come back.
- **swiglu_recompute**: `act(gate) * up` keeps gate and up only; `act(gate)` is recomputed in backward.
- **rmsnorm_recompute**: an RMSNorm keeps only its input, in the model dtype (no fp32 copy, not even `rstd`); the
  normalisation is replayed in backward.

Supported modules are found by structure and then *checked numerically* against their own stock forward on a probe
input, so a variant (Gemma's `(1 + weight)` norm is handled; anything else is left alone) never gives a silently wrong
result. Savers wrap the module's forward, not its linear layers, so adapters on gate/up/down compose unchanged.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# fp32 logits per chunk (the log-softmax and its gradient are transient copies of the same size).
LOSS_CHUNK_ELEMENTS = 1 << 23
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Post-head transforms the chunked loss would skip (Gemma 2/3, Cohere, Granite): refuse rather than differ.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class _ChunkedLMHeadLoss(torch.autograd.Function):
    """Causal-LM cross-entropy of `linear(hidden, weight, bias)` computed chunk by chunk, gradients in forward.

    The gradient is written out (`(softmax − onehot) / denominator`, what cross-entropy's backward computes) rather
    than taken with autograd, so no chunk's logits ever pass through saved-tensor hooks (offloading, checkpointing).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denominator, chunk_tokens, ignore_index):
        needs_hidden, needs_weight, needs_bias = needs = ctx.needs_input_grad[:3]
        grad_hidden, grad_weight, grad_bias = (
            torch.zeros_like(t) if n else None for t, n in zip((hidden, weight, bias), needs)
        )
        scale = 1.0 / denominator.to(device=hidden.device, dtype=torch.float32)
        total = hidden.new_zeros((), dtype=torch.float32)
        for rows in (targets != ignore_index).nonzero().squeeze(1).split(chunk_tokens):
            chunk, target = hidden[rows], targets[rows]
            # Same ops as transformers' ForCausalLMLoss: the head in the model dtype, then fp32 log-softmax.
            logits = F.linear(chunk, weight, bias)
            log_probs = logits.float().log_softmax(-1)
            total -= log_probs.gather(1, target[:, None]).sum()
            if not any(needs):
                continue
            grad_logits = log_probs.exp_().mul_(scale)
            grad_logits[torch.arange(len(rows), device=rows.device), target] -= scale
            grad_logits = grad_logits.to(logits.dtype)
            if needs_hidden:
                grad_hidden.index_copy_(0, rows, grad_logits @ weight)
            if needs_weight:
                grad_weight += grad_logits.t() @ chunk
            if needs_bias:
                grad_bias += grad_logits.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return *scaled, None, None, None, None


def _causal_lm_loss(
    hidden, head, labels, num_items_in_batch=None, ignore_index=-100, shift_labels=None, chunk_tokens=None, **_
):
    """transformers' causal-LM loss of `head(hidden)` (shift, `ignore_index`, mean or `/ num_items_in_batch`)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    targets = shift_labels.reshape(-1).to(hidden.device)
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum()
    else:
        denominator = torch.as_tensor(num_items_in_batch)
    chunk = chunk_tokens or max(1, LOSS_CHUNK_ELEMENTS // head.weight.shape[0])
    flat = hidden.reshape(-1, hidden.shape[-1])
    return _ChunkedLMHeadLoss.apply(flat, head.weight, head.bias, targets, denominator, chunk, ignore_index)


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
    return _RMSNormFunction.apply(hidden_states, self.weight, self.hf_lorafa_eps, self.hf_lorafa_unit_offset)


def _swiglu_forward(self, x):
    return self.down_proj(_GatedActFunction.apply(self.gate_proj(x), self.up_proj(x), self.act_fn))


def _same_randomness(device: torch.device, *forwards):
    """Run each forward under `no_grad` from the same RNG state (so dropout draws the same masks), then restore it.

    The probes stay in the model's own train/eval mode: switching to eval can change a model (bitsandbytes repacks
    4-bit CPU weights the first time a layer runs in eval mode).
    """
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    results = []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        states = [torch.get_rng_state()] + [torch.cuda.get_rng_state(index) for index in cuda]
        for forward in forwards:
            torch.set_rng_state(states[0])
            for index, state in zip(cuda, states[1:]):
                torch.cuda.set_rng_state(state, index)
            results.append(forward())
    return results


def _matches(module: nn.Module, forward, probe: torch.Tensor) -> bool:
    """Whether `forward` reproduces the module's stock output on `probe` (to a couple of ulps of its dtype)."""
    try:
        expected, got = _same_randomness(
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
                module.forward = types.MethodType(forward, module)
                found.add(name)
                break
        else:
            for key in variants[0]:
                del module.__dict__[key]
    return found


def _chunked_loss_refusal(model: nn.Module) -> str | None:
    """Why the chunked loss cannot replace this model's head + loss exactly, or None when it can."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = getattr(model, "model", None)
    if type(head) is not nn.Linear or not isinstance(decoder, nn.Module):
        return "the output head is not a plain nn.Linear under a `model.model` decoder"
    if "labels" not in inspect.signature(model.forward).parameters:
        return "the forward takes no `labels`"
    config = getattr(model, "config", None)
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        return f"the model transforms its logits ({', '.join(transforms)})"
    ids = torch.randint(0, head.weight.shape[0], (1, 8), generator=torch.Generator().manual_seed(0))
    ids = ids.to(head.weight.device)
    seen = {}
    hook = head.register_forward_hook(lambda _m, args, out: seen.update(hidden=args[0], logits=out))
    try:
        stock, hidden = _same_randomness(
            ids.device,
            lambda: model(input_ids=ids, labels=ids, use_cache=False),
            lambda: decoder(input_ids=ids, use_cache=False).last_hidden_state,
        )
        with torch.no_grad():
            chunked = _causal_lm_loss(hidden, head, ids)
    except Exception as err:  # e.g. a model that needs more than `input_ids`: refuse, with the reason
        return f"its probe forward failed ({type(err).__name__}: {err})"
    finally:
        hook.remove()
    eps = max(torch.finfo(hidden.dtype).eps, torch.finfo(torch.float32).eps)  # the loss itself is fp32
    same_path = torch.equal(seen["hidden"], hidden) and torch.equal(seen["logits"], stock.logits)
    if not same_path or not torch.allclose(chunked, stock.loss.float(), rtol=8 * eps):
        return "its forward is not `decoder → head → causal-LM loss`"
    return None


def _chunked_forward(self, *args, **kwargs):
    stock = self.hf_lorafa_stock_forward
    bound = inspect.signature(stock).bind(*args, **kwargs)
    arguments = {**bound.arguments}
    arguments.update(arguments.pop("kwargs", {}))
    labels = arguments.pop("labels", None)
    if (
        labels is None
        or not torch.is_grad_enabled()
        or arguments.get("return_dict") is False
        or arguments.pop("logits_to_keep", 0) not in (0, None)
    ):
        return stock(*args, **kwargs)  # generation, evaluation and anything unusual: the stock path, with logits
    from transformers.modeling_outputs import CausalLMOutputWithPast

    loss_kwargs = {name: arguments.pop(name) for name in _LOSS_KWARGS if name in arguments}
    outputs = self.model(**arguments)
    head = self.get_output_embeddings()
    loss = _causal_lm_loss(
        outputs.last_hidden_state, head, labels, chunk_tokens=self.hf_lorafa_loss_chunk, **loss_kwargs
    )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )


def apply_activation_savers(
    model: nn.Module, chunked_loss: bool = True, recompute: bool = True, loss_chunk_tokens: int | None = None
) -> nn.Module:
    """Install the exact activation savers a Llama-family model supports; others are left alone with a notice.

    Sets `model.hf_lorafa_savers` to the active savers' names (a subset of `"chunked_loss"`, `"swiglu_recompute"`,
    `"rmsnorm_recompute"`). Call it after adapters are injected; calling it again adds nothing.

    Args:
        model (`nn.Module`):
            A causal LM (`LlamaForCausalLM`, Mistral, Qwen2/3, SmolLM, Gemma …), modified in place. Models that
            transform their logits after the head (Gemma 2/3 soft-capping) get the recomputation only.
        chunked_loss (`bool`, *optional*, defaults to `True`):
            With `labels` and gradients on, compute the LM head and cross-entropy per chunk of tokens
            (`outputs.logits` is then `None`).
        recompute (`bool`, *optional*, defaults to `True`):
            Recompute SwiGLU's activation and RMSNorm's normalisation in backward.
        loss_chunk_tokens (`int`, *optional*):
            Tokens per loss chunk; defaults to about 8M logits (`LOSS_CHUNK_ELEMENTS // vocab_size`).

    Example:

    ```python
    >>> from hf_lorafa.savers import apply_activation_savers
    >>> model = apply_activation_savers(model)  # doctest: +SKIP
    >>> model.hf_lorafa_savers  # doctest: +SKIP
    ['chunked_loss', 'swiglu_recompute', 'rmsnorm_recompute']
    ```
    """
    active = list(getattr(model, "hf_lorafa_savers", []))
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.device.type == "meta":
        logger.warning(
            "Activation savers: %s has no materialised input embeddings; none applied.", type(model).__name__
        )
        return model
    if chunked_loss and "chunked_loss" not in active:
        reason = _chunked_loss_refusal(model)
        if reason is None:
            stock = model.forward
            # A fresh function per model, wrapping the unbound stock forward: `inspect.signature(model.forward)`
            # (Trainer's loss-kwargs check, `generate`'s argument filtering) then sees the stock parameters.
            forward = types.FunctionType(_chunked_forward.__code__, _chunked_forward.__globals__, "forward")
            functools.update_wrapper(forward, getattr(stock, "__func__", stock))
            model.hf_lorafa_stock_forward, model.hf_lorafa_loss_chunk = stock, loss_chunk_tokens
            model.forward = types.MethodType(forward, model)
            active.append("chunked_loss")
        else:
            logger.warning("Activation savers: chunked loss not applied to %s: %s.", type(model).__name__, reason)
    if recompute and "swiglu_recompute" not in active and "rmsnorm_recompute" not in active:
        found = _patch_recompute(model, weight.dtype)
        active += [name for name in ("swiglu_recompute", "rmsnorm_recompute") if name in found]
        if not found:
            logger.warning(
                "Activation savers: no SwiGLU MLP or RMSNorm matched in %s; no recomputation.", type(model).__name__
            )
    model.hf_lorafa_savers = active
    return model
