"""Find target linear layers, wrap them in adapters (PEFT's `setattr(parent, name, new)`), freeze the rest."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter

import torch
from torch import nn

from .config import LoRAFAConfig
from .lamda import lamda_plus_plus_ranks
from .layers import AdapterLayer, base_weight, is_fan_in_fan_out
from .methods import METHODS
from .param_layers import ParamAdapter
from .quantization import check_base_layer, check_quantization

logger = logging.getLogger(__name__)


def is_linear(module: nn.Module) -> bool:
    """Whether `module` can take an adapter: nn.Linear (bitsandbytes' Linear4bit / Linear8bitLt subclass it) or
    transformers' Conv1D, a linear layer with its weight stored transposed (GPT-2's family), as PEFT's `all-linear`."""
    return (isinstance(module, nn.Linear) or is_fan_in_fan_out(module)) and not isinstance(module, AdapterLayer)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer in `model`, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, AdapterLayer) for m in model.modules())


def matches_targets(name: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _inside(name: str, patterns: str | list[str]) -> bool:
    """Whether module `name` or a module containing it matches `patterns` (`pooler.dense` is in `pooler`)."""
    parts = name.split(".")
    return any(matches_targets(".".join(parts[:i]), patterns) for i in range(1, len(parts) + 1))


def find_target_modules(model: nn.Module, config: LoRAFAConfig) -> dict[str, nn.Module]:
    """The linear layers `config.target_modules` selects, by full module name.

    `"all-linear"` is every linear layer but the output head and `modules_to_save`, as in PEFT.
    """
    linear = {name: m for name, m in model.named_modules() if is_linear(m)}
    excluded = set()
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    for name, module in linear.items():
        if module is head or (config.modules_to_save and _inside(name, config.modules_to_save)):
            excluded.add(name)
    if config.target_modules == "all-linear":
        targets = {n: m for n, m in linear.items() if n not in excluded}
    else:
        # A layer inside a module trained in full takes no adapter (PEFT wraps such a module whole).
        targets = {n: m for n, m in linear.items() if matches_targets(n, config.target_modules) and n not in excluded}
        others = [n for n, m in model.named_modules() if n not in linear and matches_targets(n, config.target_modules)]
        if others and not targets:
            raise TypeError(
                f"`target_modules` matched {others[0]!r}, a {type(model.get_submodule(others[0])).__name__}; "
                "only linear layers can take adapters."
            )
    if not targets and not config.target_parameters:
        short = sorted({n.rsplit(".", 1)[-1] for n in linear if n not in excluded})
        if short:
            raise ValueError(
                f"`target_modules`={config.target_modules!r} matched nothing; linear layers in this model: "
                f"{', '.join(short)}. Pass some of these names, or 'all-linear'."
            )
        raise ValueError(
            f"`target_modules`={config.target_modules!r} matched nothing: this model has no nn.Linear or Conv1D layer "
            f"to adapt. Its layers with weight matrices: {weight_layers(model)}; hf-lorafa adapts nn.Linear, "
            "transformers' Conv1D and bitsandbytes Linear4bit / Linear8bitLt layers."
        )
    return targets


def find_target_parameters(model: nn.Module, wanted: list[str] | None) -> dict[str, tuple[str, str]]:
    """`{adapter name: (module name, parameter name)}` of the parameters `wanted` (`target_parameters`) selects.

    Matched on the full parameter name or its last dotted parts, as PEFT does. A module's parameters are wrapped in
    the order it registers them, the first innermost (PEFT's nesting), so the adapter of a module's first of two
    parameters is named `<module>.base_layer` and that of the second `<module>`.
    """
    wanted = wanted or []
    found = [
        (name, key)
        for name, module in model.named_modules()
        for key, _ in module.named_parameters(recurse=False)
        if name and not isinstance(module, AdapterLayer) and matches_targets(f"{name}.{key}", wanted)
    ]
    if wanted and not found:
        raise ValueError(
            f"`target_parameters`={wanted!r} matched no parameter; stacked expert parameters in this model: "
            f"{', '.join(_expert_parameters(model)) or 'none'}."
        )
    linear = [name for name, _ in found if is_linear(model.get_submodule(name))]
    if linear:
        raise ValueError(
            f"`target_parameters` selected a parameter of linear layer {linear[0]!r}; adapt linear layers with "
            "`target_modules` instead."
        )
    count, seen = Counter(name for name, _ in found), Counter()
    targets = {}
    for name, key in found:
        seen[name] += 1
        targets[name + ".base_layer" * (count[name] - seen[name])] = (name, key)
    return targets


def _expert_parameters(model: nn.Module, skip: set[tuple[str, str]] = frozenset()) -> list[str]:
    """The model's 3-D parameters (stacked MoE experts) but the (module, parameter) pairs in `skip`, each named once
    for all layers, with the number of layers (`mlp.experts.gate_up_proj (×2)`)."""
    names = [n for n, p in model.named_parameters() if p.dim() == 3 and n.rpartition(".")[::2] not in skip]
    counts = Counter(re.sub(r"^(.*\.)?\d+\.", "", n) for n in names)
    return [f"{name} (×{n})" if n > 1 else name for name, n in counts.items()]


def _say_what_all_linear_left(model: nn.Module, linear: list[str], params: dict[str, tuple[str, str]]) -> None:
    """`all-linear` takes linear layers only; on an MoE model most weights are experts' parameters: say so, once."""
    left = _expert_parameters(model, set(params.values()))
    if left:
        plain = sorted({name.split(" ")[0] for name in left})
        logger.warning(
            "hf-lorafa: target_modules='all-linear' adapted %d linear layers (%s) and left the stacked expert "
            "parameters %s: they are parameters, not linear layers. To adapt them too, pass target_parameters=%s "
            "(--lora_target_parameters %s).",
            len(linear), ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear})) or "none", ", ".join(left),
            plain, ",".join(plain),
        )  # fmt: skip


def weight_layers(model: nn.Module) -> str:
    """Each kind of module holding a 2-D weight (embeddings aside) with an example name, for error messages."""
    kinds: dict[str, str] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name and isinstance(weight, torch.Tensor) and weight.dim() == 2 and not isinstance(module, nn.Embedding):
            kinds.setdefault(type(module).__name__, name)
    return ", ".join(f"{kind} (e.g. {name})" for kind, name in sorted(kinds.items())) or "none"


def build_layer(config: LoRAFAConfig, base: nn.Module, r: int) -> AdapterLayer:
    return METHODS[config.method].build(config, base, r)


def inject_adapters(model: nn.Module, config: LoRAFAConfig, *, init_weights: bool = True) -> nn.Module:
    """Wrap the target layers of `model` in adapters, in place, and freeze everything else.

    Args:
        model (`nn.Module`):
            A transformers model (or any module with linear layers), full precision or bitsandbytes-quantized.
        config ([`LoRAFAConfig`]):
            Which method, rank and layers.
        init_weights (`bool`, *optional*, defaults to `True`):
            Initialise adapters (orthonormal A / SVD for LaMDA); `False` when weights are loaded right after.

    Returns:
        The same `model`, with `model.hf_lorafa_config` set.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM
    >>> from hf_lorafa import LoRAFAConfig, inject_adapters
    >>> model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> model = inject_adapters(model, LoRAFAConfig(method="lorafa", r=16))  # doctest: +SKIP
    ```
    """
    if not isinstance(config, LoRAFAConfig):
        raise TypeError(f"`config` must be a LoRAFAConfig; got {type(config).__name__}.")
    if has_adapters(model):
        raise ValueError(
            "`model` already has hf-lorafa adapters (injecting twice); call merge_adapters(model) first to fold "
            "them in, or train the model as it is."
        )
    config = dataclasses.replace(config, rank_pattern=dict(config.rank_pattern))
    check_quantization(model)  # GPTQ / AWQ / torch.ao layers are not nn.Linear: say so, not "matched nothing"
    targets = find_target_modules(model, config)
    params = find_target_parameters(model, config.target_parameters)
    if config.target_modules == "all-linear":
        _say_what_all_linear_left(model, list(targets), params)
    for name, base in targets.items():
        check_base_layer(name, base)
    if METHODS[config.method].ranks_from_spectrum and init_weights and not config.rank_pattern:
        weights = {name: base_weight(m) for name, m in targets.items()}
        config.rank_pattern = lamda_plus_plus_ranks(
            weights, config.r, config.lamda_rank_budget, min(config.lamda_min_rank, config.r)
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for index, (name, base) in enumerate(targets.items()):
        try:
            layer = build_layer(config, base, config.rank_for(name))
        except ValueError as err:
            raise ValueError(f"{err} (layer {name!r})") from None
        if init_weights:
            layer.init_lora(config.init_seed * 100_003 + index)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    for index, (name, key) in enumerate(params.values(), start=len(targets)):
        # Wrapping whatever is at `name` now nests a module's second parameter's adapter around its first's.
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        spec = METHODS[config.method]
        layer = ParamAdapter(
            getattr(parent, child), key, config.r, config.alpha, train_a=spec.trains_a,
            gradient_correction=config.lorafa_gradient_correction,
        )  # fmt: skip
        if init_weights:
            layer.init_lora(config.init_seed * 100_003 + index)
        setattr(parent, child, layer)
    wanted = config.modules_to_save
    to_save = [name for name, _ in model.named_modules() if name and wanted and matches_targets(name, wanted)]
    untie(model, to_save)
    for name in to_save:
        model.get_submodule(name).requires_grad_(True)
    model.hf_lorafa_config = config
    # A from the data is set once, by the trainer's first train() (calibration.py); a loaded adapter keeps its own.
    model.hf_lorafa_a_pending = init_weights and config.frozen_a_init != "random"
    trainable, total = count_parameters(model)
    logger.info(
        "hf-lorafa: %s r=%d on %d layers; trainable params: %s of %s (%.4f%%)",
        config.method,
        config.r,
        len(targets) + len(params),
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )
    return model


def untie(model: nn.Module, names: list[str]) -> None:
    """Give modules `names` their own copy of any parameter they share with a module outside them (an LM head tied to
    the input embeddings), as PEFT's `ModulesToSaveWrapper` does: the copy trains and is saved under the module's own
    key, the other module keeps the base weight, frozen, and `peft.PeftModel.from_pretrained` gives the same logits.
    The config then says the weights are untied, so a merged model saves and reloads its trained head."""

    def kept(path: str) -> bool:
        return any(path.startswith(f"{name}.") for name in names)

    paths: dict[int, list[str]] = {}
    for path, param in model.named_parameters(remove_duplicate=False):
        paths.setdefault(id(param), []).append(path)
    shared = [
        (path, param)
        for path, param in model.named_parameters(remove_duplicate=False)
        if kept(path) and not all(map(kept, paths[id(param)]))
    ]
    for path, param in shared:
        owner, _, key = path.rpartition(".")
        copy = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        setattr(model.get_submodule(owner), key, copy)
    if shared and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """`(trainable, total)` parameter counts; 4-bit weights count their packed elements twice, as PEFT does."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total
