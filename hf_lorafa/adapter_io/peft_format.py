"""Save and load adapters in PEFT's LoRA format, plus hf-lorafa's own fields in `hf_lorafa.json`.

The PEFT side goes through PEFT's public API (`LoraConfig.save_pretrained`, `PeftConfig.from_pretrained`) and its
weight-key naming (`base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained(base, dir)`
loads our adapters and we load plain PEFT LoRA adapters. Weights are read and written with safetensors only.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from ..tuners.config import INIT_ONLY, LoRAFAConfig, is_adapter_tensor
from ..tuners.injection import (
    adapter_layers,
    find_target_parameters,
    has_adapters,
    inject_adapters,
    matches_targets,
)
from ..tuners.layers import is_fan_in_fan_out
from ..tuners.param_layers import ParamAdapter
from .checks import (
    PEFT_PREFIX,
    peft_rank_and_scaling,
    read_json_object,
    read_lora_config,
    split_adapter_tensors,
    uncovered_targets,
)
from .output_folder import staged_files
from .zero3 import is_zero3_partitioned

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HF_LORAFA_FILE = "hf_lorafa.json"
HUB_FILES = [ADAPTER_CONFIG, ADAPTER_WEIGHTS, HF_LORAFA_FILE, "README.md", "memory.json", "*.png"]


def _task_type(model: nn.Module) -> str | None:
    """PEFT's task type for `model`'s head, so `PeftModel.from_pretrained` and `merge` pick the right auto class."""
    name = type(model).__name__
    # "ForConditionalGeneration" also names decoder-only vision-language models; only encoder-decoders are seq2seq.
    if name.endswith("ForConditionalGeneration") and getattr(model.config, "is_encoder_decoder", False):
        return "SEQ_2_SEQ_LM"
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS")):
        if name.endswith(suffix):
            return task
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    # Older heads have other names (GPT-2's GPT2LMHeadModel): transformers' own auto mapping knows them.
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    return "CAUSAL_LM" if name in causal else None


def _peft_target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Leaf names when they select exactly our layers (PEFT's suffix match), otherwise the full module names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    selected = {n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in leaves and n}
    return leaves if selected == set(names) else sorted(names)


def _full_tensors(model: nn.Module, state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """`model`'s tensors by name, taken from `state_dict` where it has them (the full tensors FSDP/ZeRO-3 gathered
    on the main process); a DTensor left over means a shard would be saved as if it were the whole tensor."""
    own = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    full = {name: (state_dict or {}).get(name, tensor) for name, tensor in own.items()}
    # FSDP2 shards are DTensors; a ZeRO-3 partitioned parameter carries `ds_numel` (its full size) and holds none.
    sharded = [
        n for n, t in full.items() if is_adapter_tensor(n) and (hasattr(t, "full_tensor") or is_zero3_partitioned(t))
    ]
    if sharded:
        raise ValueError(
            f"`state_dict` is needed to save a sharded adapter ({sharded[0]!r} is only this rank's shard): pass the "
            "full state dict, e.g. `accelerator.get_state_dict(model)` (what Trainer.save_model does under FSDP), or "
            "under ZeRO-3 `gather_adapter_tensors(model)` from hf_lorafa.adapter_io.zero3, called on every rank."
        )
    return full


def adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter (and `modules_to_save`) weights under PEFT's key names; LaMDA folded (`B' = B S − C`).

    `state_dict` supplies full tensors by the model's parameter names when the model holds shards (FSDP, ZeRO-3).
    """
    config: LoRAFAConfig = model.hf_lorafa_config
    full = _full_tensors(model, state_dict)
    state = {}
    for name, layer in adapter_layers(model).items():
        tensors = {local: full[f"{name}.{local}"] for local in layer.adapter_tensors()}
        for key, tensor in layer.peft_weights(tensors).items():
            state[f"{PEFT_PREFIX}{name}.{key}"] = tensor.detach().contiguous().clone()
    for name, module in model.named_modules():
        if config.modules_to_save and name and matches_targets(name, config.modules_to_save):
            for key in module.state_dict():
                state[f"{PEFT_PREFIX}{name}.{key}"] = full[f"{name}.{key}"].detach().contiguous().clone()
    return state


def save_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Save the adapter of `model` in PEFT's LoRA format plus `hf_lorafa.json`.

    Args:
        model (`nn.Module`): a model with adapters from [`inject_adapters`] or [`load_adapter`].
        save_directory (`str` or `os.PathLike`): folder to write (created if needed). All files are written first
            and then renamed in together, so a kill or a full disk leaves the earlier adapter whole; a folder that
            holds a model (config.json + weights) is refused.
        extra (`dict`, *optional*): more fields for `hf_lorafa.json` (the trainer adds memory figures).
        state_dict (`dict`, *optional*): the model's full state dict when its parameters are sharded (FSDP2
            DTensors, ZeRO-3): gathered on every rank (`accelerator.get_state_dict(model)`), saved by the main one.

    Example:

    ```python
    >>> save_adapter(model, "outputs/my-adapter")  # doctest: +SKIP
    ```
    """
    from peft import LoraConfig

    if not has_adapters(model):
        raise ValueError("`model` has no hf-lorafa adapters to save; call inject_adapters(model, config) first.")
    config: LoRAFAConfig = model.hf_lorafa_config
    state = adapter_state_dict(model, state_dict)  # before any file is written: a sharded model fails here
    layers = adapter_layers(model)
    rank_pattern = {name: layer.r for name, layer in layers.items() if layer.r != config.r}
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    peft_config = LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=_peft_target_modules(model, [n for n, m in layers.items() if not isinstance(m, ParamAdapter)]),
        target_parameters=config.target_parameters,
        rank_pattern=rank_pattern,
        modules_to_save=config.modules_to_save,
        # PEFT's flag for Conv1D bases (it reads their weight transposed when merging); the layer kind decides it.
        fan_in_fan_out=any(is_fan_in_fan_out(layer.base_layer) for layer in layers.values()),
        base_model_name_or_path=name_or_path,
        task_type=_task_type(model),
        bias="none",
    )
    # A reloaded adapter keeps its saved tensors: the options that only set initial values describe how it started.
    fields = {"method": config.method, "config": config.to_dict(), "init_only_options": list(INIT_ONLY)}
    fields.update(extra or {})
    with staged_files(save_directory) as staging:
        peft_config.save_pretrained(staging)
        # Serialized here and written by Python, so a full disk is an OSError like every other file's.
        (staging / ADAPTER_WEIGHTS).write_bytes(save(state, metadata={"format": "pt"}))
        (staging / HF_LORAFA_FILE).write_text(json.dumps(fields, indent=2))
    return Path(save_directory)


def resolve_adapter_dir(adapter: str | os.PathLike, revision: str | None = None, token: str | None = None) -> Path:
    """A local adapter folder, or a Hub repo id downloaded with `huggingface_hub` (pinned to `revision`)."""
    path = Path(adapter)
    if path.is_dir():
        return path
    if path.exists() or str(adapter).count("/") != 1 or str(adapter).startswith((".", "/")):
        raise ValueError(
            f"`adapter`={str(adapter)!r} is neither an adapter folder nor a Hub repo id like 'user/my-adapter'; "
            "check the path."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(adapter), revision=revision, token=token, allow_patterns=HUB_FILES))
    except Exception as err:  # noqa: BLE001 - not found, gated, offline, unreachable: one error that says which
        from ..redact import scrub_secrets

        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else "no detail"
        raise ValueError(
            scrub_secrets(
                f"`adapter`={str(adapter)!r} is not a local folder and could not be downloaded from the Hub "
                f"({type(err).__name__}: {detail}). Check the repo id and `revision`, pass `token` for a private "
                "repo, and check the network (HF_HUB_OFFLINE must be unset to download).",
                token,
            )
        ) from None


def read_adapter_facts(directory: str | os.PathLike) -> dict[str, Any]:
    """The `hf_lorafa.json` of an adapter folder (empty when absent, e.g. a plain PEFT adapter)."""
    path = Path(directory) / HF_LORAFA_FILE
    facts = read_json_object(path) if path.exists() else {}
    if not isinstance(facts.get("config", {}), dict):
        raise ValueError(
            f"`adapter` file {str(path)!r} has 'config'={facts['config']!r}; it must be an object of LoRAFAConfig "
            "fields. Fix the file or save the adapter again."
        )
    return facts


def read_adapter_weights(directory: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors from `adapter_model.safetensors`; a pickle `adapter_model.bin` only if allowed."""
    weights = directory / ADAPTER_WEIGHTS
    pickled = directory / "adapter_model.bin"
    if not weights.exists() and pickled.exists() and allow_pickle:
        try:
            # Even opted in, only tensors: `weights_only=True` refuses pickled code objects.
            return torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
            raise ValueError(
                f"`adapter` weights {str(pickled)!r} could not be loaded as plain tensors ({type(err).__name__}); "
                "convert them to safetensors with the tool that wrote them."
            ) from None
    if not weights.exists():
        hint = (
            " It has adapter_model.bin, a pickle, which hf-lorafa does not load by default (unpickling can run "
            "code). Convert it with PEFT: PeftModel.from_pretrained(base, dir).save_pretrained(new_dir, "
            "safe_serialization=True), or, if you trust its source, pass `allow_pickle=True`."
            if pickled.exists()
            else ""
        )
        raise ValueError(f"`adapter` folder {str(directory)!r} has no {ADAPTER_WEIGHTS}.{hint}")
    try:
        return load_file(weights)
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"`adapter` weights {str(weights)!r} are corrupt or truncated ({err}); save or download them again."
        ) from None


def classifier_outputs(directory: Path, allow_pickle: bool = False) -> int:
    """The number of labels a sequence-classification adapter was trained for: the rows of its classifier.

    The base's own config does not say (a new head gets `num_labels` at load); the adapter's saved head does. Of the
    2-D `modules_to_save` weights (`score`, or BERT's `classifier` beside its square `pooler.dense`), the
    classifier's output layer is the narrowest.
    """
    weights = read_adapter_weights(directory, allow_pickle)
    rows = [t.shape[0] for k, t in weights.items() if ".lora_" not in k and k.endswith(".weight") and t.dim() == 2]
    if not rows:
        raise ValueError(
            f"`adapter` {str(directory)!r} is a SEQ_CLS adapter without its classifier head (no modules_to_save "
            "weights); merge its base with the head it was trained with using PEFT, or save the adapter again."
        )
    return min(rows)


def load_adapter(
    model: nn.Module,
    adapter: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    method: str | None = None,
    allow_pickle: bool = False,
) -> nn.Module:
    """Put a saved adapter (ours or a plain PEFT LoRA one) into `model`, ready to train or evaluate.

    A plain PEFT LoRA adapter continues as LoRA-FA (A frozen) unless `method="lora"`; a LaMDA adapter (saved
    folded) continues with S = I over B' = B S − C, training only S.

    Args:
        model (`nn.Module`): the base model the adapter was trained on (no adapters yet).
        adapter (`str` or `os.PathLike`): a local folder or a Hub repo id.
        revision (`str`, *optional*): Hub revision (branch, tag or commit) to pin.
        token (`str`, *optional*): Hub token for private repos (never logged).
        method (`str`, *optional*): override the method to continue training with.
        allow_pickle (`bool`, *optional*, defaults to `False`): also read a pickle `adapter_model.bin` when there is
            no safetensors file (tensors only, `torch.load(weights_only=True)`). Only for adapters you trust.

    Example:

    ```python
    >>> model = load_adapter(base_model, "outputs/my-adapter")  # doctest: +SKIP
    ```
    """
    if has_adapters(model):
        raise ValueError("`model` already has hf-lorafa adapters; load the adapter into a fresh base model.")
    directory = resolve_adapter_dir(adapter, revision, token)
    peft_config = read_lora_config(directory / ADAPTER_CONFIG)
    ours = read_adapter_facts(directory)
    weights = read_adapter_weights(directory, allow_pickle)
    file = directory / (ADAPTER_WEIGHTS if (directory / ADAPTER_WEIGHTS).exists() else "adapter_model.bin")
    pairs, extra = split_adapter_tensors(weights, model, peft_config, file)
    uncovered = uncovered_targets(model, peft_config, pairs)
    if uncovered:
        logger.warning(
            "`adapter` %s covers %d of the %d layers its target_modules select in this model; %d have no weights "
            "in it and stay unadapted (e.g. %s). Was it trained on a smaller base (%s)? Load the matching base "
            "model, or ignore this if the adapter was meant to cover only those layers.",
            str(adapter), len(pairs), len(pairs) + len(uncovered), len(uncovered), ", ".join(uncovered[:3]),
            peft_config.base_model_name_or_path or "not named",
        )  # fmt: skip
    own = model.state_dict()
    for key, tensor in extra.items():
        if tensor.shape != own[key].shape:
            raise ValueError(
                f"`adapter` tensor {key!r} in {str(file)!r} has shape {tuple(tensor.shape)} but this model's has "
                f"{tuple(own[key].shape)}; the adapter was trained for another base (or another number of labels)."
            )
    try:
        saved = LoRAFAConfig.from_dict(ours.get("config", {})) if ours else None
    except (TypeError, ValueError) as err:
        raise ValueError(f"`adapter` file {str(directory / HF_LORAFA_FILE)!r} key 'config': {err}") from None
    # Adapters on parameters (MoE experts) take the config's rank and are selected by `target_parameters`.
    params = find_target_parameters(model, peft_config.target_parameters)
    ranks = {name: pair["lora_A"].shape[0] for name, pair in pairs.items() if name not in params}
    method = method or (saved.method if saved else "lorafa")
    # Every option the adapter was trained with (hf_lorafa.json), over what the PEFT files say of its shape.
    options = saved.to_dict() if saved else {}
    options.update(
        method=method,
        r=peft_config.r,
        alpha=peft_config.lora_alpha,
        dropout=peft_config.lora_dropout,
        target_modules=sorted(ranks),
        target_parameters=peft_config.target_parameters or None,
        modules_to_save=peft_config.modules_to_save,
        rank_pattern={n: r for n, r in ranks.items() if r != peft_config.r},
    )
    if method == "lora":  # LoRA trains its A on from here: where the saved A came from no longer applies
        options["frozen_a_init"] = "random"
    config = LoRAFAConfig(**options)
    inject_adapters(model, config, init_weights=False)
    for name, layer in adapter_layers(model).items():
        # rsLoRA (alpha/√r) and alpha_pattern give PEFT another scaling than our alpha/r: the ratio is folded into
        # B, so the layer computes exactly PEFT's s·B·A and saves back as a plain LoRA adapter with equal outputs.
        ratio = peft_rank_and_scaling(peft_config, name)[1] / layer.scaling
        layer.load_peft_weights(pairs[name]["lora_A"], pairs[name]["lora_B"] * ratio)
    if extra:
        model.load_state_dict(extra, strict=False)
    return model
