"""GPT-2's family (transformers' `Conv1D`, weight stored `(in, out)`): every method adapts it as PEFT does with
`fan_in_fan_out=True`. Inject, train (A frozen, base unchanged), keep only `z = A·x` for backward, save so PEFT loads
the same logits, reload, merge (in Python and with `hf-lorafa merge`), estimate memory."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import METHODS, assert_only_adapter_trained, perturb_adapters, train_steps
from fixtures.tiny_folder import build_tokenizer
from test_trainer import make_args, token_dataset
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from hf_lorafa import (
    LoRAFAConfig,
    LoRAFATrainer,
    adapter_layers,
    estimate_memory,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
)
from hf_lorafa.cli.commands import merge_main
from hf_lorafa.memory.measure import saved_tensor_bytes

VOCAB = 64


def tiny_gpt2(layers: int = 2, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=32, n_layer=layers, n_head=4, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


def adapted(method: str, base: GPT2LMHeadModel, **options) -> GPT2LMHeadModel:
    return inject_adapters(copy.deepcopy(base), LoRAFAConfig(method=method, r=4, **options))


@pytest.fixture
def ids():
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("method", METHODS)
def test_all_linear_adapts_every_conv1d_but_not_the_head(method):
    model = adapted(method, tiny_gpt2())
    layers = adapter_layers(model)
    assert sorted({n.split(".", 3)[-1] for n in layers}) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert len(layers) == 8 and "lm_head" not in str(list(layers))
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert isinstance(c_attn.base_layer, Conv1D)
    assert (c_attn.in_features, c_attn.out_features) == (32, 96)
    assert c_attn.lora_A.weight.shape == (4, 32) and c_attn.lora_B.weight.shape == (96, 4)


def test_named_targets_find_conv1d_layers():
    model = adapted("lorafa", tiny_gpt2(), target_modules=["c_attn", "c_fc"])
    assert sorted(adapter_layers(model)) == [
        f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")
    ]


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_adapters_not_the_base(method, ids):
    model = adapted(method, tiny_gpt2()).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, ids, steps=2)
    assert_only_adapter_trained(model, before, a_trains=method == "lora")


@pytest.mark.parametrize("method", METHODS)
def test_frozen_a_backward_keeps_only_z(method):
    """Over a Conv1D base, as over nn.Linear: LoRA keeps the layer's input; the others keep r values per token."""
    layer = adapter_layers(adapted(method, tiny_gpt2(layers=1), dropout=0.1))["transformer.h.0.mlp.c_fc"].train()
    x = torch.randn(2, 8, 32, requires_grad=True)
    nbytes, out = saved_tensor_bytes(layer, lambda: layer(x))
    if method == "lora":
        assert nbytes >= 2 * 8 * 32 * 4
    else:
        assert nbytes == 2 * 8 * layer.r * 4  # z: tokens × r float32, nothing of width d_in (no x, no mask)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("method", METHODS)
def test_input_gradient_matches_plain_autograd(method):
    """`dx = Wᵀg + …` reads the Conv1D weight the right way round: compare with autograd through the merged layer."""
    layer = adapter_layers(adapted(method, tiny_gpt2(layers=1)))["transformer.h.0.mlp.c_fc"]
    perturb_adapters(layer)
    x = torch.randn(2, 8, 32, requires_grad=True)
    layer(x).square().sum().backward()
    expected = x.grad.clone()
    dense = copy.deepcopy(layer.base_layer)
    dense.weight.data += layer.delta_weight().detach().t()
    x.grad = None
    dense(x).square().sum().backward()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_peft_reload_and_merge_reproduce_logits(method, ids, tmp_path):
    from peft import PeftModel

    base = tiny_gpt2()
    model = adapted(method, base)
    perturb_adapters(model)
    expected = model(ids).logits.detach()
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] is True
    assert sorted(saved["target_modules"]) == ["c_attn", "c_fc", "c_proj"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(reloaded(ids).logits, expected, rtol=1e-5, atol=1e-5)
    merged = merge_adapters(model)
    assert not any("lora" in n for n in merged.state_dict())
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_merge_command_keeps_gpt2_loadable(ids, tmp_path):
    base_dir, adapter_dir, merged_dir = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    base = tiny_gpt2()
    base.save_pretrained(base_dir)
    build_tokenizer().save_pretrained(base_dir)
    model = inject_adapters(GPT2LMHeadModel.from_pretrained(base_dir), LoRAFAConfig(method="lamda", r=4))
    perturb_adapters(model)
    expected = model(ids).logits.detach()
    save_adapter(model, adapter_dir)
    merge_main([str(adapter_dir), str(merged_dir)])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, use_safetensors=True)
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_lamda_plus_plus_ranks_fit_each_conv1d():
    model = adapted("lamda++", tiny_gpt2())
    layers = adapter_layers(model)
    assert sum(layer.r for layer in layers.values()) == 4 * len(layers)
    for layer in layers.values():
        # LaMDA's spectral init reads W as (out, in): B spans the top-r left singular vectors of the transposed weight.
        u = torch.linalg.svd(layer.base_layer.weight.detach().t().double(), full_matrices=False)[0][:, : layer.r]
        torch.testing.assert_close(layer.lora_B.weight.double().abs(), u.abs(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["lorafa", "lamda"])
def test_estimate_reads_a_gpt2_models_layers(method):
    """Adapter sizes come from the model's Conv1D layers, `r·d_out` trained values each for B read as (in, out)."""
    model = tiny_gpt2()
    estimate = estimate_memory(model, method, batch=2, seq=8, r=4)
    floor = estimate_memory(model, "none", batch=2, seq=8, r=4)
    injected = adapted(method, model)
    adapter_numel = sum(p.numel() for n, p in injected.named_parameters() if "lora_" in n)
    assert estimate.total_parameters - floor.total_parameters == adapter_numel
    assert estimate.trainable_parameters == sum(p.numel() for p in injected.parameters() if p.requires_grad)
    assert estimate_memory(injected, method, batch=2, seq=8, r=4) == estimate


@pytest.mark.parametrize("method", METHODS)
def test_trainer_trains_gpt2(method, tmp_path):
    model = tiny_gpt2()
    args = make_args(tmp_path, adapter_method=method, max_steps=2, lamda_freeze_fraction=1.0)
    trainer = LoRAFATrainer(model=model, args=args, train_dataset=token_dataset(n=8, length=8, vocab=VOCAB))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert_only_adapter_trained(model, before, a_trains=method == "lora")
    trainer.save_model(str(tmp_path / "adapter"))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True


def test_a_peft_gpt2_adapter_loads_with_its_logits(ids, tmp_path):
    """PEFT's own GPT-2 adapter (it writes `fan_in_fan_out: true`) continues here as LoRA-FA with PEFT's outputs."""
    from peft import LoraConfig, get_peft_model

    base = tiny_gpt2()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn", "c_proj"]))
    perturb_adapters(peft_model)
    expected = peft_model.eval()(ids).logits.detach()
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert len(adapter_layers(model)) == 6  # c_attn, and c_proj in both attention and MLP, of two blocks
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
