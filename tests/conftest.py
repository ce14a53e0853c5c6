"""Shared fixtures: tiny models built from configs (no downloads), and the methods × base kinds tables."""

from __future__ import annotations

import os

import huggingface_hub.constants
import pytest
import torch
from hub_server import HubServer
from transformers import LlamaConfig, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TOKEN = "hf_testSECRETd8Kq2LmZ7xVbN4wRy6TfPj3s"  # tests/hub_server.py accepts hf_test…; secret-looking on purpose
BAD_TOKEN = "hf_SECRETbadQ9wE2rT5yU8iO1pA4sD7fG0hJ"
METHODS = ["lora", "lorafa", "lamda", "lamda++"]
FROZEN_A_METHODS = ["lorafa", "lamda", "lamda++"]


def tiny_llama(hidden: int = 64, layers: int = 2, vocab: int = 256, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A randomly initialised Llama-architecture model, small enough for CPU tests."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A Hub on 127.0.0.1 that the real client talks to, through HF_ENDPOINT and the constants read at import."""
    constants = huggingface_hub.constants
    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for everything else
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def input_ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def perturb_adapters(model, seed: int = 3, scale: float = 0.05) -> None:
    """Give every trainable adapter tensor non-trivial values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_S" in name:
                param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def train_steps(model, input_ids, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps on the trainable parameters, as a training loop would take them."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def assert_only_adapter_trained(model, before: dict, a_trains: bool) -> None:
    """TRL's check: B (and LaMDA's S) changed, A changed only if it trains, every base parameter unchanged."""
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param)
        if "lora_A" in name:
            assert changed == a_trains, name
        elif "lora_B" in name or "lora_S" in name:
            assert changed, name
        else:
            assert not changed, f"base parameter {name} changed"
