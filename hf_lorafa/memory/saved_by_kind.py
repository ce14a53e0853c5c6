"""What autograd keeps for backward right now, by what kept it: docs/memory.md's saved-tensor count, followed in time.

`SavedByKind` enters a `saved_tensors_hooks` pair for each forward of the model. Every saved tensor's storage is
counted once (by `data_ptr`; parameters and buffers left out, as `SavedTensorCounter` does) under the kind of the
innermost module running when it was saved (`KINDS`), and uncounted when autograd lets go of the last tensor it
saved on that storage (after the node's backward, or when the graph is freed). So `alive()` is what is kept now, not
what a forward saved.

Checkpointed regions (block recompute, gradient checkpointing) save through torch's own inner hooks: their tensors
are not kept in forward and these hooks never see them. Backward replays each region, and what the replay keeps until
backward has used it is read from the checkpoint's frame (`compat.checkpoint_recompute`), found whenever a module
runs inside a replay: `recomputed()`, by the kind of block replayed.

The pair is entered by a forward pre-hook on the model registered after the trainer's own (the memory log samples
with hooks of its own, which would otherwise hide these), and it hands each tensor on to the hooks it found there.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from ..compat import checkpoint_recompute, current_saved_tensors_hooks
from ..tuners.layers import AdapterLayer

# kind: what it means, as the breakdown's table prints it.
KINDS = {
    "block_inputs": "block inputs (residual stream, kept by block recompute's checkpoint)",
    "lora_z": "adapters' z = A·x (r values per token, LoRA-FA)",
    "norms": "norms",
    "attention": "attention (q/k/v, output, logsumexp)",
    "swiglu": "SwiGLU (gate/up)",
    "lm_head_loss": "LM head / chunked loss",
    "embeddings": "embeddings",
    "other": "other",
}
REPLAYED = ("attention", "swiglu")  # block kinds a replay is filed under ("other" for any other region)


def _key(tensor: torch.Tensor) -> tuple[str, int]:
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _own_kind(module: nn.Module, head: nn.Module | None) -> str | None:
    if isinstance(module, AdapterLayer):
        return "lora_z"
    if isinstance(module, nn.Embedding) and module is not head:
        return "embeddings"
    if module is head:
        return "lm_head_loss"
    name = type(module).__name__.lower()
    if "norm" in name:
        return "norms"
    if "attention" in name or "attn" in name:
        return "attention"
    if "mlp" in name or (hasattr(module, "gate_proj") and hasattr(module, "up_proj")):
        return "swiglu"
    return None


def module_kinds(model: nn.Module) -> tuple[dict[nn.Module, str], dict[nn.Module, str]]:
    """Each module's kind (its own, else its nearest classified ancestor's; saves in the model's own forward are the
    chunked loss's) and the kind of block a replay running it belongs to (`REPLAYED`, else "other")."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kinds, regions = {model: "lm_head_loss"}, {model: "other"}
    inherited = {model: "other"}
    for parent in model.modules():
        for child in parent.children():
            own = _own_kind(child, head)
            kinds[child] = inherited[child] = own or inherited[parent]
            regions[child] = own if own in REPLAYED else regions[parent]
    return kinds, regions


class _Saved:
    """What autograd holds instead of a saved tensor; uncounts its storage when autograd drops it."""

    __slots__ = ("value", "key", "owner")

    def __init__(self, value: Any, key: tuple[str, int] | None, owner: SavedByKind) -> None:
        self.value, self.key, self.owner = value, key, owner

    def __del__(self) -> None:
        if self.key is not None:
            self.owner._release(self.key)


class SavedByKind:
    """Counts the tensors autograd keeps for backward, alive now, by kind (`KINDS`); see the module docstring.

    Example:

    ```python
    >>> saved = SavedByKind(model)  # doctest: +SKIP
    >>> loss = model(input_ids=ids, labels=ids).loss  # doctest: +SKIP
    >>> saved.alive()["block_inputs"]  # doctest: +SKIP
    >>> loss.backward(); saved.remove()  # doctest: +SKIP
    ```
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kinds, self.regions = module_kinds(model)
        self.owned = {_key(t) for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
        self.entries: dict[tuple[str, int], list] = {}  # storage key: [bytes, kind, tensors saved on it]
        self.by_kind = dict.fromkeys(KINDS, 0)
        self.replays: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # frame: (graph id, kind)
        self.stack: list[tuple[nn.Module, tuple[str, int] | None]] = []  # modules running in forward, with inputs
        self.in_forward = False
        self._context = None
        self._handles = [model.register_forward_hook(self._leave_model, prepend=True)]
        for module in model.modules():
            self._handles += [
                module.register_forward_pre_hook(self._enter, with_kwargs=True),
                module.register_forward_hook(self._leave),
            ]

    # -- hooks -------------------------------------------------------------------------------------------------------
    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            return
        if module is self.model and self._context is None:
            self.stack.clear()
            self.in_forward = True
            below = current_saved_tensors_hooks()
            self._context = torch.autograd.graph.saved_tensors_hooks(*self._hooks(below))
            self._context.__enter__()
        if self.in_forward:
            first = args[0] if args else kwargs.get("hidden_states")
            self.stack.append((module, _key(first) if isinstance(first, torch.Tensor) else None))
        else:
            replay = checkpoint_recompute()
            if replay is not None and replay[0] not in self.replays:
                self.replays[replay[0]] = (replay[1], self.regions.get(module, "other"))

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.in_forward and any(m is module for m, _ in self.stack):
            while self.stack.pop()[0] is not module:
                pass  # a module left by an exception

    def _leave_model(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context, self.in_forward = None, False

    def _hooks(self, below: tuple | None):
        pack_below, unpack_below = below if below else (None, None)

        def pack(tensor: torch.Tensor) -> _Saved:
            value = pack_below(tensor) if pack_below else tensor
            if tensor.device.type == "meta" or tensor.layout != torch.strided:
                return _Saved(value, None, self)
            key = _key(tensor)
            if key in self.owned:
                return _Saved(value, None, self)
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = [tensor.untyped_storage().nbytes(), self._kind_now(key), 0]
                self.by_kind[entry[1]] += entry[0]
            entry[2] += 1
            return _Saved(value, key, self)

        def unpack(saved: _Saved) -> torch.Tensor:
            return unpack_below(saved.value) if unpack_below else saved.value

        return pack, unpack

    def _kind_now(self, key: tuple[str, int]) -> str:
        if not self.stack:
            return "other"
        module, input_key = self.stack[-1]
        if "hf_lorafa_projection" in module.__dict__ and key == input_key:
            return "block_inputs"  # block recompute's checkpoint keeping the block's input
        return self.kinds.get(module, "other")

    def _release(self, key: tuple[str, int]) -> None:
        entry = self.entries.get(key)
        if entry is None:
            return
        entry[2] -= 1
        if entry[2] == 0:
            del self.entries[key]
            self.by_kind[entry[1]] -= entry[0]

    # -- readings ----------------------------------------------------------------------------------------------------
    def alive(self) -> dict[str, int]:
        """Bytes kept for backward now, by kind, from forwards seen by these hooks."""
        return dict(self.by_kind)

    def recomputed(self) -> dict[str, int]:
        """Bytes a checkpoint replay keeps now until backward uses them, by the kind of block replayed (storages
        already counted in `alive()` left out)."""
        out, seen = dict.fromkeys((*REPLAYED, "other"), 0), set()
        for frame, (gid, kind) in list(self.replays.items()):
            for tensor in list(frame.recomputed.get(gid, {}).values()):
                key = _key(tensor)
                if key not in seen and key not in self.owned and key not in self.entries:
                    seen.add(key)
                    out[kind] += tensor.untyped_storage().nbytes()
        return out

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
