"""Registry spec: each method's entry in `tuners.methods` agrees with the layer it builds and what uses it."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import METHODS, tiny_llama

from hf_lorafa import LoRAFAConfig, LoRAFATrainingArguments, estimate_memory, inject_adapters
from hf_lorafa.adapter_io.peft_format import load_adapter, save_adapter
from hf_lorafa.hub.card import write_model_card
from hf_lorafa.training.param_groups import lr_ratios
from hf_lorafa.tuners.config import ADAPTER_PREFIX, OPTIONS, argument_name
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


def test_training_arguments_are_the_config_options_under_their_argument_names():
    fields = {f.name: f for f in dataclasses.fields(LoRAFATrainingArguments)}
    args = LoRAFATrainingArguments(output_dir="unused", use_cpu=True)
    derived = dataclasses.replace(args.to_lorafa_config(), init_seed=LoRAFAConfig.init_seed)
    assert derived == LoRAFAConfig()
    for name, option in OPTIONS.items():
        if name in ("init_seed", "rank_pattern"):  # the run's `seed`; filled in by injection
            assert name not in fields
            continue
        argument = fields[argument_name(name)]
        assert argument.default == option.default, name
        assert argument.metadata["help"].startswith(option.metadata["help"].replace("%", "%%")), name
    assert argument_name("r") == "lora_r" and argument_name("lamda_init") == "lamda_init"
    assert "Args:\n    method (`str`, *optional*, defaults to `'lorafa'`):" in LoRAFAConfig.__doc__
    assert all(f"    {name} (" in LoRAFAConfig.__doc__ for name in OPTIONS if name != "rank_pattern")


CHANGED = {  # a value other than the default for every option a LaMDA++ adapter keeps
    "alpha": 12.0,
    "dropout": 0.1,
    "lorafa_gradient_correction": False,
    "lorafa_lr_ratio": 2.0,
    "lamda_freeze_fraction": 0.3,
    "lamda_freeze_order": "all",
    "lamda_init": "identity",
    "lamda_lr_ratio": 4.0,
    "lamda_s_lr_ratio": 0.25,
    "lamda_rank_budget": 60,
    "lamda_min_rank": 3,
    "init_seed": 7,
}


@pytest.mark.parametrize("method", METHODS)
def test_a_saved_adapter_reloads_with_every_option_it_was_trained_with(method, tmp_path):
    changed = {k: v for k, v in CHANGED.items() if k != "lamda_rank_budget" or method == "lamda++"}
    config = LoRAFAConfig(method=method, r=4, **changed)
    assert all(getattr(config, k) != option.default for k, option in OPTIONS.items() if k in changed)
    trained = inject_adapters(tiny_llama(), config)
    save_adapter(trained, tmp_path)
    reloaded = load_adapter(tiny_llama(), tmp_path).hf_lorafa_config
    original, layers = trained.hf_lorafa_config, sorted(adapter_layers(trained))
    assert {n: reloaded.rank_for(n) for n in layers} == {n: original.rank_for(n) for n in layers}
    expected = dataclasses.replace(original, target_modules=layers, rank_pattern=reloaded.rank_pattern)
    assert reloaded == expected
    facts = json.loads((tmp_path / "hf_lorafa.json").read_text())
    assert facts["init_only_options"] == ["lamda_init", "frozen_a_init", "init_seed"]


@pytest.mark.parametrize(
    ("value", "error", "needle"),
    [
        ({"lora_r": 8.5}, TypeError, "`lora_r` must be an int; got 8.5."),
        ({"lora_dropout": "0.1"}, TypeError, "`lora_dropout` must be a number; got '0.1'."),
        ({"lorafa_gradient_correction": "false"}, TypeError, "`lorafa_gradient_correction` must be true or false"),
        ({"lora_alpha": float("inf")}, ValueError, "`lora_alpha` must be a finite number; got inf."),
        ({"lamda_rank_budget": 100.5}, TypeError, "`lamda_rank_budget` must be an int or None; got 100.5."),
        ({"log_memory": "False"}, TypeError, "`log_memory` must be true or false"),
        ({"lora_dropout": 1.0}, ValueError, "`lora_dropout` must be in [0, 1); got 1.0."),
        ({"activation_savers": "none"}, TypeError, "`activation_savers` must be true or false"),
        ({"load_in_4bit": "false"}, TypeError, "`load_in_4bit` must be true or false"),
        ({"remove_padding": "no"}, TypeError, "`remove_padding` must be true or false"),
        ({"lorafa_lr_ratio": float("nan")}, ValueError, "`lorafa_lr_ratio` must be a finite number; got nan."),
        ({"lamda_s_lr_ratio": float("inf")}, ValueError, "`lamda_s_lr_ratio` must be a finite number; got inf."),
        ({"lora_target_modules": []}, TypeError, "`lora_target_modules` must be a string or a non-empty list"),
    ],
)
def test_every_option_is_checked_once_for_type_and_range_under_the_name_the_user_gave(value, error, needle):
    with pytest.raises(error) as raised:
        LoRAFATrainingArguments(output_dir="unused", use_cpu=True, **value)
    assert needle in str(raised.value)
    config_name = {argument_name(k): k for k in OPTIONS}.get(next(iter(value)))
    if config_name:  # the same check from Python, under the config's own name
        with pytest.raises(error, match=f"`{config_name}` must be"):
            LoRAFAConfig(**{config_name: next(iter(value.values()))})


def test_lists_of_module_names_are_taken_from_python_yaml_and_the_command_line():
    for value in (["q_proj", "v_proj"], ("q_proj", "v_proj"), "q_proj,v_proj"):
        args = LoRAFATrainingArguments(
            output_dir="unused", use_cpu=True, lora_target_modules=value, lora_modules_to_save=value
        )
        config = args.to_lorafa_config()
        assert config.target_modules == config.modules_to_save == ["q_proj", "v_proj"]
