"""Block recompute: each attention and MLP block keeps only its input; backward replays it up to its output projection.

With LoRA-FA an output projection (`o_proj`, `down_proj`) keeps r values per token for its adapter and nothing for
its frozen weight (Zhang et al., 2023, arXiv:2308.03303, §3), so everything a block computes before that projection
(q, k, v and the attention output; SwiGLU's gate and up) is needed only by the block's own backward. This saver
checkpoints the span from the block's norm to just before its output projection: the block keeps its input (one
hidden-size tensor), and backward replays the norm, the input projections and attention or the activation, but not
the output projection. Gradient checkpointing replays the whole layer, output projections included, because LoRA's
trainable A needs their inputs.

The span is found by running the model once: a block is a module with an output projection whose input is exactly a
norm's output (the decoder layer's `input_layernorm` → `self_attn`, `post_attention_layernorm` → `mlp`). The norm then
returns its input untouched and the block applies it inside the checkpoint. The whole model is then checked against
its own stock forward and backward on a probe input (outputs and every gradient equal); a model that differs in any
way is left as it was.
"""

from __future__ import annotations

import collections
import logging
import types
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..compat import replace_forward

logger = logging.getLogger(__name__)

# Output projections by the names transformers' families give them (Llama, GPT-NeoX/Falcon, GPT-2, OPT/BART).
OUTPUT_PROJECTIONS = ("o_proj", "down_proj", "dense", "dense_4h_to_h", "c_proj", "out_proj")
BLOCK_CHOICES = ("all", "attention", "mlp")


def blocks_to_replay(value: bool | str) -> str:
    """A `block_recompute` value as one of `"none"` and `BLOCK_CHOICES` (`True`/`"true"` is `"all"`,
    `False`/`"false"` `"none"`); anything else is an error naming the values."""
    value = {True: "all", False: "none", "true": "all", "false": "none"}.get(value, value)
    if value not in ("none", *BLOCK_CHOICES):
        raise ValueError(
            f"`block_recompute` must be one of 'none', {', '.join(map(repr, BLOCK_CHOICES))}; got {value!r}."
        )
    return value


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    value = args[0] if args else kwargs.get("hidden_states")
    return value if isinstance(value, torch.Tensor) else None


def find_blocks(model: nn.Module, probe: Callable[[], tuple]) -> tuple[list[tuple[nn.Module, ...]], tuple]:
    """`(norm, block, projection name, parent layer)` for every block whose input is exactly a norm's output, and
    what `probe()` returned while they were traced (the hooks only observe: the stock model's result)."""
    projection = {}
    for module in model.modules():
        for name in OUTPUT_PROJECTIONS:
            if isinstance(getattr(module, name, None), nn.Module) and "hf_lorafa_norm" not in module.__dict__:
                projection[module] = name
    parents = {child: parent for parent in model.modules() for child in parent.children()}
    outputs: dict[int, nn.Module] = {}
    found: dict[nn.Module, nn.Module] = {}

    def after(module, args, output):
        if isinstance(output, torch.Tensor):
            outputs[id(output)] = module

    def before(module, args, kwargs):
        norm = outputs.get(id(_first_tensor(args, kwargs)))
        if norm is not None and parents.get(norm) is parents.get(module) and not list(norm.children()):
            found.setdefault(module, norm)

    handles = [m.register_forward_hook(after) for m in model.modules() if m not in projection]
    handles += [m.register_forward_pre_hook(before, with_kwargs=True) for m in projection]
    try:
        result = probe()
    finally:
        for handle in handles:
            handle.remove()
    # A norm whose output feeds two blocks (Falcon's and GPT-J's parallel attention and MLP) must keep returning it.
    feeds = collections.Counter(found.values())
    blocks = [(norm, block, projection[block], parents[block]) for block, norm in found.items() if feeds[norm] == 1]
    return blocks, result


def _core(block: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """The norm, then the block's own forward with its output projection standing aside (the identity)."""
    projection = block._modules[block.hf_lorafa_projection]
    block._modules[block.hf_lorafa_projection] = nn.Identity()
    try:
        return block.hf_lorafa_block_forward(
            block.hf_lorafa_norm.hf_lorafa_block_forward(hidden_states), *args, **kwargs
        )
    finally:
        block._modules[block.hf_lorafa_projection] = projection


def _block_forward(self, *args, **kwargs):
    """The block's forward: norm + block up to its output projection under a checkpoint, then the projection."""
    if args:
        hidden_states, args = args[0], args[1:]
    else:
        hidden_states = kwargs.pop("hidden_states")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if (
        not torch.is_grad_enabled()
        or getattr(self.hf_lorafa_layer, "gradient_checkpointing", False)  # transformers replays the whole layer
        or (cache is not None and cache.get_seq_length() > 0)  # a replay would append to the cache again
    ):
        out = _core(self, hidden_states, *args, **kwargs)
    else:
        for key in ("cache", "past_key_values"):
            if key in kwargs:
                kwargs[key] = None  # an empty cache gives the same keys and values, and training reads none back
        out = checkpoint(_core, self, hidden_states, *args, use_reentrant=False, **kwargs)
    projected = getattr(self, self.hf_lorafa_projection)(out[0] if isinstance(out, tuple) else out)
    return (projected, *out[1:]) if isinstance(out, tuple) else projected


def _identity(self, hidden_states):
    return hidden_states


def _replayed_forward(module: nn.Module):
    """The forward a block runs under its checkpoint: its own, or its class's where an activation saver marked
    `hf_lorafa_replay_stock` replaced it (the SwiGLU saver's replay of its activation in backward would only repeat
    the block's replay, whose saved tensors live until the block's backward anyway)."""
    if getattr(module.forward, "hf_lorafa_replay_stock", False):
        return types.MethodType(type(module).forward, module)
    return module.forward


def _install(norm: nn.Module, block: nn.Module, projection: str, layer: nn.Module) -> None:
    # Kept in the instances' __dict__ (not as submodules): state dicts are unchanged and deepcopy follows them.
    norm.__dict__.update(hf_lorafa_block_forward=norm.forward, hf_lorafa_forward_before=norm.forward)
    block.__dict__.update(
        hf_lorafa_block_forward=_replayed_forward(block), hf_lorafa_forward_before=block.forward,
        hf_lorafa_norm=norm, hf_lorafa_layer=layer, hf_lorafa_projection=projection,
    )  # fmt: skip
    replace_forward(block, _block_forward)
    replace_forward(norm, _identity)


def _uninstall(norm: nn.Module, block: nn.Module) -> None:
    for module in (norm, block):
        del module.__dict__["hf_lorafa_block_forward"]
        forward = module.__dict__.pop("hf_lorafa_forward_before")
        if forward.__func__ is getattr(type(module), "forward", None):
            del module.forward  # the class's own
        else:
            module.forward = forward  # an earlier saver's
    for key in ("hf_lorafa_norm", "hf_lorafa_layer", "hf_lorafa_projection"):
        del block.__dict__[key]


def _probe(model: nn.Module) -> Callable[[], tuple[torch.Tensor, ...]]:
    """Forward and backward of a short random input: the output, the input's gradient and every trained gradient."""
    embeddings = model.get_input_embeddings()
    weight = embeddings.weight
    ids = torch.randint(0, weight.shape[0], (2, 8), generator=torch.Generator().manual_seed(0)).to(weight.device)
    trained = [p for p in model.parameters() if p.requires_grad]
    devices = [weight.device.index or 0] if weight.device.type == "cuda" else []

    def run():
        # In train mode: dropout after an output projection (GPT-2's resid_dropout) would then move into the block.
        training = model.training
        model.train()
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                torch.manual_seed(0)
                inputs = embeddings(ids).detach().requires_grad_(True)
                output = model(inputs_embeds=inputs, use_cache=False)[0]
                grads = torch.autograd.grad(output.float().square().mean(), [inputs, *trained], allow_unused=True)
        finally:
            model.train(training)
        return (output.detach(), *(g for g in grads if g is not None))

    return run


def block_kind(block: nn.Module, layer: nn.Module) -> str:
    """`"attention"` or `"mlp"` from the block's name in its layer (`self_attn`, `attention`, `attn`; `mlp`,
    `feed_forward`, `ffn`); `"other"` for any other name."""
    name = next((n for n, child in layer.named_children() if child is block), "").lower()
    if "attn" in name or "attention" in name:
        return "attention"
    if "mlp" in name or "feed_forward" in name or "ffn" in name:
        return "mlp"
    return "other"


def apply_block_recompute(model: nn.Module, blocks: str = "all") -> bool:
    """Install block recompute where it reproduces the model exactly; returns whether it was installed.

    Call it after adapters are injected (the probe compares the adapters' gradients too). `blocks` picks which:
    `"all"` (attention and MLP blocks), `"attention"` or `"mlp"`.
    """
    if blocks not in BLOCK_CHOICES:
        raise ValueError(f"`blocks` must be one of {', '.join(map(repr, BLOCK_CHOICES))}; got {blocks!r}.")
    probe = _probe(model)
    try:
        found, expected = find_blocks(model, probe)
    except Exception as err:  # a model the probe cannot drive (an encoder-decoder wants decoder inputs too)
        logger.debug("Block recompute: probe of %s failed: %s", type(model).__name__, err)
        return False
    wanted = blocks
    blocks = [
        (norm, block, name, layer) for norm, block, name, layer in found if wanted in ("all", block_kind(block, layer))
    ]
    if not blocks:
        return False
    for norm, block, projection, layer in blocks:
        _install(norm, block, projection, layer)
    try:
        got = probe()
    except Exception as err:
        logger.debug("Block recompute: %s fails with it: %s", type(model).__name__, err)
        got = ()
    same = len(got) == len(expected) and all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, expected, strict=True)
    )
    if not same:
        for norm, block, _, _ in blocks:
            _uninstall(norm, block)
        logger.debug("Block recompute: %s differs from its stock forward; not applied.", type(model).__name__)
    return same
