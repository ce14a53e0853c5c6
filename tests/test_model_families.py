"""Model families beyond the Llama-shaped ones: adapters behave as the layer they wrap for model code that reads it
(T5 reads `wo.weight.dtype`), GPT-2's Conv1D layers are adapted (tests/test_conv1d.py holds their contract), and a
model with nothing to adapt is told what it has instead."""

from __future__ import annotations

import pytest
import torch
from conftest import METHODS
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

from hf_lorafa import LoRAFAConfig, adapter_layers, inject_adapters


def tiny_t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        decoder_start_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


@pytest.mark.parametrize("method", METHODS)
def test_adapter_layers_expose_the_wrapped_layers_weight_bias_and_features(method):
    model = inject_adapters(tiny_t5(), LoRAFAConfig(method=method, r=4))
    layers = adapter_layers(model)
    assert layers
    for layer in layers.values():
        base = layer.base_layer
        assert layer.weight is base.weight and layer.bias is base.bias
        assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)


@pytest.mark.parametrize("method", METHODS)
def test_t5_trains_its_adapters_and_leaves_the_base_unchanged(method):
    model = inject_adapters(tiny_t5(), LoRAFAConfig(method=method, r=4))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # LaMDA's B starts at zero in some inits: two steps move every trained tensor kind
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in frozen.items())
    assert any(not torch.equal(params[n], p) for n, p in trained.items())
    frozen_adapter_tensors = {n.rsplit(".", 2)[-2] for n in frozen if "lora_" in n}
    assert frozen_adapter_tensors == (set() if method == "lora" else {"lora_A"})


class Projection(nn.Module):
    """A weight matrix hf-lorafa does not know how to wrap: another library's layer kind."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_a_model_without_linear_layers_is_told_what_it_has():
    model = nn.Sequential(nn.Embedding(64, 32), Projection(32), nn.LayerNorm(32))
    with pytest.raises(ValueError) as raised:
        inject_adapters(model, LoRAFAConfig(r=4))
    message = str(raised.value)
    assert "has no nn.Linear or Conv1D layer to adapt" in message
    assert "Projection (e.g. 1)" in message
    assert "linear layers in this model: ." not in message
