"""The one configuration shared by LoRA, LoRA-FA, LaMDA and LaMDA++.

Every adapter option is declared once, here, with its default, its help text, its allowed values or range and, where
it differs, its name among the training arguments (`r` is `--lora_r`). `LoRAFAArguments`, the CLI help, the model
card, `hf_lorafa.json` and `load_adapter` all derive from these declarations, and so does this class's docstring.
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

# Adapter parameters keep PEFT's `lora_` prefix (lora_A, lora_B, LaMDA's lora_S): state dicts map 1:1 to PEFT's.
ADAPTER_PREFIX = "lora_"
Method = Literal["lora", "lorafa", "lamda", "lamda++"]
METHODS: tuple[str, ...] = typing.get_args(Method)  # each described in full by `hf_lorafa.tuners.methods.METHODS`
LamdaInit = Literal["spectral", "residual", "svd", "published", "identity"]
FrozenAInit = Literal["random", "gradient", "activations"]
FROZEN_A_INITS: tuple[str, ...] = typing.get_args(FrozenAInit)


def is_adapter_tensor(name: str) -> bool:
    """Whether parameter or state-dict key `name` (`…q_proj.lora_B.weight`) belongs to an adapter."""
    return ADAPTER_PREFIX in name


def option(
    default: Any,
    help: str,
    *,
    argument: str | None = None,
    valid: tuple[Callable[[Any], bool], str] | None = None,
    init_only: bool = False,
    default_factory: Any = MISSING,
) -> Any:
    """Declare one adapter option.

    Args:
        default: its default value.
        help (`str`): what it does and its values, for the docstring, the CLI and the card.
        argument (`str`, *optional*): its name among the training arguments, when not the field's own.
        valid (`tuple`, *optional*): `(predicate, what it must be)` for values of the right type, e.g.
            `(lambda r: r > 0, "a positive rank such as 8 or 16")`.
        init_only (`bool`): it sets the adapter's initial values only; a reloaded adapter keeps its saved tensors.
    """
    metadata = {"help": help, "argument": argument, "valid": valid, "init_only": init_only}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class LoRAFAConfig:
    """Configuration of the adapters that [`inject_adapters`] puts into a model."""

    method: Method = option(
        "lorafa",
        "`lora` (A and B trained), `lorafa` (A frozen, only B trained; backward keeps r values per token), `lamda` "
        "(frozen A, trained r×r core `lora_S`, B frozen early in training) or `lamda++` (LaMDA with per-layer ranks "
        "from each weight's spectrum).",
        argument="adapter_method",
    )
    r: int = option(
        16,
        "Adapter rank; for LaMDA++ the mean rank. LoRA-FA at twice a LoRA's rank has about that LoRA's trainable "
        "parameters (see BENCHMARKS.md).",
        argument="lora_r",
        valid=(lambda r: r > 0, "a positive rank such as 8 or 16"),
    )
    alpha: float = option(
        32,
        "Scaling numerator: the adapter's output is multiplied by `alpha / r`.",
        argument="lora_alpha",
        valid=(lambda a: a > 0, "a positive number (scaling = alpha / r)"),
    )
    dropout: float = option(
        0.0,
        "Dropout on the adapter's input, in [0, 1). LoRA-FA and LaMDA regenerate the mask in backward instead of "
        "keeping it.",
        argument="lora_dropout",
        valid=(lambda p: 0 <= p < 1, "in [0, 1)"),
    )
    target_modules: str | list[str] = option(
        "all-linear",
        "`all-linear` (every linear layer but the output head), a list of module names (matched on the full name or "
        "its last dotted parts, as PEFT does) or a regular expression matched on full module names.",
        argument="lora_target_modules",
    )
    modules_to_save: list[str] | None = option(
        None,
        "Extra modules trained in full and saved with the adapter (e.g. a classification head), as in PEFT.",
        argument="lora_modules_to_save",
    )
    target_parameters: list[str] | None = option(
        None,
        "Parameters to adapt that are not a linear layer's weight, as PEFT's `target_parameters`: the stacked expert "
        "weights of Mixture-of-Experts models (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj` in Qwen3-MoE and "
        "Mixtral), matched on the full parameter name or its last dotted parts. Methods `lora` and `lorafa`, without "
        "dropout.",
        argument="lora_target_parameters",
    )
    lorafa_gradient_correction: bool = option(
        True,
        "LoRA-FA v2: precondition B's gradient by `(A Aᵀ)⁻¹ / s²` so that B's update is full fine-tuning's "
        "projected onto A's row space.",
    )
    lorafa_lr_ratio: float = option(
        4.0,
        "Learning-rate multiplier of LoRA-FA's `lora_B`. A frozen A removes half of LoRA's update directions; a "
        "larger step on B recovers the pace (the default's study: research/design-notes.md).",
        valid=(lambda x: x > 0, "positive (1.0 = LoRA's learning rate)"),
    )
    lamda_freeze_fraction: float = option(
        0.75,
        "Fraction of the total training steps over which LaMDA's B is frozen; afterwards only S (r² per layer) "
        "trains (the default's study: research/design-notes.md).",
        valid=(lambda f: 0 <= f <= 1, "a fraction of training in [0, 1]"),
    )
    lamda_freeze_order: Literal["ascending", "all"] = option(
        "ascending",
        "Order in which LaMDA's B freezes: `ascending` (column by column, smallest singular value first) or `all` "
        "(the whole of B at the end of the freezing window).",
    )
    lamda_init: LamdaInit = option(
        "spectral",
        "How LaMDA starts: `spectral` (random orthonormal A; B and S from W's SVD, output unchanged at step 0), "
        "`identity` (B = 0, S = I: LoRA-FA until B freezes), or, for comparison with the paper (research/), "
        "`residual`, `svd` and `published`. See `hf_lorafa/tuners/lamda.py`.",
        init_only=True,
    )
    lamda_lr_ratio: float = option(
        1.0,
        "Learning-rate multiplier of LaMDA's `lora_S` and `lora_B`.",
        valid=(lambda x: x > 0, "positive (1.0 = the learning rate)"),
    )
    lamda_s_lr_ratio: float = option(
        1.0,
        "Further learning-rate multiplier of LaMDA's r×r core `lora_S` alone (S trains at `lamda_lr_ratio` × "
        "`lamda_s_lr_ratio` × the learning rate).",
        valid=(lambda x: x > 0, "positive (1.0 = S at B's learning rate)"),
    )
    frozen_a_init: FrozenAInit = option(
        "random",
        "The frozen A of LoRA-FA, LaMDA and LaMDA++: `random` (orthonormal rows from `init_seed`), or, as an "
        "experiment (research/), `gradient` / `activations` (from the first training batches).",
        init_only=True,
    )
    lamda_rank_budget: int | None = option(
        None,
        "LaMDA++ total rank over all adapted layers; by default `r` × the number of adapted layers.",
        valid=(lambda b: b > 0, "a positive total rank or None"),
    )
    lamda_min_rank: int = option(2, "Smallest rank LaMDA++ gives a layer.", valid=(lambda m: m > 0, "at least 1"))
    init_seed: int = option(
        0,
        "Seed of A's random orthonormal initialisation, so the same config gives the same A. The trainer sets it to "
        "the training `seed`.",
        init_only=True,
    )
    rank_pattern: dict[str, int] = option(
        None,
        "Per-layer ranks, filled in by injection (LaMDA++, or a loaded PEFT adapter with a `rank_pattern`).",
        default_factory=dict,
    )

    def __post_init__(self) -> None:
        self.target_modules, self.modules_to_save = as_names(self.target_modules), as_names(self.modules_to_save)
        self.target_parameters = as_names(self.target_parameters)
        validate_options(vars(self))

    @property
    def scaling(self) -> float:
        """`alpha / r`, the adapter output's multiplier at the config's rank."""
        return self.alpha / self.r

    def rank_for(self, name: str) -> int:
        """The rank of the adapter on module `name` (LaMDA++ and loaded PEFT adapters may vary it)."""
        return self.rank_pattern.get(name, self.r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoRAFAConfig:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        return cls(**known)


OPTIONS = {f.name: f for f in fields(LoRAFAConfig)}
TYPES = typing.get_type_hints(LoRAFAConfig)
INIT_ONLY = tuple(name for name, f in OPTIONS.items() if f.metadata["init_only"])


def argument_name(name: str) -> str:
    """The training-argument (and command-line flag) name of option `name`."""
    return OPTIONS[name].metadata["argument"] or name


def choices(name: str) -> tuple[Any, ...] | None:
    """The values option `name` allows, when its type is a `Literal`."""
    kind = TYPES[name]
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else None


def as_names(value: Any) -> Any:
    """A tuple of module names is a list (YAML and JSON give lists, Python users may pass tuples)."""
    return list(value) if isinstance(value, tuple) else value


def _type_error(name: str, value: Any) -> str | None:
    """What option `name` must be, when `value` is not of its declared type; None when it is."""
    kind = TYPES[name]
    allowed = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, type(int | None)) else (kind,)
    if value is None:
        return None if type(None) in allowed else "a value (not None)"
    for each in allowed:
        if typing.get_origin(each) is Literal:
            return None if value in typing.get_args(each) else f"one of {', '.join(map(str, typing.get_args(each)))}"
        if each is bool:
            return None if isinstance(value, bool) else "true or false (a bool, not a string)"
        if each is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if each is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None if math.isfinite(value) else "a finite number"
        if each is str and isinstance(value, str):
            return None
        if typing.get_origin(each) is list and isinstance(value, list) and value:
            if all(isinstance(v, str) and v for v in value):
                return None
        if typing.get_origin(each) is dict and isinstance(value, dict):
            return None
    names = {int: "an int", float: "a number", str: "a string", bool: "a bool"}
    wanted = " or ".join(names.get(a, "a non-empty list of module names") for a in allowed if a is not type(None))
    return wanted + (" or None" if type(None) in allowed else "")


def validate_options(values: dict[str, Any], label: Callable[[str], str] = str) -> None:
    """Check every option's type, range and combination, naming each as `label(name)` (`lora_r` for `r`).

    Raises:
        TypeError: a value of the wrong type (a string for a number or a bool, a float rank, nan).
        ValueError: a value out of its range or not among its choices.
    """
    for name, f in OPTIONS.items():
        value = values[name]
        if name == "target_modules" and value == [] and values["target_parameters"]:
            continue  # parameters only, as PEFT's `target_modules=[]` beside `target_parameters`
        wanted = _type_error(name, value)
        if wanted is not None:
            error = ValueError if choices(name) or wanted == "a finite number" else TypeError
            raise error(f"`{label(name)}` must be {wanted}; got {value!r}.")
        if value is not None and f.metadata["valid"] and not f.metadata["valid"][0](value):
            raise ValueError(f"`{label(name)}` must be {f.metadata['valid'][1]}; got {value!r}.")
    targets = values["target_modules"]
    if isinstance(targets, str) and targets != "all-linear":
        try:
            re.compile(targets)
        except re.error as err:
            raise ValueError(
                f"`{label('target_modules')}` is neither 'all-linear' nor a valid regular expression: {err}; "
                "pass a list of module names such as ['q_proj', 'v_proj'] instead."
            ) from None
    method, a_init, l_init = values["method"], values["frozen_a_init"], values["lamda_init"]
    if values["target_parameters"]:
        _check_target_parameters(values, label)
    if a_init != "random" and method == "lora":
        raise ValueError(
            f"`frozen_a_init={a_init!r}` sets the frozen A of method 'lorafa', 'lamda' or 'lamda++'; LoRA trains "
            f"its A. Use frozen_a_init='random' with {label('method')}='lora'."
        )
    if a_init != "random" and method != "lorafa" and l_init in ("residual", "svd"):
        raise ValueError(
            f"`lamda_init={l_init!r}` takes A from W's singular vectors, so `frozen_a_init={a_init!r}` cannot set "
            "it; use lamda_init='spectral', 'identity' or 'published' with it."
        )


def _check_target_parameters(values: dict[str, Any], label: Callable[[str], str]) -> None:
    """What an adapter on a parameter (`tuners/param_layers.py`) cannot do, named with what works instead."""
    name = label("target_parameters")
    if values["method"] not in ("lora", "lorafa"):
        raise ValueError(
            f"`{name}` works with {label('method')}='lora' or 'lorafa'; LaMDA's SVD start and r×r core are built for "
            f"linear layers. Train the expert parameters with 'lorafa', or drop `{name}` to use "
            f"{values['method']!r} on the linear layers only."
        )
    if values["dropout"]:
        raise ValueError(
            f"`{name}` needs {label('dropout')}=0: an adapter on a parameter adds s·B·A to the weight itself, so "
            "there is no input of its own to drop (PEFT refuses it too)."
        )
    if values["frozen_a_init"] != "random":
        raise ValueError(
            f"`{name}` needs frozen_a_init='random': the data-driven A is computed for linear layers only."
        )


def _docstring() -> str:
    """LoRAFAConfig's docstring, HF style, from the options' declarations."""
    lines = ["Configuration of the adapters that [`inject_adapters`] puts into a model.", "", "Args:"]
    for name, f in OPTIONS.items():
        if name == "rank_pattern":
            continue
        kind = TYPES[name]
        shown = "str" if choices(name) else getattr(kind, "__name__", str(kind).replace("typing.", ""))
        default = f"defaults to `{f.default!r}`" if f.default is not None else ""
        lines.append(f"    {name} (`{shown}`, *optional*{', ' + default if default else ''}):")
        lines.append(f"        {f.metadata['help']}")
    lines += [
        "",
        "Example:",
        "",
        "```python",
        ">>> from hf_lorafa import LoRAFAConfig",
        '>>> LoRAFAConfig(method="lorafa", r=8, target_modules=["q_proj", "v_proj"]).scaling',
        "4.0",
        "```",
    ]
    return "\n".join(lines)


LoRAFAConfig.__doc__ = _docstring()
