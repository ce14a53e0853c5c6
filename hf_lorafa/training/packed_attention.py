"""SDPA over packed sequences one sequence at a time: the attention that padding-free training asks for, at `Σ L²`.

transformers reads a row of sequences packed end to end (position ids restarting at 0, no attention mask) as
separate sequences and gives SDPA a block-diagonal causal mask over the whole row (`masking_utils`): the kernel then
computes all `T²` (query, key) pairs of the row and throws away those across sequences, and keys and values are
repeated to every query head (grouped-query attention runs with `enable_gqa` only without a mask). Flash attention's
varlen kernels, which compute each sequence alone, exist only on CUDA.

`packed_sdpa_attention_forward` is transformers' `sdpa_attention_forward` except where the mask it is given is exactly
that block-diagonal causal mask of the row's position ids: then each sequence runs as its own causal SDPA call
(`is_causal`, `enable_gqa`), so the row costs `Σ L²` pairs and keeps keys and values at their own head count. The
result is the same attention up to rounding (each softmax sums the same terms). It is registered with transformers'
`AttentionInterface` and `AttentionMaskInterface` as `"hf_lorafa_sdpa"` (the masks are SDPA's), which
`use_packed_attention` sets on a model whose implementation is `"sdpa"`.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

NAME = "hf_lorafa_sdpa"

# The mask transformers built for one forward is shared by every layer: checked once, by identity.
_checked: list = [None, None, None]  # [weakref to the mask, weakref to the position ids, lengths or None]


def _sequence_lengths(attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None) -> list[int] | None:
    """The lengths of the packed sequences when `attention_mask` is exactly their block-diagonal causal mask."""
    if attention_mask is None or position_ids is None or attention_mask.dtype != torch.bool:
        return None
    if position_ids.dim() != 2 or position_ids.shape[0] != 1 or attention_mask.shape[0] != 1:
        return None
    mask_ref, positions_ref, lengths = _checked
    if mask_ref is not None and mask_ref() is attention_mask and positions_ref() is position_ids:
        return lengths
    lengths = None
    positions = position_ids[0]
    tokens = positions.shape[0]
    if attention_mask.shape[-2:] == (tokens, tokens) and attention_mask.shape[1] == 1:
        starts = torch.ones(tokens, dtype=torch.bool, device=positions.device)
        starts[1:] = positions[1:] - positions[:-1] != 1  # transformers' rule for a new packed sequence
        sequence = starts.cumsum(0)
        causal = torch.ones(tokens, tokens, dtype=torch.bool, device=positions.device).tril_()
        expected = causal & (sequence[:, None] == sequence[None, :])
        if torch.equal(attention_mask[0, 0], expected):
            lengths = torch.bincount(sequence - 1).tolist()
    _checked[:] = [weakref.ref(attention_mask), weakref.ref(position_ids), lengths]
    return lengths


def packed_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention; a packed row (see the module docstring) runs one causal call per sequence."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = None
    plain = (
        dropout == 0.0
        and kwargs.get("softcap") is None
        and kwargs.get("position_bias") is None
        and kwargs.get("sliding_window") is None
        and getattr(module, "sliding_window", None) is None
        and not kwargs.get("output_attentions", False)
        and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
    )
    if plain:
        lengths = _sequence_lengths(attention_mask, kwargs.get("position_ids"))
    if lengths is None or len(lengths) < 2:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    pieces = [
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in zip(query.split(lengths, 2), key.split(lengths, 2), value.split(lengths, 2), strict=True)
    ]
    return torch.cat(pieces, 2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the attention with transformers (its masks are SDPA's); returns its name."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_packed_attention(model: nn.Module) -> bool:
    """Switch a model whose attention implementation is `"sdpa"` to `"hf_lorafa_sdpa"`; returns whether it was."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not getattr(model, "_supports_sdpa", False):
        return False
    register()
    config._attn_implementation = NAME
    return True
