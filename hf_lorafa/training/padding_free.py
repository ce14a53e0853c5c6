"""Padding-free training: a right-padded causal-LM batch as one row of its tokens, position ids restarting per row.

Every linear layer computes over padding too; without it, a batch is its sequences end to end in one row, each with
position ids from 0 and a `-100` label at its first token, which transformers' attention reads as separate sequences
(`masking_utils.find_packed_sequence_indices` for SDPA/eager, varlen kernels for flash attention): the layout of its
`DataCollatorWithFlattening` (Kundu et al., 2024, "Enhancing Training Efficiency Using Packing with Flash Attention",
arXiv:2407.09105). A causal LM's loss shifts labels within the row, so the flattened row has exactly the padded batch's
(position, target) pairs. `LoRAFATrainer` applies it to training batches after `padding_free_refusal` shows that the
model gives the padded batch's outputs that way.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn

from ..tuners.quantization import is_bnb_layer
from .packed_attention import NAME as PACKED_SDPA

IGNORE_INDEX = -100  # transformers' ignored label; also the separator at each sequence's first token
PADDED_KEYS = {"input_ids", "attention_mask", "labels"}


def flatten_batch(inputs: dict) -> dict | None:
    """`{input_ids, position_ids, labels}` of shape `(1, tokens)`: the rows of a right-padded causal-LM batch end to
    end without their padding, position ids from 0 and label `-100` at each row's first token (never a target in the
    padded batch either), plus `use_cache=False` (transformers reads position ids as packed sequences only without a
    cache, which a causal LM otherwise creates even in training).

    None (keep the batch) unless `inputs` is exactly `{input_ids, attention_mask, labels}` of one `(batch, length)`
    shape, every mask row is ones then zeros, no row is empty, some padding exists, and every padding position's label
    is `-100` (else the padded loss would count it).

    Example:

    ```python
    >>> ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    >>> mask = ids.ne(0).long()
    >>> flat = flatten_batch({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    >>> flat["input_ids"], flat["position_ids"], flat["labels"]
    (tensor([[5, 6, 7, 8, 9]]), tensor([[0, 1, 2, 0, 1]]), tensor([[-100,    6,    7, -100,    9]]))
    ```
    """
    real = _real_tokens(inputs)
    if real is None:
        return None
    ids, labels = inputs["input_ids"], inputs["labels"].clone()
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    labels[:, 0] = IGNORE_INDEX
    flat = {name: t[real][None] for name, t in (("input_ids", ids), ("position_ids", positions), ("labels", labels))}
    return {**flat, "use_cache": False}


def _real_tokens(inputs: dict) -> torch.Tensor | None:
    """The bool `(batch, length)` mask of a batch `flatten_batch` flattens (its conditions there), else None."""
    if set(inputs) != PADDED_KEYS:
        return None
    ids, mask, labels = (inputs[k] for k in ("input_ids", "attention_mask", "labels"))
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape == ids.shape for t in (mask, labels)):
        return None
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    real = positions < mask.sum(1, keepdim=True)
    right_padded = torch.equal(mask, real.to(mask.dtype)) and bool(real[:, 0].all()) and not real.all()
    if not right_padded or (labels[~real] != IGNORE_INDEX).any():
        return None
    return real


def token_layout(inputs: dict, config) -> torch.Tensor | None:
    """The real tokens (bool, `(batch, length)`) of a padded batch that `flatten_batch` would flatten, for a
    decoder-only model; else None. Training it padded under `tuners.layers.dropout_follows_tokens(...)` draws the
    dropout masks of its flattened form."""
    return None if getattr(config, "is_encoder_decoder", False) else _real_tokens(inputs)


def flattening_pays(config, lengths: list[int], width: int) -> bool:
    """Whether one row of `lengths` tokens costs fewer operations than `len(lengths)` rows padded to `width`.

    Per layer, the linear layers cost `(4·hidden + 3·intermediate)·hidden` per token (attention projections, a gated
    MLP) and the LM head `vocab·hidden`; attention costs `2·hidden` per (query, key) pair it computes: `T²` for the
    flattened row under SDPA/eager (masked pairs are computed too), `Σ length²` under flash attention (varlen) and
    `hf_lorafa_sdpa` (module `packed_attention`), and `batch·width²` padded. A batch without much padding thus stays
    padded under SDPA.
    """
    text = config.get_text_config()
    hidden, layers = text.hidden_size, text.num_hidden_layers
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    per_token = layers * (4 * hidden + 3 * intermediate) + text.vocab_size  # in units of `hidden` operations
    tokens = sum(lengths)
    implementation = str(getattr(config, "_attn_implementation", ""))
    varlen = "flash" in implementation or implementation == PACKED_SDPA
    pairs = sum(n * n for n in lengths) if varlen else tokens * tokens
    padded = len(lengths) * width
    return tokens * per_token + 2 * layers * pairs < padded * per_token + 2 * layers * padded * width


def without_padding(inputs: dict, config) -> dict:
    """`flatten_batch(inputs)` where it applies and `flattening_pays`; otherwise `inputs` as they are."""
    flat = flatten_batch(inputs)
    if flat is None:
        return inputs
    lengths = inputs["attention_mask"].sum(1).tolist()
    return flat if flattening_pays(config, lengths, inputs["input_ids"].shape[1]) else inputs


@contextlib.contextmanager
def _without_dropout(model: nn.Module):
    """Every module in eval mode but bitsandbytes layers (their CPU weights change on a first eval-mode forward)."""
    modes = {m: m.training for m in model.modules() if not is_bnb_layer(m)}
    for module in modes:
        module.training = False
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def padding_free_refusal(model: nn.Module) -> str | None:
    """Why `model` cannot train on flattened batches exactly, or None when it can.

    The probe runs a batch of two right-padded rows padded and flattened (dropout off): the logits at the real
    positions must agree within rounding (a few units of the dtype's precision, at least `2⁻¹⁰` for TF32 matmuls), and
    the second sequence's logits must have an exactly zero gradient with respect to the first sequence's embeddings
    (attention masked across sequences gives exact zeros, in any dtype).
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return "it is an encoder-decoder (seq2seq) model"
    if type(model).__name__ not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "it is not one of transformers' causal-LM classes"
    if "position_ids" not in inspect.signature(model.forward).parameters:
        return "its forward takes no `position_ids`"
    embeddings = model.get_input_embeddings()
    weight = embeddings.weight
    if weight.numel() == 0 or weight.device.type == "meta":
        return "its weights are not materialised here (ZeRO-3 partitions, or the meta device)"
    ids = torch.randint(0, weight.shape[0], (2, 6), generator=torch.Generator().manual_seed(0)).to(weight.device)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], device=weight.device)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    flat = flatten_batch({"input_ids": ids, "attention_mask": mask, "labels": labels})
    del flat["labels"]  # with labels, the chunked loss would return no logits
    leaves = []

    def as_leaf(_module, _args, output):  # the embeddings' output, as a tensor to differentiate with respect to
        leaves.append(output.detach().requires_grad_(True))
        return leaves[-1]

    try:
        with _without_dropout(model):
            with torch.no_grad():
                padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            hook = embeddings.register_forward_hook(as_leaf)
            try:
                with torch.enable_grad():
                    packed = model(**flat).logits
                    (grad,) = torch.autograd.grad(packed[0, 6:].float().sum(), leaves[0])  # the second sequence's
            finally:
                hook.remove()
    except Exception as err:  # a model the probe cannot drive: refuse, with the reason
        return f"its probe forward failed ({type(err).__name__}: {err})"
    if grad[0, :6].count_nonzero():  # with respect to the first sequence's embeddings
        return "its attention reaches across the flattened sequences"
    eps = max(torch.finfo(t.dtype).eps for t in (padded, weight) if t.dtype.is_floating_point)
    padded, packed = padded[mask.bool()].float(), packed[0].detach().float()
    if (packed - padded).norm() > max(4 * eps, 2**-10) * padded.norm():
        return "its outputs on the flattened batch differ from the padded batch's (are `position_ids` used as given?)"
    return None
