"""The bad-input matrix: what a user gets wrong, answered by one clear error naming the argument and the fix.

Every case runs the real call and checks its exception type, that the message holds the argument's name and the
fix, and that nothing was left under `out/` (the output path each case would write to) that could pass for a
result. Hub push failures of `push_adapter` (timeouts, 401/403/5xx, offline) are the matrix in test_hub.py; the
CLI cases at the end run `hf-lorafa` in a subprocess and check the exit status and the last stderr line.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from conftest import BAD_TOKEN, TOKEN, tiny_llama
from datasets import Dataset, DatasetDict
from fixtures.tiny_folder import build_tokenizer
from safetensors.torch import load_file

from hf_lorafa import LoRAFAConfig, LoRAFATrainer, LoRAFATrainingArguments, inject_adapters, load_adapter, save_adapter
from hf_lorafa.data.base_model import quantize_model
from hf_lorafa.data.preprocessing import load_raw_dataset, tokenize_for_causal_lm, tokenize_for_classification
from hf_lorafa.hub.push import HubUploadError, push_adapter
from hf_lorafa.memory.estimate import estimate_memory

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    name: str
    call: Callable[[Path], object]
    error: type[BaseException]
    needles: list[str]
    fixtures: list[str] = field(default_factory=list)  # e.g. "hub": a Hub server on 127.0.0.1, "no_bnb"


def args(tmp_path: Path, **overrides) -> LoRAFATrainingArguments:
    values = {"output_dir": str(tmp_path / "out"), "report_to": "none", "max_steps": 2, "lora_r": 4}
    return LoRAFATrainingArguments(**{**values, "activation_savers": False, **overrides})


def adapter_dir(tmp_path: Path, method: str = "lorafa") -> Path:
    """A saved adapter of the tiny Llama (2 layers, hidden 64), outside `out/`."""
    folder = tmp_path / "adapter"
    save_adapter(inject_adapters(tiny_llama(), LoRAFAConfig(method=method, r=4)), folder)
    return folder


def damaged(tmp_path: Path, how: str) -> Path:
    folder = adapter_dir(tmp_path)
    weights = folder / "adapter_model.safetensors"
    if how == "garbage":
        weights.write_bytes(b"\x00" * 10)
    elif how == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif how == "no_config":
        (folder / "adapter_config.json").unlink()
    elif how == "pickle":
        torch.save(load_file(weights), folder / "adapter_model.bin")
        weights.unlink()
    elif how == "ia3":
        from peft import IA3Config

        (folder / "adapter_config.json").unlink()
        IA3Config(target_modules=["q_proj"], feedforward_modules=[]).save_pretrained(str(folder))
    return folder


def tampered(
    tmp_path: Path, config: dict | None = None, weights=None, facts: str | None = None, raw_config: str | None = None
) -> Path:
    """A saved adapter with its config updated by `config`, its tensors edited by `weights(dict)`, or a file
    replaced by raw text."""
    from safetensors.torch import save_file

    folder = adapter_dir(tmp_path)
    path = folder / "adapter_config.json"
    path.write_text(
        raw_config if raw_config is not None else json.dumps({**json.loads(path.read_text()), **(config or {})})
    )
    if weights is not None:
        tensors = load_file(folder / "adapter_model.safetensors")
        weights(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    if facts is not None:
        (folder / "hf_lorafa.json").write_text(facts)
    return folder


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def with_key(key: str, shape: tuple[int, ...], value: float = 0.0):
    return lambda tensors: tensors.update({key: torch.full(shape, value)})


def poisoned(value: float):
    return lambda tensors: tensors[f"{Q0}.lora_B.weight"].view(-1).__setitem__(0, value)


def rows(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def binary(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


def folder(tmp_path: Path, name: str) -> Path:
    (tmp_path / name).mkdir()
    return tmp_path / name


def splits(**columns) -> DatasetDict:
    return DatasetDict({"train": Dataset.from_dict(columns), "test": Dataset.from_dict(columns)})


def trainer(tmp_path: Path, **overrides) -> LoRAFATrainer:
    return LoRAFATrainer(model=tiny_llama(), args=args(tmp_path, **overrides))


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def dead_endpoint_trainer(tmp_path: Path) -> LoRAFATrainer:
    huggingface_hub.constants.ENDPOINT = closed_port()  # restored by the hub fixture's monkeypatch
    return trainer(tmp_path, push_to_hub=True, hub_model_id="user/run", hub_token=TOKEN)


def transformers_args(tmp_path: Path):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none")


CASES = [
    # LoRAFAConfig
    Case(
        "config-method",
        lambda t: LoRAFAConfig(method="qlora"),
        ValueError,
        ["`method`", "one of lora, lorafa, lamda, lamda++", "'qlora'"],
    ),
    Case("config-rank-zero", lambda t: LoRAFAConfig(r=0), ValueError, ["`r`", "positive rank such as 8 or 16"]),
    Case("config-rank-float", lambda t: LoRAFAConfig(r=2.5), TypeError, ["`r`", "must be an int"]),
    Case("config-alpha", lambda t: LoRAFAConfig(alpha=0), ValueError, ["`alpha`", "positive number"]),
    Case("config-dropout", lambda t: LoRAFAConfig(dropout=1.0), ValueError, ["`dropout`", "in [0, 1)"]),
    Case(
        "config-targets-empty",
        lambda t: LoRAFAConfig(target_modules=[]),
        TypeError,
        ["`target_modules`", "non-empty list of module names"],
    ),
    Case(
        "config-targets-regex",
        lambda t: LoRAFAConfig(target_modules="("),
        ValueError,
        ["`target_modules`", "pass a list of module names such as ['q_proj', 'v_proj']"],
    ),
    Case(
        "config-lr-ratio",
        lambda t: LoRAFAConfig(lorafa_lr_ratio=0.0),
        ValueError,
        ["`lorafa_lr_ratio`", "must be positive (1.0 = LoRA's learning rate)"],
    ),
    Case(
        "config-s-lr-ratio",
        lambda t: LoRAFAConfig(lamda_s_lr_ratio=-1.0),
        ValueError,
        ["`lamda_s_lr_ratio`", "must be positive (1.0 = S at B's learning rate)"],
    ),
    Case(
        "config-frozen-a-init-lora",
        lambda t: LoRAFAConfig(method="lora", frozen_a_init="gradient"),
        ValueError,
        ["`frozen_a_init='gradient'`", "LoRA trains its A", "Use frozen_a_init='random' with method='lora'"],
    ),
    Case(
        "config-frozen-a-init-residual",
        lambda t: LoRAFAConfig(method="lamda", lamda_init="residual", frozen_a_init="activations"),
        ValueError,
        ["`lamda_init='residual'`", "cannot set it; use lamda_init='spectral', 'identity' or 'published'"],
    ),
    Case(
        "config-freeze-fraction",
        lambda t: LoRAFAConfig(lamda_freeze_fraction=2.0),
        ValueError,
        ["`lamda_freeze_fraction`", "in [0, 1]"],
    ),
    Case(
        "config-freeze-order",
        lambda t: LoRAFAConfig(lamda_freeze_order="random"),
        ValueError,
        ["`lamda_freeze_order` must be one of ascending, all; got 'random'."],
    ),
    # Injecting into a model
    Case(
        "inject-no-match",
        lambda t: inject_adapters(tiny_llama(), LoRAFAConfig(target_modules=["qkv"])),
        ValueError,
        ["`target_modules`=['qkv'] matched nothing", "q_proj", "Pass some of these names, or 'all-linear'"],
    ),
    Case(
        "inject-not-linear",
        lambda t: inject_adapters(tiny_llama(), LoRAFAConfig(target_modules=["input_layernorm"])),
        TypeError,
        ["`target_modules` matched", "only linear layers can take adapters"],
    ),
    Case(
        "inject-rank-too-big",
        lambda t: inject_adapters(tiny_llama(), LoRAFAConfig(r=128)),
        ValueError,
        ["`r`=128 does not fit", "use a rank between 1 and 64"],
    ),
    Case(
        "inject-twice",
        lambda t: inject_adapters(inject_adapters(tiny_llama(), LoRAFAConfig()), LoRAFAConfig()),
        ValueError,
        ["`model` already has hf-lorafa adapters", "merge_adapters(model)"],
    ),
    # LoRAFATrainingArguments and LoRAFATrainer
    Case(
        "args-method",
        lambda t: args(t, adapter_method="qlora"),
        ValueError,
        ["`adapter_method` must be one of lora, lorafa"],
    ),
    Case("args-rank", lambda t: args(t, lora_r=0), ValueError, ["`lora_r`", "positive rank"]),
    Case(
        "args-4-and-8-bit",
        lambda t: args(t, load_in_4bit=True, load_in_8bit=True),
        ValueError,
        ["`load_in_4bit` and `load_in_8bit`", "choose one"],
    ),
    Case(
        "args-quant-type",
        lambda t: args(t, bnb_4bit_quant_type="int4"),
        ValueError,
        ["`bnb_4bit_quant_type`", "'nf4' or 'fp4'", "'int4'"],
    ),
    Case(
        "trainer-plain-args",
        lambda t: LoRAFATrainer(model=tiny_llama(), args=transformers_args(t)),
        TypeError,
        ["`args` is a TrainingArguments", "Replace `TrainingArguments(...)` by `LoRAFATrainingArguments(...)`"],
    ),
    Case("trainer-no-model", lambda t: LoRAFATrainer(model=None, args=args(t)), ValueError, ["`model` is required"]),
    Case(
        "trainer-resume-nothing",
        lambda t: trainer(t).train(resume_from_checkpoint=True),
        ValueError,
        ["`resume_from_checkpoint`=True", "no complete checkpoint-N", "train from scratch"],
    ),
    # Datasets
    Case(
        "data-missing-file",
        lambda t: load_raw_dataset(str(t / "nope.jsonl")),
        ValueError,
        ["`--dataset`", "does not exist; check the path"],
    ),
    Case(
        "data-empty-file",
        lambda t: load_raw_dataset(rows(t, "empty.jsonl", "")),
        ValueError,
        ["`--dataset`", "is empty; give it some training examples"],
    ),
    Case(
        "data-broken-json",
        lambda t: load_raw_dataset(rows(t, "broken.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": oops}\n')),
        ValueError,
        ["`--dataset` file", "broken.jsonl' line 3, column 10: not valid JSON", "each line must be one JSON object"],
    ),
    Case(
        "data-broken-json-document",
        lambda t: load_raw_dataset(rows(t, "broken.json", '[\n  {"text": "a"},\n  {"text": b}\n]\n')),
        ValueError,
        ["broken.json' line 3, column 12: not valid JSON", "one JSON document"],
    ),
    Case(
        "data-not-utf8-jsonl",
        lambda t: load_raw_dataset(binary(t, "latin1.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n{"text": "c"}\n')),
        ValueError,
        ["latin1.jsonl' line 2, column 14: byte 0xe9 is not UTF-8", "Save the file as UTF-8"],
    ),
    Case(
        "data-not-utf8-csv",
        lambda t: load_raw_dataset(binary(t, "latin1.csv", b"text,label\na,0\nna\xc3\xafve \xff,1\n")),
        ValueError,
        ["latin1.csv' line 3, column 7: byte 0xff is not UTF-8"],
    ),
    Case(
        "data-folder-named-like-a-file",
        lambda t: load_raw_dataset(str(folder(t, "x.jsonl"))),
        ValueError,
        ["`--dataset`", "x.jsonl' is a folder, not a file"],
    ),
    Case(
        "data-mixed-formats",
        lambda t: tokenize_for_causal_lm(
            splits(
                messages=[[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], None, None],
                question=[None, None, "why"],
                answer=[None, None, "because"],
            ),
            build_tokenizer(),
        ),
        ValueError,
        ["mixes messages rows (train row 0 is the first) with question/answer rows (train row 2", "one format"],
    ),
    Case(
        "data-label-only-held-out",
        lambda t: tokenize_for_classification(
            DatasetDict(
                {
                    "train": Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}),
                    "test": Dataset.from_dict({"text": ["c", "d", "e"], "label": [1, 0, 2]}),
                }
            ),
            build_tokenizer(),
        ),
        ValueError,
        ["`--label_column` 'label' has the class 2 in test row 2, which no train row has", "train classes: 0, 1"],
    ),
    Case(
        "data-one-class",
        lambda t: tokenize_for_classification(splits(text=["a", "b"], label=[1, 1]), build_tokenizer()),
        ValueError,
        ["`--label_column` 'label' has one class in train (every usable row is 1)", "needs at least two"],
    ),
    Case(
        "data-header-only",
        lambda t: load_raw_dataset(rows(t, "header.csv", "text,label\n")),
        ValueError,
        ["`--dataset`", "has no rows; give it some training examples"],
    ),
    Case(
        "data-one-row",
        lambda t: load_raw_dataset(rows(t, "one.jsonl", '{"text": "a"}\n')),
        ValueError,
        ["`--dataset`", "a held-out split needs at least 2 rows"],
    ),
    Case(
        "data-folder",
        lambda t: load_raw_dataset(str(t)),
        ValueError,
        ["`--dataset`", "pass a .json, .jsonl, .csv or .parquet file"],
    ),
    Case(
        "data-hub-unreachable",
        lambda t: load_raw_dataset("someone/no-such-dataset"),
        ValueError,
        ["`--dataset` 'someone/no-such-dataset'", "could not be loaded from the Hub", "check the id and network"],
    ),
    Case(
        "data-text-column",
        lambda t: tokenize_for_causal_lm(splits(body=["a", "b"]), None, "text"),
        ValueError,
        ["`--text_column` 'text' is not a column", "body", "pass --text_column with one of them"],
    ),
    Case(
        "data-label-column",
        lambda t: tokenize_for_classification(splits(text=["a"], stars=[1]), None),
        ValueError,
        ["`--label_column` 'label' is not a column", "stars"],
    ),
    Case(
        "data-label-strings",
        lambda t: tokenize_for_classification(splits(text=["a", "b"], label=["good", "bad"]), None),
        ValueError,
        ["`--label_column` 'label' must hold integer class ids", "'good'", "Map the labels to integers"],
    ),
    Case(
        "data-label-negative",
        lambda t: tokenize_for_classification(splits(text=["a"], label=[-1]), None),
        ValueError,
        ["`--label_column`", "class ids start at 0"],
    ),
    Case(
        "data-list-answer",
        lambda t: tokenize_for_causal_lm(splits(question=["a", "b"], answer=[["x", "y"], ["z"]]), None),
        ValueError,
        ["`--dataset` train row 0, column 'answer' holds a list (['x', 'y']), not text", "join a list first"],
    ),
    Case(
        "data-bad-turn",
        lambda t: tokenize_for_causal_lm(splits(messages=[[{"role": "user", "text": "hi"}]]), None),
        ValueError,
        ["`--dataset` train row 0, column 'messages' has the turn", "'role': str, 'content': str"],
    ),
    Case(
        "data-all-null",
        lambda t: tokenize_for_causal_lm(splits(question=[None, " "], answer=["a", "b"]), None),
        ValueError,
        ["no usable train rows: all 2 were skipped (2 with a null or blank 'question')"],
    ),
    Case(
        "data-max-length-zero",
        lambda t: tokenize_for_causal_lm(splits(text=["a"]), None, max_length=0),
        ValueError,
        ["`--max_length` must be a positive number of tokens", "got 0"],
    ),
    Case(
        "data-max-length-negative",
        lambda t: tokenize_for_classification(splits(text=["a"], label=[0]), None, max_length=-5),
        ValueError,
        ["`--max_length` must be a positive number of tokens", "got -5"],
    ),
    Case(
        "data-all-too-long",
        lambda t: tokenize_for_causal_lm(
            splits(question=["what is the sky"] * 3, answer=["blue"] * 3), build_tokenizer(), max_length=4
        ),
        ValueError,
        ["every train row was dropped", "within `--max_length` 4", "Raise --max_length"],
    ),
    # Adapters
    Case(
        "adapter-wrong-base-layers",
        lambda t: load_adapter(tiny_llama(layers=1), adapter_dir(t)),
        ValueError,
        ["`adapter` was trained for another base", "has no module 'model.layers.1", "Load the matching base model"],
    ),
    Case(
        "adapter-wrong-base-shapes",
        lambda t: load_adapter(tiny_llama(hidden=32), adapter_dir(t)),
        ValueError,
        ["`adapter` was trained for another base", "64", "Load the matching base model"],
    ),
    Case(
        "adapter-corrupt",
        lambda t: load_adapter(tiny_llama(), damaged(t, "garbage")),
        ValueError,
        ["`adapter` weights", "corrupt or truncated", "save or download them again"],
    ),
    Case(
        "adapter-truncated",
        lambda t: load_adapter(tiny_llama(), damaged(t, "truncated")),
        ValueError,
        ["`adapter` weights", "corrupt or truncated", "save or download them again"],
    ),
    Case(
        "adapter-no-config",
        lambda t: load_adapter(tiny_llama(), damaged(t, "no_config")),
        ValueError,
        ["`adapter` folder", "has no adapter_config.json", "is it an adapter folder"],
    ),
    Case(
        "adapter-pickle",
        lambda t: load_adapter(tiny_llama(), damaged(t, "pickle")),
        ValueError,
        ["adapter_model.bin, a pickle", "safe_serialization=True", "`allow_pickle=True`"],
    ),
    Case(
        "adapter-not-lora",
        lambda t: load_adapter(tiny_llama(), damaged(t, "ia3")),
        ValueError,
        ["`adapter` is a", "IA3", "loads LoRA adapters only"],
    ),
    Case(
        "adapter-base-weight-key",
        lambda t: load_adapter(
            tiny_llama(),
            tampered(
                t, {"modules_to_save": ["lm_head"]}, with_key("base_model.model.model.embed_tokens.weight", (256, 64))
            ),
        ),
        ValueError,
        [
            "holds 'base_model.model.model.embed_tokens.weight'",
            "neither a lora_A/lora_B weight nor",
            "['lm_head']",
            "never lets an adapter overwrite base weights",
        ],
    ),
    Case(
        "adapter-base-layer-key",
        lambda t: load_adapter(
            tiny_llama(), tampered(t, {"modules_to_save": ["q_proj"]}, with_key(f"{Q0}.base_layer.weight", (64, 64)))
        ),
        ValueError,
        [f"holds '{Q0}.base_layer.weight'", "never lets an adapter overwrite base weights"],
    ),
    Case(
        "adapter-rank-broadcast",
        lambda t: load_adapter(tiny_llama(), tampered(t, weights=with_key(f"{Q0}.lora_B.weight", (64, 1)))),
        ValueError,
        ["has lora_A of rank 4 but lora_B of rank 1", "same rank"],
    ),
    Case(
        "adapter-nan",
        lambda t: load_adapter(tiny_llama(), tampered(t, weights=poisoned(float("nan")))),
        ValueError,
        [f"`adapter` tensor '{Q0}.lora_B.weight'", "holds NaN or inf values"],
    ),
    Case(
        "adapter-inf",
        lambda t: load_adapter(tiny_llama(), tampered(t, weights=poisoned(float("inf")))),
        ValueError,
        ["holds NaN or inf values", "earlier checkpoint"],
    ),
    Case(
        "adapter-dora",
        lambda t: load_adapter(tiny_llama(), tampered(t, {"use_dora": True})),
        ValueError,
        ["uses DoRA", "`use_dora`=True", "adapter_config.json", "merge_and_unload()"],
    ),
    Case(
        "adapter-lora-bias",
        lambda t: load_adapter(tiny_llama(), tampered(t, {"lora_bias": True})),
        ValueError,
        ["uses a trained bias on lora_B", "`lora_bias`=True"],
    ),
    Case(
        "adapter-trained-biases",
        lambda t: load_adapter(tiny_llama(), tampered(t, {"bias": "all"})),
        ValueError,
        ["uses trained base-layer biases", "`bias`='all'"],
    ),
    Case(
        "adapter-config-rank",
        lambda t: load_adapter(tiny_llama(), tampered(t, {"r": 8})),
        ValueError,
        ["has rank 4 tensors but adapter_config.json gives it r=8", "disagree"],
    ),
    Case(
        "adapter-missing-lora-B",
        lambda t: load_adapter(tiny_llama(), tampered(t, weights=lambda w: w.pop(f"{Q0}.lora_B.weight"))),
        ValueError,
        [f"has no {Q0}.lora_B.weight", "adapter_model.safetensors", "incomplete"],
    ),
    Case(
        "adapter-lora-on-norm",
        lambda t: load_adapter(
            tiny_llama(), tampered(t, weights=with_key("base_model.model.model.norm.lora_A.weight", (4, 64)))
        ),
        ValueError,
        ["targets 'model.norm' (LlamaRMSNorm)", "linear layers only"],
    ),
    Case(
        "adapter-lora-on-embedding",
        lambda t: load_adapter(
            tiny_llama(), tampered(t, weights=with_key("base_model.model.model.embed_tokens.lora_B.weight", (64, 4)))
        ),
        ValueError,
        ["targets 'model.embed_tokens' (Embedding)", "linear layers only"],
    ),
    Case(
        "adapter-config-not-json",
        lambda t: load_adapter(tiny_llama(), tampered(t, raw_config="{r: 4")),
        ValueError,
        ["`adapter` file", "adapter_config.json' is not valid JSON", "save or download the adapter again"],
    ),
    Case(
        "adapter-config-not-object",
        lambda t: load_adapter(tiny_llama(), tampered(t, raw_config="[4]")),
        ValueError,
        ["adapter_config.json' must hold a JSON object; it holds a list"],
    ),
    Case(
        "adapter-config-bad-rank",
        lambda t: load_adapter(tiny_llama(), tampered(t, {"r": "four"})),
        ValueError,
        ["adapter_config.json' has 'r'='four'; it must be a positive int"],
    ),
    Case(
        "adapter-config-bad-alpha-pattern",
        lambda t: load_adapter(tiny_llama(), tampered(t, {"alpha_pattern": {"q_proj": "big"}})),
        ValueError,
        ["has 'alpha_pattern'={'q_proj': 'big'}", "positive numbers"],
    ),
    Case(
        "adapter-facts-not-json",
        lambda t: load_adapter(tiny_llama(), tampered(t, facts="{'method': 1")),
        ValueError,
        ["hf_lorafa.json' is not valid JSON"],
    ),
    Case(
        "adapter-facts-config-not-object",
        lambda t: load_adapter(tiny_llama(), tampered(t, facts='{"config": 3}')),
        ValueError,
        ["hf_lorafa.json' has 'config'=3", "must be an object"],
    ),
    Case(
        "adapter-facts-config-invalid",
        lambda t: load_adapter(tiny_llama(), tampered(t, facts='{"config": {"method": "qlora"}}')),
        ValueError,
        ["hf_lorafa.json' key 'config'", "`method`"],
    ),
    Case(
        "adapter-missing-path",
        lambda t: load_adapter(tiny_llama(), str(t / "missing")),
        ValueError,
        ["neither an adapter folder nor a Hub repo id", "check the path"],
    ),
    Case(
        "adapter-hub-offline",
        lambda t: load_adapter(tiny_llama(), "someone/adapter"),
        ValueError,
        ["`adapter`='someone/adapter'", "could not be downloaded from the Hub", "HF_HUB_OFFLINE must be unset"],
    ),
    # The Hub, from training arguments
    Case(
        "hub-unreachable",
        dead_endpoint_trainer,
        HubUploadError,
        ["`push_to_hub`", "could not reach the endpoint", "check the network or HF_ENDPOINT", "drop `push_to_hub`"],
        ["hub"],
    ),
    Case(
        "hub-bad-token",
        lambda t: trainer(t, push_to_hub=True, hub_model_id="user/run", hub_token=BAD_TOKEN),
        HubUploadError,
        ["`push_to_hub`", "token was rejected (HTTP 401", "valid write token"],
        ["hub"],
    ),
    Case(
        "hub-push-unsaved",
        lambda t: push_adapter(t / "out", "user/run", token=TOKEN),
        ValueError,
        ["`folder`=", "is not an adapter folder", "save the adapter first"],
    ),
    # Quantization
    Case(
        "quant-no-bitsandbytes-4bit",
        lambda t: trainer(t, load_in_4bit=True),
        ImportError,
        ["`load_in_4bit` needs bitsandbytes", 'pip install "hf-lorafa[quant]"'],
        ["no_bnb"],
    ),
    Case(
        "quant-no-bitsandbytes-8bit",
        lambda t: quantize_model(tiny_llama(), load_in_8bit=True),
        ImportError,
        ["`load_in_8bit` needs bitsandbytes", 'pip install "hf-lorafa[quant]"'],
        ["no_bnb"],
    ),
    Case(
        "quant-no-bits",
        lambda t: quantize_model(tiny_llama()),
        ValueError,
        ["`quantize_model` needs `load_in_4bit=True` or `load_in_8bit=True`"],
    ),
    Case(
        "quant-not-a-transformers-model",
        lambda t: quantize_model(torch.nn.Linear(4, 4), load_in_4bit=True),
        TypeError,
        ["`model` must be a transformers PreTrainedModel", "load_base_model(name_or_path"],
    ),
    Case(
        "quant-full-fine-tuning-4bit",
        lambda t: estimate_memory(tiny_llama().config, "full", 2, 64, load_in_4bit=True),
        ValueError,
        ["`method`='full' cannot train 4-bit weights", "drop `load_in_4bit`"],
    ),
]


def assert_nothing_written(out: Path) -> None:
    """No file under the output path: nothing a user could take for a finished result."""
    leftovers = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not leftovers, leftovers


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_error(case, tmp_path, monkeypatch, request):
    if "hub" in case.fixtures:
        request.getfixturevalue("hub")
    if "no_bnb" in case.fixtures:
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(case.error) as info:
        case.call(tmp_path)
    message = str(info.value)
    missing = [needle for needle in case.needles if needle not in message]
    assert not missing, f"{case.name}: {missing} not in: {message}"
    for secret in (TOKEN, BAD_TOKEN):
        assert secret not in message
    assert_nothing_written(tmp_path / "out")


def test_the_matrix_covers_every_area():
    areas = {c.name.split("-")[0] for c in CASES}
    assert {"config", "inject", "args", "trainer", "data", "adapter", "hub", "quant"} <= areas
    assert len(CASES) + len(CLI_CASES) >= 30


def test_pickle_adapter_loads_when_the_user_opts_in(tmp_path):
    reference = inject_adapters(tiny_llama(), LoRAFAConfig(method="lorafa", r=4))
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    folder = tmp_path / "adapter"
    save_adapter(reference, folder)
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    loaded = load_adapter(tiny_llama(), folder, allow_pickle=True)
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.eval()(ids).logits, reference.eval()(ids).logits)
    # Opted in, still tensors only: a pickle that would run code on load is refused.
    (folder / "adapter_model.bin").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(ValueError, match="could not be loaded as plain tensors"):
        load_adapter(tiny_llama(), folder, allow_pickle=True)


def test_rows_with_nothing_to_learn_are_skipped_and_counted(caplog):
    """Null/blank cells never become the text "None", a conversation ending on a user turn is not trained as the
    answer, and a prompt that fills max_length is dropped, each counted in the log."""
    tokenizer = build_tokenizer()
    qa = splits(
        question=["what is the sun", None, "who are you", "what " * 12, ""],
        answer=["red", "yes", None, "no", "the sky"],
    )
    with caplog.at_level("WARNING"):
        data = tokenize_for_causal_lm(qa, tokenizer, max_length=10)
    texts = [tokenizer.decode(ids) for ids in data["train"]["input_ids"]]
    assert texts == ["<user> what is the sun <eos> <assistant> red <eos>"], texts
    log = caplog.text
    assert "train: skipped 3 of 5 rows (2 with a null or blank 'question', 1 with a null or blank 'answer')" in log
    assert "train: dropped 1 of 2 rows whose prompt fills --max_length 10" in log
    chats = splits(messages=[
        [{"role": "user", "content": "who are you"}, {"role": "assistant", "content": "a cat"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
         {"role": "user", "content": "no"}],
    ])  # fmt: skip
    caplog.clear()
    with caplog.at_level("WARNING"):
        data = tokenize_for_causal_lm(chats, tokenizer)
    assert [tokenizer.decode(ids) for ids in data["train"]["input_ids"]] == [
        "<user> who are you <eos> <assistant> a cat <eos>"
    ]
    assert "skipped 1 of 2 rows (1 whose messages do not end on an assistant turn)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        data = tokenize_for_classification(splits(text=["good day", None, "bad day"], label=[1, 0, 0]), tokenizer)
    assert data["train"]["labels"] == [1, 0] and "1 with a null or blank 'text'" in caplog.text


PEFT_SCALINGS = {
    "rslora": {"use_rslora": True},
    "alpha-pattern": {"alpha_pattern": {"q_proj": 32, "model.layers.1.mlp.down_proj": 2}},
    "rank-and-alpha-pattern": {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 16}},
}


@pytest.mark.parametrize("options", PEFT_SCALINGS.values(), ids=PEFT_SCALINGS)
def test_peft_scaling_options_load_with_peft_logits(options, tmp_path):
    """rsLoRA and alpha/rank patterns give PEFT another scaling per layer; loaded here, the logits are PEFT's, and
    saved again they load in PEFT with the same logits."""
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = ["q_proj", "v_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **options)
    reference = get_peft_model(tiny_llama(), config).eval()
    reference.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).logits
        loaded = load_adapter(tiny_llama(), tmp_path / "peft").eval()
        torch.testing.assert_close(loaded(ids).logits, expected)
        assert not torch.allclose(tiny_llama()(ids).logits, expected)  # the adapter does change the output
        save_adapter(loaded, tmp_path / "ours")
        again = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours").eval()
        torch.testing.assert_close(again(ids).logits, expected)


def test_modules_to_save_still_load(tmp_path):
    """The declared head (a classifier trained with the adapter) still loads; only undeclared keys are refused."""
    reference = inject_adapters(tiny_llama(), LoRAFAConfig(r=4, modules_to_save=["lm_head"]))
    with torch.no_grad():
        reference.lm_head.weight.mul_(2)
    save_adapter(reference, tmp_path / "adapter")
    loaded = load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(loaded.lm_head.weight, reference.lm_head.weight)


def test_merge_replaces_the_output_only_when_complete(tmp_path, monkeypatch):
    from hf_lorafa import cli

    # An earlier good merge must survive a failed one: the new one is written beside it, then renamed.
    out = tmp_path / "merged"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"earlier good merge")
    base = tmp_path / "base"
    tiny_llama().save_pretrained(base)
    folder = adapter_dir(tmp_path)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    # No tokenizer in the base folder: the merge fails after the model is merged, before anything is renamed.
    assert cli.main(["merge", str(folder), str(out), "--overwrite"]) == 1
    assert (out / "model.safetensors").read_bytes() == b"earlier good merge"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")] == []


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory):
    """A tiny Llama folder (with tokenizer) and a saved adapter for it."""
    from fixtures.tiny_folder import build_tiny_llama_folder
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge")
    base = build_tiny_llama_folder(root / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    save_adapter(inject_adapters(model, LoRAFAConfig(method="lorafa", r=4)), root / "adapter")
    return base, root / "adapter"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


MERGE_REFUSALS = {
    # what a user typed: (adapter location inside the work folder, OUT_DIR, needles of the error)
    "into-the-cwd-holding-the-adapter": ("run", ".", ["is or contains the adapter folder"]),
    "into-the-adapter-itself": ("run", "run", ["is or contains the adapter folder", "run-merged"]),
    "into-a-parent-of-the-adapter": ("work/run", "work", ["is or contains the adapter folder"]),
    "into-a-folder-with-other-files": ("run", "notes", ["is not empty (it holds keep.txt)", "--overwrite"]),
}


@pytest.mark.parametrize("adapter_at, out, needles", MERGE_REFUSALS.values(), ids=MERGE_REFUSALS)
def test_merge_never_deletes_a_users_files(adapter_at, out, needles, merge_inputs, tmp_path, monkeypatch, capsys):
    from hf_lorafa import cli

    shutil.copytree(merge_inputs[1], tmp_path / adapter_at)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    code = cli.main(["merge", adapter_at, out, "--base-model", str(merge_inputs[0])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("hf-lorafa merge: error: `OUT_DIR`"), err
    assert all(needle in err[-1] for needle in needles), err[-1]
    assert tree(tmp_path) == before  # nothing deleted, nothing written


@pytest.mark.parametrize("config_file, needle", [
    ("adapter_config.json", "adapter_config.json' is not valid JSON"),
    ("hf_lorafa.json", "hf_lorafa.json' is not valid JSON"),
])  # fmt: skip
def test_merge_of_an_adapter_with_a_broken_config_is_one_error(config_file, needle, merge_inputs, tmp_path, capsys):
    from hf_lorafa import cli

    adapter = tmp_path / "adapter"
    shutil.copytree(merge_inputs[1], adapter)
    (adapter / config_file).write_text('{"r": 4,')
    assert cli.main(["merge", str(adapter), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert needle in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_merge_overwrite_replaces_the_model_files_and_keeps_the_rest(merge_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_lorafa import cli

    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"a shard of an earlier merge")
    (out / "config.json").write_text("{}")
    assert cli.main(["merge", str(merge_inputs[1]), str(out), "--overwrite"]) == 0
    assert (out / "keep.txt").read_text() == "mine"
    assert not (out / "model-00001-of-00002.safetensors").exists()
    AutoModelForCausalLM.from_pretrained(out)  # a complete model, not a mix of two merges
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left beside it


@dataclass
class CliCase:
    name: str
    argv: list[str]
    needles: list[str]
    code: int = 1


CLI_CASES = [
    CliCase(
        "train-missing-dataset",
        ["train", "--dataset", "{tmp}/nope.jsonl", "--output_dir", "{tmp}/out"],
        ["hf-lorafa train: error:", "`--dataset`", "does not exist; check the path"],
    ),
    CliCase(
        "train-bad-method",
        ["train", "--adapter_method", "qlora", "--output_dir", "{tmp}/out"],
        ["argument --adapter_method/--adapter-method: invalid choice: 'qlora'", "(choose from 'lora', 'lorafa'"],
        code=2,  # argparse's usage error: the choices come from the config's declaration
    ),
    CliCase(
        "train-missing-column",
        ["train", "--dataset", "{tmp}/body.jsonl", "--text_column", "text", "--output_dir", "{tmp}/out"],
        ["`--text_column` 'text' is not a column", "body"],
    ),
    CliCase(
        "train-max-length-zero",
        ["train", "--max_length", "0", "--output_dir", "{tmp}/out"],
        ["hf-lorafa train: error: `--max_length` must be a positive number of tokens (e.g. 256); got 0."],
    ),
    CliCase(
        "train-max-length-negative",
        ["train", "--max_length", "-5", "--output_dir", "{tmp}/out"],
        ["`--max_length` must be a positive number of tokens", "got -5"],
    ),
    CliCase(
        "train-max-train-samples-zero",
        ["train", "--max_train_samples", "0", "--output_dir", "{tmp}/out"],
        ["`--max_train_samples` must be at least 1 (leave it unset to use every row); got 0."],
    ),
    CliCase(
        "train-all-rows-too-long",
        ["train", "--dataset", "{tmp}/long.jsonl", "--max_length", "16", "--output_dir", "{tmp}/out"],
        ["hf-lorafa train: error: every train row was dropped", "`--max_length` 16"],
    ),
    CliCase(
        "merge-missing-adapter",
        ["merge", "{tmp}/no-adapter", "{tmp}/out"],
        ["hf-lorafa merge: error:", "neither an adapter folder nor a Hub repo id"],
    ),
    CliCase(
        "push-unsaved-folder",
        ["push", "{tmp}", "user/run"],
        ["hf-lorafa push: error:", "is not an adapter folder", "save the adapter first"],
    ),
    CliCase("unknown-command", ["fine-tune"], ["hf-lorafa: error: unknown command 'fine-tune'"], code=2),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_cli_bad_input_exits_non_zero_with_the_error_last(case, tmp_path):
    (tmp_path / "body.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(8)))
    long = [{"question": "why is the sky blue " * 20, "answer": "light"}] * 8
    (tmp_path / "long.jsonl").write_text("\n".join(json.dumps(row) for row in long))
    argv = [a.format(tmp=tmp_path) for a in case.argv]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    result = subprocess.run(
        [sys.executable, "-m", "hf_lorafa.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**env, "HF_HUB_OFFLINE": "1", "HF_TOKEN_PATH": str(tmp_path / "no-token")},
    )
    assert result.returncode == case.code, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert all(needle in lines[-1] for needle in case.needles), lines[-1]
    assert "Traceback" not in result.stderr
    if case.name == "unknown-command":
        assert lines[0].startswith("usage: hf-lorafa")  # the usage first, the error last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["body.jsonl", "long.jsonl"]  # no output, no partial folder


ESTIMATE_REFUSALS = {
    "batch-zero": (["--batch", "0"], "argument --batch: must be at least 1; got 0"),
    "rank-zero": (["--r", "0"], "argument --r: must be at least 1; got 0"),
    "seq-negative": (["--seq", "-5"], "argument --seq: must be at least 1; got -5"),
    "seq-beyond-context": (["--seq", "4096"], "argument --seq: 4096 is beyond {model}'s context of 2048 tokens"),
}


@pytest.mark.parametrize("flags, needle", ESTIMATE_REFUSALS.values(), ids=ESTIMATE_REFUSALS)
def test_estimate_refuses_sizes_that_mean_nothing(flags, needle, tmp_path, capsys):
    """A zero batch or rank, a negative length (negative bytes) or a length past the model's context is argparse's
    usage error, before any estimate is printed."""
    from hf_lorafa import cli

    config = tiny_llama().config
    config.max_position_embeddings = 2048
    config.save_pretrained(tmp_path / "model")
    model = str(tmp_path / "model")
    with pytest.raises(SystemExit) as info:
        cli.main(["estimate", "--model", model, *flags])
    captured = capsys.readouterr()
    assert info.value.code == 2 and captured.out == ""
    assert captured.err.strip().splitlines()[-1] == f"hf-lorafa estimate: error: {needle.format(model=model)}"


def test_adapter_for_fewer_layers_warns_what_matched(tmp_path, caplog):
    """A 2-layer adapter in a 4-layer base of the same widths adapts half the model: one warning, as PEFT's
    missing-keys warning, counts what matched and names layers left out; a matching base loads without it."""
    folder = adapter_dir(tmp_path)
    with caplog.at_level("WARNING", logger="hf_lorafa"):
        load_adapter(tiny_llama(), folder)
    assert "covers" not in caplog.text
    with caplog.at_level("WARNING", logger="hf_lorafa"):
        model = load_adapter(tiny_llama(layers=4), folder)
    warnings = [r.getMessage() for r in caplog.records if "covers" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "covers 14 of the 28 layers its target_modules select in this model; 14 have no weights" in warnings[0]
    assert "model.layers.2.self_attn.q_proj" in warnings[0] and "Load the matching base model" in warnings[0]
    assert not hasattr(model.model.layers[3].self_attn.q_proj, "lora_A")  # what the warning says is true


def test_merge_of_a_classification_adapter_keeps_its_head(tmp_path):
    """`merge` loads the base with the adapter's task (SEQ_CLS: a sequence classifier with the adapter's number of
    labels), not always a causal LM; the merged model gives the adapted model's logits."""
    from fixtures.tiny_folder import build_tiny_llama_folder
    from transformers import AutoModelForSequenceClassification

    from hf_lorafa import cli

    base = build_tiny_llama_folder(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    model = inject_adapters(model, LoRAFAConfig(r=4, modules_to_save=["score"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(0, 0.1)
    save_adapter(model, tmp_path / "adapter")
    assert cli.main(["merge", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    assert merged.config.num_labels == 3
    torch.testing.assert_close(merged(ids).logits, model.eval()(ids).logits)


def test_trl_conversations_without_a_chat_template_say_what_to_set(tmp_path):
    """TRL's path on `messages` rows with a tokenizer that has no chat template: one error naming
    `tokenizer.chat_template`, before TRL's tokenizing traceback; with the template set, the same rows build."""
    pytest.importorskip("trl")
    from hf_lorafa.trl import LoRAFASFTConfig, LoRAFASFTTrainer

    tokenizer = build_tokenizer()
    template, tokenizer.chat_template = tokenizer.chat_template, None
    chats = Dataset.from_list(
        [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 4
    )
    config = LoRAFASFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to="none", bf16=False)

    def build():
        model = tiny_llama(vocab=len(tokenizer))
        return LoRAFASFTTrainer(model=model, args=config, train_dataset=chats, processing_class=tokenizer)

    with pytest.raises(ValueError) as info:
        build()
    assert "`train_dataset` holds conversations (messages of" in str(info.value)
    assert "Set `tokenizer.chat_template`" in str(info.value)
    tokenizer.chat_template = template
    assert len(build().train_dataset) == 4
    assert_nothing_written(tmp_path / "out")
