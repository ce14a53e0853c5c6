"""Registry spec: each method's entry in `tuners.methods` agrees with the layer it builds and what uses it."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import METHODS, tiny_llama

from hf_lorafa import LoRAFAConfig, LoRAFATrainingArguments, estimate_memory, inject_adapters
from hf_lorafa.adapter_io.peft_format import save_adapter
from hf_lorafa.hub.card import write_model_card
from hf_lorafa.training.param_groups import lr_ratios
from hf_lorafa.tuners.config import ADAPTER_PREFIX
from hf_lorafa.tuners.config import METHODS as CONFIG_METHODS
from hf_lorafa.tuners.injection import adapter_layers
from hf_lorafa.tuners.methods import METHODS as REGISTRY


def test_every_config_method_has_one_entry():
    assert tuple(REGISTRY) == CONFIG_METHODS == tuple(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_entry_matches_the_layer_it_builds(method):
    spec = REGISTRY[method]
    model = inject_adapters(tiny_llama(), LoRAFAConfig(method=method, r=4))
    layers = adapter_layers(model)
    for layer in layers.values():
        own = {name.split(".")[0] for name, _ in layer.named_parameters() if name.startswith(ADAPTER_PREFIX)}
        assert own == set(spec.tensors) and all(t.startswith(ADAPTER_PREFIX) for t in spec.tensors)
        assert layer.lora_A.weight.requires_grad == spec.trains_a
        assert {tensor for tensor, _ in spec.lr_ratio_fields} <= own
    # The estimator's count of trainable parameters is the injected model's (LaMDA: before B freezes).
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    estimate = estimate_memory(tiny_llama().config, method, batch=1, seq=8, r=4)
    assert estimate.trainable_parameters == trainable


@pytest.mark.parametrize("method", METHODS)
def test_optimizer_groups_and_card_come_from_the_entry(method, tmp_path):
    spec = REGISTRY[method]
    config = LoRAFAConfig(method=method, r=4, lorafa_lr_ratio=3.0, lamda_lr_ratio=5.0, lamda_s_lr_ratio=2.0)
    lamda = {"lora_S": 10.0, "lora_B": 5.0}
    assert lr_ratios(config) == {"lorafa": {"lora_B": 3.0}, "lamda": lamda, "lamda++": lamda}.get(method, {})
    save_adapter(inject_adapters(tiny_llama(), config), tmp_path)
    card = write_model_card(tmp_path).read_text()
    assert spec.display_name in card and f"arxiv.org/abs/{spec.paper_id}" in card and spec.hub_tag in card
    assert ("| A (projection-down) | frozen |" in card) != spec.trains_a
    for label, _, _ in spec.card_options:
        if label != "Total rank budget":  # shown only when a budget was set
            assert f"| {label} |" in card, label


def test_training_arguments_take_defaults_and_help_from_the_config():
    fields = {f.name: f for f in dataclasses.fields(LoRAFATrainingArguments)}
    args = LoRAFATrainingArguments(output_dir="unused", use_cpu=True)
    derived = dataclasses.replace(args.to_lorafa_config(), init_seed=LoRAFAConfig.init_seed)
    assert derived == LoRAFAConfig()
    for name in ("adapter_method", "lora_r", "lora_alpha", "lorafa_lr_ratio", "lamda_init", "lamda_rank_budget"):
        assert fields[name].metadata["help"], name
    assert fields["lora_r"].metadata["help"].startswith("Adapter rank")
