"""The demo's models, without gradio: the base loaded once, one merged copy per adapter, and each adapter's card
facts (from `hf_lorafa.json`) for the page. `demo.py` builds the Gradio app on top.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapter_io.peft_format import HF_LORAFA_FILE, load_adapter, resolve_adapter_dir
from ..memory.measure import format_bytes

BASE = "base"


@dataclass
class Served:
    """One servable choice of the page: the base model or the base with one adapter merged in."""

    name: str
    model: nn.Module
    facts: dict[str, Any] = field(default_factory=dict)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def adapter_facts(directory: str | os.PathLike) -> dict[str, Any]:
    """Card facts of a saved adapter (method, rank, parameters, memory) from `hf_lorafa.json`; missing keys skipped.

    Example:

    ```python
    >>> adapter_facts("outputs/smollm2-lorafa")["Method"]  # doctest: +SKIP
    'lorafa'
    ```
    """
    directory = Path(directory)
    ours, peft_file = directory / HF_LORAFA_FILE, directory / "adapter_config.json"
    info = json.loads(ours.read_text()) if ours.exists() else {}
    if not info and peft_file.exists():  # a plain PEFT LoRA adapter: only its config is known
        peft = json.loads(peft_file.read_text())
        info = {"method": "lora (PEFT)", "config": peft, "base_model": peft.get("base_model_name_or_path")}
    memory, results = info.get("memory") or {}, info.get("results") or {}
    trainable, total = info.get("trainable_parameters"), info.get("total_parameters")
    share = f" ({100 * trainable / total:.2f}% of {total:,})" if _number(trainable) and _number(total) else ""
    facts = {
        "Method": info.get("method"),
        "Rank": (info.get("config") or {}).get("r"),
        "Trainable params": f"{trainable:,}{share}" if _number(trainable) else None,
        "Peak memory": f"{format_bytes(memory['peak_bytes'])} ({memory.get('peak_kind', 'peak')})"
        if _number(memory.get("peak_bytes"))
        else None,
        "Activation memory": format_bytes(memory["activation_bytes"])
        if _number(memory.get("activation_bytes"))
        else None,
        "Eval loss": f"{results['eval_loss']:.4f}" if _number(results.get("eval_loss")) else None,
        "Base model": info.get("base_model"),
        "Dataset": info.get("dataset"),
    }
    return {key: value for key, value in facts.items() if value not in (None, "")}


def facts_markdown(served: Served) -> str:
    if served.name == BASE:
        return "**Base model**, no adapter."
    rows = "\n".join(f"| {key} | {value} |" for key, value in served.facts.items()) or "| (none recorded) | |"
    return f"**Adapter `{served.name}`**\n\n| Card fact | Value |\n|---|---|\n{rows}"


def _unique_name(adapter: str, taken: set[str]) -> str:
    path = Path(adapter)
    name = path.resolve().name if path.is_dir() else str(adapter)
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    return candidate


def load_models(
    base_model: str, adapters: Sequence[str] = (), device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[Any, dict[str, Served]]:
    """Load the tokenizer and base once, then one merged model per adapter (local folder or Hub id).

    Example:

    ```python
    >>> tokenizer, models = load_models("smollm2", ["outputs/smollm2-lorafa"])  # doctest: +SKIP
    >>> list(models)  # doctest: +SKIP
    ['base', 'smollm2-lorafa']
    ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.offline import resolve_model
    from ..tuners.merge import merge_adapters

    path = resolve_model(base_model)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    base = base.to(device).eval()
    models = {BASE: Served(BASE, base)}
    for adapter in adapters:
        directory = resolve_adapter_dir(adapter)
        merged = merge_adapters(load_adapter(copy.deepcopy(base), directory)).eval()
        name = _unique_name(str(adapter), set(models))
        models[name] = Served(name, merged, adapter_facts(directory))
    return tokenizer, models
