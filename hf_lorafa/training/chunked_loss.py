"""The chunked LM-head loss saver: the causal-LM head and cross-entropy over chunks of tokens, gradients in forward.

With `labels` (and gradients on), the LM head and the loss run chunk by chunk and the hidden states' gradient is
computed per chunk in forward (the fused linear cross-entropy of Liger / Cut Cross-Entropy, here without kernels), so
at most one chunk's logits exist and only `tokens × hidden` is kept. Without labels, or under `no_grad` (evaluation,
`generate`), the stock forward runs and logits come back, except inside `loss_only(model)` (entered by
`LoRAFATrainer` while it evaluates without metrics). Installed by
`savers.apply_activation_savers` only after a probe shows it gives the model's own loss.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..compat import replace_forward

# fp32 logits per chunk (the log-softmax and its gradient are transient copies of the same size).
LOSS_CHUNK_ELEMENTS = 1 << 23
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Models (by id) whose chunked forward computes only the loss under no_grad too: see `loss_only`.
_LOSS_ONLY: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("hf_lorafa_loss_only", default=frozenset())
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
            # Under autocast these products come out in bf16/fp16; the gradients keep their tensors' dtypes.
            if needs_hidden:
                grad_hidden.index_copy_(0, rows, (grad_logits @ weight).to(grad_hidden.dtype))
            if needs_weight:
                grad_weight += (grad_logits.t() @ chunk).to(grad_weight.dtype)
            if needs_bias:
                grad_bias += grad_logits.sum(0).to(grad_bias.dtype)
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


def same_randomness(device: torch.device, *forwards):
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
        stock, hidden = same_randomness(
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
        or not (torch.is_grad_enabled() or id(self) in _LOSS_ONLY.get())
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
    # transformers 5 renamed the outputs' `past_key_values` to `cache` and warns on the old name; pass it on by
    # whichever name this transformers' outputs declare.
    cache = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        **{cache: getattr(outputs, cache)},
    )


def install_chunked_loss(model: nn.Module, loss_chunk_tokens: int | None = None) -> str | None:
    """Replace `model.forward` by the chunked head + loss when that is exact; else return why not (nothing changed)."""
    reason = _chunked_loss_refusal(model)
    if reason is None:
        stock = model.forward
        # A fresh function per model, wrapping the unbound stock forward: `inspect.signature(model.forward)`
        # (Trainer's loss-kwargs check, `generate`'s argument filtering) then sees the stock parameters.
        forward = types.FunctionType(_chunked_forward.__code__, _chunked_forward.__globals__, "forward")
        functools.update_wrapper(forward, getattr(stock, "__func__", stock))
        model.hf_lorafa_stock_forward, model.hf_lorafa_loss_chunk = stock, loss_chunk_tokens
        replace_forward(model, forward)
    return reason


@contextlib.contextmanager
def loss_only(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, `model`'s chunked forward returns only the loss (no logits) even without gradients.

    For evaluation that needs the loss alone (Trainer's `prediction_loss_only`): the `(tokens × vocab)` logits are
    the largest tensor of an evaluation batch. A no-op for models without the chunked loss.

    Example:

    ```python
    >>> with loss_only(model):  # doctest: +SKIP
    ...     loss = model(input_ids=ids, labels=ids).loss  # outputs.logits is None
    ```
    """
    token = _LOSS_ONLY.set(_LOSS_ONLY.get() | {id(model)} if enabled else _LOSS_ONLY.get())
    try:
        yield
    finally:
        _LOSS_ONLY.reset(token)
