"""What a saved adapter may put into a model, checked before a single tensor is copied.

An adapter folder is untrusted input (a Hub download, a file from a colleague): its `adapter_config.json` must be
valid JSON with a PEFT LoRA config whose features hf-lorafa computes exactly as PEFT does (`use_rslora` and
`alpha_pattern` change the scaling `s`, folded into B; DoRA, LoRA biases and the rest are refused by name), and
its `adapter_model.safetensors` may hold only `lora_A`/`lora_B` pairs of linear layers, with ranks that agree with
the config, and the tensors of the declared `modules_to_save`; never a base weight, never NaN or inf.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tuners.injection import find_target_parameters, is_linear, matches_targets
from ..tuners.layers import layer_features
from ..tuners.param_layers import ParamAdapter

PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
PEFT_FIX = (
    "Merge it with PEFT instead (`PeftModel.from_pretrained(base, dir).merge_and_unload()`) or train a plain LoRA "
    "adapter."
)
# PEFT LoRA options whose outputs hf-lorafa's layers do not reproduce: (is it in use?, what it is). `fan_in_fan_out`
# is not one: PEFT overrides it with each layer's kind (True on Conv1D, False on nn.Linear), and so do we.
UNSUPPORTED = {
    "use_dora": (lambda v: bool(v), "DoRA (weight-decomposed LoRA)"),
    "lora_bias": (lambda v: bool(v), "a trained bias on lora_B"),
    "bias": (lambda v: v not in (None, "none"), "trained base-layer biases"),
    "layer_replication": (lambda v: bool(v), "layer replication"),
    "trainable_token_indices": (lambda v: bool(v), "trainable token embeddings"),
    "alora_invocation_tokens": (lambda v: bool(v), "activated LoRA (aLoRA)"),
    "use_qalora": (lambda v: bool(v), "QA-LoRA input pooling"),
    "arrow_config": (lambda v: v is not None, "Arrow routing"),
    "megatron_config": (lambda v: v is not None, "Megatron parallel layers"),
    "use_bdlora": (lambda v: bool(v), "block-diagonal LoRA"),
    "kasa_config": (lambda v: v is not None, "KaSA"),
    "monteclora_config": (lambda v: v is not None, "MonteCLoRA sampling"),
    "velora_config": (lambda v: v is not None, "VeLoRA"),
}


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, or one ValueError naming the file when it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"`adapter` file {str(path)!r} is not valid JSON ({err}); save or download the adapter again."
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"`adapter` file {str(path)!r} must hold a JSON object; it holds a {type(data).__name__}. Save or "
            "download the adapter again."
        )
    return data


def _bad_key(path: Path, key: str, value: Any, expected: str) -> ValueError:
    return ValueError(
        f"`adapter` file {str(path)!r} has {key!r}={value!r}; it must be {expected}. Fix the file or save the "
        "adapter again."
    )


def read_lora_config(path: Path):
    """The `peft.LoraConfig` of `adapter_config.json`, refusing what hf-lorafa cannot reproduce exactly."""
    from peft import LoraConfig

    if not path.is_file():
        raise ValueError(f"`adapter` folder {str(path.parent)!r} has no {path.name}; is it an adapter folder?")
    raw = read_json_object(path)
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise ValueError(
            f"`adapter` is a {peft_type} adapter ({'no `peft_type`' if peft_type is None else '`peft_type`'} in "
            f"{str(path)!r}); hf-lorafa loads LoRA adapters only."
        )
    for key, (in_use, what) in UNSUPPORTED.items():
        if key in raw and in_use(raw[key]):
            raise ValueError(
                f"`adapter` uses {what} (`{key}`={raw[key]!r} in {str(path)!r}), which hf-lorafa does not "
                f"implement: its outputs would differ from PEFT's. {PEFT_FIX}"
            )
    if not _is_rank(raw.get("r", 8)):
        raise _bad_key(path, "r", raw.get("r"), "a positive int")
    if not _is_number(raw.get("lora_alpha", 8)):
        raise _bad_key(path, "lora_alpha", raw.get("lora_alpha"), "a positive number")
    for key, check, expected in (
        ("rank_pattern", _is_rank, "positive ints"),
        ("alpha_pattern", _is_number, "positive numbers"),
    ):
        pattern = raw.get(key) or {}
        if not isinstance(pattern, dict) or not all(check(v) for v in pattern.values()):
            raise _bad_key(path, key, raw.get(key), f"an object mapping module names to {expected}")
    to_save = raw.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list) and all(isinstance(m, str) for m in to_save)):
        raise _bad_key(path, "modules_to_save", to_save, "a list of module names or null")
    known = {k: v for k, v in raw.items() if k in LoraConfig.__dataclass_fields__ and k != "peft_type"}
    try:
        return LoraConfig(**known)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`adapter` file {str(path)!r} is not a valid LoRA config: {err}") from None


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def peft_rank_and_scaling(config, name: str) -> tuple[int, float]:
    """The rank and scaling PEFT gives layer `name` (its `rank_pattern`/`alpha_pattern` matching, rsLoRA's √r)."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), name), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), name), config.lora_alpha)
    return r, alpha / (math.sqrt(r) if config.use_rslora else r)


def split_adapter_tensors(
    weights: dict[str, torch.Tensor], model: nn.Module, config, file: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """`{layer: {"lora_A": A, "lora_B": B}}` and the `modules_to_save` tensors (by model key) of a checked file.

    Refuses, naming the key: anything that is neither a lora_A/lora_B weight of a linear layer nor a tensor of a
    declared `modules_to_save` module (a base weight would silently replace the base model's), NaN/inf values,
    an incomplete pair, ranks that disagree with each other or with the config, and shapes of another base.
    """
    modules = dict(model.named_modules())
    params = find_target_parameters(model, config.target_parameters)  # adapter name -> (module, parameter)
    to_save = config.modules_to_save or []
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    where = f"in {str(file)!r}"
    for key, tensor in weights.items():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else None
        match = LORA_KEY.match(name or "")
        if name is not None and match and match["module"] in params:
            pairs.setdefault(match["module"], {})[match["part"]] = tensor
        elif name is not None and match and match["module"] in modules:
            module = modules[match["module"]]
            if not is_linear(module):
                raise ValueError(
                    f"`adapter` key {key!r} {where} targets {match['module']!r} ({type(module).__name__}); "
                    f"hf-lorafa adapts linear layers only (LoRA on embeddings, norms or convolutions is not "
                    f"supported). {PEFT_FIX}"
                )
            pairs.setdefault(match["module"], {})[match["part"]] = tensor
        elif name is not None and match:
            raise ValueError(
                f"`adapter` was trained for another base: this model has no module {match['module']!r} "
                f"(adapter base: {config.base_model_name_or_path!r}). Load the matching base model."
            )
        elif (
            name is not None
            and ".lora_" not in name
            and ".base_layer." not in name
            and _saved_module(name, modules, to_save)
        ):
            extra[name] = tensor
        else:
            raise ValueError(
                f"`adapter` file {str(file)!r} holds {key!r}, which is neither a lora_A/lora_B weight nor a tensor "
                f"of the adapter's modules_to_save ({to_save or 'none declared'}); hf-lorafa never lets an adapter "
                "overwrite base weights. Remove that tensor from the file, or name its module in `modules_to_save` "
                "of adapter_config.json if it was trained with the adapter."
            )
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            problem = "holds NaN or inf values" if tensor.is_floating_point() else f"is {tensor.dtype}, not float"
            raise ValueError(
                f"`adapter` tensor {key!r} {where} {problem}; the adapter is damaged (or its training diverged). "
                "Use an earlier checkpoint or train it again."
            )
    if not pairs:
        raise ValueError(f"`adapter` file {str(file)!r} holds no lora_A/lora_B weights; is it a LoRA adapter?")
    for name, pair in pairs.items():
        if name in params:
            module, key = params[name]
            _check_pair(name, pair, ParamAdapter.dims(getattr(modules[module], key), modules[module]), config, where)
        else:
            _check_pair(name, pair, (*layer_features(modules[name]), 1), config, where)
    return pairs, extra


def uncovered_targets(model: nn.Module, config, pairs: dict[str, Any]) -> list[str]:
    """Linear layers of `model` that the adapter's `target_modules` select but its file has no weights for.

    A 2-layer adapter in a 4-layer base of the same widths loads without a shape error and adapts half the model;
    PEFT warns about such missing keys, and so does `load_adapter` with this list.
    """
    targets = config.target_modules
    if not targets or targets == "all-linear" or config.layers_to_transform or config.exclude_modules:
        return []  # PEFT's own selection rules: not ours to second-guess
    targets = targets if isinstance(targets, str) else sorted(targets)
    return [
        name
        for name, module in model.named_modules()
        if name and name not in pairs and is_linear(module) and matches_targets(name, targets)
    ]


def _saved_module(name: str, modules: dict[str, nn.Module], to_save: list[str]) -> bool:
    """Whether model key `name` is a parameter or buffer of a module declared in `modules_to_save`."""
    path, _, local = name.rpartition(".")
    while path:
        module = modules.get(path)
        if module is not None and matches_targets(path, to_save):
            own = module.state_dict()
            return local in own
        path, _, head = path.rpartition(".")
        local = f"{head}.{local}"
    return False


def _check_pair(name: str, pair: dict[str, torch.Tensor], dims: tuple[int, int, int], config, where: str) -> None:
    """Check layer `name`'s A and B against its `(in, out, experts)`: A is (r·experts × in), B (out × r·experts)."""
    in_features, out_features, experts = dims
    for part in ("lora_A", "lora_B"):
        if part not in pair:
            raise ValueError(
                f"`adapter` has no {PEFT_PREFIX}{name}.{part}.weight {where} (its other half is there); the file is "
                "incomplete. Save or download the adapter again."
            )
    a, b = pair["lora_A"], pair["lora_B"]
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"`adapter` layer {name!r} {where} has lora_A of shape {tuple(a.shape)} and lora_B of shape "
            f"{tuple(b.shape)}; both must be matrices (r × in, out × r)."
        )
    if (a.shape[1], b.shape[0]) != (in_features, out_features):
        raise ValueError(
            f"`adapter` was trained for another base: layer {name!r} is {in_features}→{out_features} here but "
            f"{a.shape[1]}→{b.shape[0]} in the adapter. Load the matching base model."
        )
    if a.shape[0] != b.shape[1]:
        raise ValueError(
            f"`adapter` layer {name!r} {where} has lora_A of rank {a.shape[0]} but lora_B of rank {b.shape[1]}; "
            "the two halves of a layer must have the same rank. The file is damaged: save it again."
        )
    rank, _ = peft_rank_and_scaling(config, name)
    if a.shape[0] != rank * experts:
        raise ValueError(
            f"`adapter` layer {name!r} {where} has rank {a.shape[0] // experts} tensors but adapter_config.json gives "
            f"it r={rank} (`r` / `rank_pattern`); the config and the weights disagree. Save the adapter again."
        )
