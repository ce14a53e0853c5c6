"""The model card (README.md) of an adapter folder, rendered from `model_cards/adapter_card.md` (installed as the
`hf_lorafa.model_cards` package data, so wheels carry it).

Built like TRL's cards: `huggingface_hub.ModelCard.from_template(ModelCardData(...), template_path=...)`. The card
reads what the folder holds (`hf_lorafa.json`, `adapter_config.json`, `memory.json`, `memory.png`) and tolerates
missing pieces: a folder written by `save_adapter` alone has only the method and its config. Nothing that looks
like a Hub token ever reaches the card (secret-named fields are dropped, token-shaped strings are masked).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from ..memory.measure import format_bytes
from ..redact import drop_secrets, scrub_secrets
from ..tuners.methods import METHODS, AdapterMethod

TEMPLATE_PACKAGE = "hf_lorafa.model_cards"
TEMPLATE_NAME = "adapter_card.md"

TASKS = {  # PEFT task type → (pipeline_tag, transformers auto class)
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_id(value: Any) -> str | None:
    """`value` when it names a Hub repo: `user/name`, and not a local path that happens to look like one."""
    if isinstance(value, str) and HUB_ID.match(value) and not Path(value).expanduser().exists():
        return value
    return None


def _dataset_label(dataset: Any) -> str | None:
    """How the card names the training data: a Hub id as is, a local file by its name only (never its path)."""
    if not isinstance(dataset, str) or not dataset:
        return None
    if _hub_id(dataset) or "/" not in dataset and not Path(dataset).suffix:
        return dataset  # a Hub id, or a built-in name such as `chatterbot`
    return f"a local dataset file (`{Path(dataset).name}`)"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ranks(adapter_config: dict[str, Any], method: AdapterMethod) -> str:
    r = adapter_config.get("r", "n/a")
    pattern = adapter_config.get("rank_pattern") or {}
    if not pattern:
        return f"{r} (every layer)"
    ranks = list(pattern.values())
    label = (
        f"per-layer ranks from the spectrum ({method.display_name})"
        if method.ranks_from_spectrum
        else "per-layer ranks"
    )
    return f"{label}: default {r}, {len(ranks)} layers differ (min {min(ranks)}, max {max(ranks)})"


def _target_modules(adapter_config: dict[str, Any]) -> str:
    modules = adapter_config.get("target_modules") or []
    if isinstance(modules, str):
        return f"`{modules}`"
    shown = ", ".join(f"`{m}`" for m in sorted(modules)[:8])
    return shown + (f", … ({len(modules)} in total)" if len(modules) > 8 else "")


def _method_options(method: AdapterMethod, config: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [] if method.trains_a else [("A (projection-down)", "frozen")]
    for label, key, suffix in method.card_options:
        if config.get(key) is not None:
            rows.append((label, _fmt(config[key]) + suffix))
    return rows


def _trainable(info: dict[str, Any], folder: Path) -> str:
    trainable, total = info.get("trainable_parameters"), info.get("total_parameters")
    if isinstance(trainable, int) and isinstance(total, int) and total:
        return f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    if isinstance(trainable, int):
        return f"{trainable:,}"
    try:
        from safetensors import safe_open

        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as weights:
            saved = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())  # noqa: SIM118
    except Exception:  # a card is still worth writing without the count
        return "n/a"
    return f"{saved:,} values in the saved adapter"


def _quantization(value: Any) -> str:
    if not value:
        return "none (full-precision base weights)"
    if isinstance(value, dict):
        if value.get("load_in_4bit"):
            return f"bitsandbytes 4-bit ({value.get('bnb_4bit_quant_type', 'nf4')})"
        if value.get("load_in_8bit"):
            return "bitsandbytes 8-bit (LLM.int8())"
    return str(value)


def _memory(folder: Path, info: dict[str, Any]) -> dict[str, Any] | None:
    figures = _read_json(folder / "memory.json") or info.get("memory") or {}
    if not isinstance(figures, dict) or figures.get("peak_bytes") is None:
        return None
    kind = {"process_rss": "process RSS", "cuda_allocated": "CUDA allocator"}.get(figures.get("peak_kind"), "peak")
    activations = figures.get("activation_bytes")
    return {
        "peak": format_bytes(figures["peak_bytes"]),
        "peak_kind": kind,
        "activations": format_bytes(activations) if activations is not None else "n/a",
        "device": figures.get("device", "n/a"),
        "plot": (folder / "memory.png").exists(),
    }


def _versions() -> list[tuple[str, str]]:
    import peft
    import torch
    import transformers

    from ..version import __version__

    return [("hf-lorafa", __version__), ("torch", torch.__version__), ("transformers", transformers.__version__),
            ("peft", peft.__version__)]  # fmt: skip


def template_path() -> Path:
    """The Jinja template of the card, from the installed package (a wheel) or the checkout (editable)."""
    from importlib.resources import files

    path = Path(str(files(TEMPLATE_PACKAGE) / TEMPLATE_NAME))
    if not path.is_file():
        raise FileNotFoundError(
            f"Model card template {TEMPLATE_NAME!r} is missing from {TEMPLATE_PACKAGE}; reinstall hf-lorafa "
            "(`pip install --force-reinstall hf-lorafa`)."
        )
    return path


def write_model_card(folder: str | os.PathLike, *, extra: dict[str, Any] | None = None) -> Path:
    """Render `README.md` (the model card) in an adapter folder and return its path.

    Args:
        folder (`str` or `os.PathLike`): an adapter folder from [`save_adapter`] or `trainer.save_model()`.
        extra (`dict`, *optional*): fields that override `hf_lorafa.json`'s for the card only (`base_model`,
            `dataset`, `training`, `results`, `memory`, `trainable_parameters`, ...), plus `repo_id` (used in the
            usage snippets and title), `license` and `language`. Secret-named string fields are ignored.

    Example:

    ```python
    >>> write_model_card("outputs/my-adapter", extra={"repo_id": "me/my-adapter"})  # doctest: +SKIP
    PosixPath('outputs/my-adapter/README.md')
    ```
    """
    from huggingface_hub import ModelCard, ModelCardData

    directory = Path(folder)
    adapter_config = _read_json(directory / "adapter_config.json")
    if not adapter_config:
        raise FileNotFoundError(
            f"`folder`={str(directory)!r} has no readable adapter_config.json; save the adapter there first "
            "(save_adapter(model, folder) or trainer.save_model())."
        )
    info = drop_secrets({**_read_json(directory / "hf_lorafa.json"), **(extra or {})})
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    method = info.get("method") or config.get("method") or "lora"
    spec = METHODS.get(method, METHODS["lora"])
    name, tag, paper_id, paper_title, summary = (
        spec.display_name,
        spec.hub_tag,
        spec.paper_id,
        spec.paper_title,
        spec.summary,
    )
    base_model = info.get("base_model") or adapter_config.get("base_model_name_or_path")
    # Only Hub ids are named: the Hub validates them, and a local path means nothing to readers (and may be private).
    base_id = _hub_id(base_model)
    dataset = info.get("dataset")
    pipeline_tag, auto_class = TASKS.get(adapter_config.get("task_type") or "", (None, "AutoModel"))
    repo_id = info.get("repo_id")
    card_data = ModelCardData(
        base_model=base_id,
        # The Hub recognises PEFT-format adapters (usage widget, "adapter of" link) by library_name "peft";
        # hf-lorafa is named in the tags instead, so the adapter stays discoverable under both.
        library_name="peft",
        tags=[tag, "lora", "hf-lorafa", "peft"],
        datasets=[_hub_id(dataset)] if _hub_id(dataset) else None,
        license=info.get("license"),
        language=info.get("language"),
        pipeline_tag=pipeline_tag,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path()),
        title=repo_id.split("/")[-1] if repo_id else f"{name} adapter" + (f" for {base_id}" if base_id else ""),
        method=method,
        method_name=name,
        method_summary=summary,
        paper_id=paper_id,
        paper_title=paper_title,
        base_model=base_id,
        local_base=bool(base_model) and not base_id,
        ranks=_ranks(adapter_config, spec),
        alpha=_fmt(adapter_config.get("lora_alpha", "n/a")),
        dropout=_fmt(adapter_config.get("lora_dropout", "n/a")),
        target_modules=_target_modules(adapter_config),
        method_options=_method_options(spec, config),
        trainable=_trainable(info, directory),
        quantization=_quantization(info.get("quantization")),
        dataset=_dataset_label(dataset),
        training=[(f"`{k}`", _fmt(v)) for k, v in (info.get("training") or {}).items() if v is not None],
        results=[(f"`{k}`", _fmt(v)) for k, v in (info.get("results") or {}).items() if v is not None],
        memory=_memory(directory, info),
        auto_class=auto_class,
        # The usage samples run as printed once the placeholders name a folder on the reader's disk.
        base_ref=base_id or "path/to/base-model",
        adapter_ref=repo_id or f"path/to/{directory.resolve().name}",
        versions=_versions(),
    )
    path = directory / "README.md"
    path.write_text(scrub_secrets(str(card)) + "\n", encoding="utf-8")
    return path
