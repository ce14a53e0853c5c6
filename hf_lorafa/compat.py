"""Every place hf-lorafa leans on a private detail of torch, transformers, accelerate or bitsandbytes, in one module.

Each function says what it works around and the versions it was written against (torch 2.13, transformers 5.24,
accelerate 1.15, bitsandbytes 0.49, peft 0.21). `tests/test_compat.py` checks each one against the installed
libraries, so an upstream change fails there, by name, instead of deep inside a training run.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


@functools.cache
def libc_function(name: str) -> Any | None:
    """The C library's function `name` through ctypes, or None where the library has none (glibc's `malloc_trim`,
    `mallopt` and `mallinfo2` are missing from musl and macOS). Callers set its argument and result types."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def mark_adapters_attached(model: nn.Module) -> None:
    """Tell transformers' Trainer that a quantized model carries trainable adapters.

    `transformers.trainer_utils.validate_quantization_for_training` refuses "purely quantized" models unless
    `model._hf_peft_config_loaded` is set (PEFT's integration sets it when it attaches adapters; ours are not PEFT's).
    """
    model._hf_peft_config_loaded = True


def forget_accelerate_prepared(model: nn.Module) -> None:
    """Let `Trainer.train()` wrap a model that an earlier `evaluate()` marked prepared without wrapping it.

    Under DDP, `evaluate()` before `train()` runs `Accelerator.prepare_model(model, evaluation_mode=True)`, which
    sets `model._is_accelerate_prepared`; `prepare_model` then returns any marked model unwrapped, so `train()` would
    run without the DDP wrapper (no gradient all-reduce).
    """
    model.__dict__.pop("_is_accelerate_prepared", None)


def unpack_4bit_for_cpu(data: Any, state: Any) -> tuple[Any, Any]:
    """A `Params4bit`'s data and quant state in bitsandbytes' canonical layout, from its CPU-repacked one.

    bitsandbytes repacks 4-bit weights for its AVX512-BF16 CPU kernel the first time a layer runs in eval mode
    (`quant_state.packing_format_for_cpu`); only the private `_convert_weight_packed_for_cpu_inverse` undoes it.
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(data, copy.copy(state))


def keys_to_not_convert(model: nn.Module) -> list[str]:
    """The modules transformers keeps in full precision when it quantizes `model` (the output head, tied weights).

    `transformers.quantizers.base.get_keys_to_not_convert` is internal to the quantizers; `quantize_model` needs
    the same list when the caller adds modules of their own to keep (`modules_to_save`).
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    return list(get_keys_to_not_convert(model))


def replace_forward(module: nn.Module, function: Callable[..., Any]) -> None:
    """Make `function` (unbound, taking `self`) the forward of this one module instance.

    `nn.Module.__call__` looks `forward` up on the instance, so an instance attribute overrides the class's method
    for this module only (other instances, and the class, are untouched). This is how the activation savers patch
    the SwiGLU/RMSNorm forwards and the model's head + loss.
    """
    module.forward = types.MethodType(function, module)


def current_saved_tensors_hooks() -> tuple[Callable, Callable] | None:
    """The `(pack, unpack)` pair of the innermost `saved_tensors_hooks` in force now, or None (torch 2.13's
    `torch._C._autograd._top_saved_tensors_default_hooks`): hooks entered inside it can hand tensors on to it."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False)


def checkpoint_recompute() -> tuple[Any, Any] | None:
    """`(frame, graph id)` of the non-reentrant `torch.utils.checkpoint` replay running now, or None.

    In backward, non-reentrant checkpoint replays its region under its private `_recomputation_hook`, whose pack hook
    files each replayed saved tensor in `frame.recomputed[gid]` (a `WeakKeyDictionary` that lets go of it once backward
    has used it). The frame is read from that pack hook's closure (torch 2.13); the breakdown benchmark counts these
    tensors (`memory.saved_by_kind`). Anything else at the top of the saved-tensor hooks gives None.
    """
    hooks = current_saved_tensors_hooks()
    pack = inspect.unwrap(hooks[0]) if hooks else None
    if pack is None or not pack.__qualname__.startswith("_recomputation_hook."):
        return None
    names = inspect.getclosurevars(pack).nonlocals
    frame = names["target_frame_ref"]() if "target_frame_ref" in names else None
    return (frame, names.get("gid")) if isinstance(getattr(frame, "recomputed", None), dict) else None
