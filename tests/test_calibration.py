"""`frozen_a_init` (calibration.py): a frozen A from the top directions of the training data's gradient or inputs."""

from __future__ import annotations

import copy
import logging
import re

import pytest
import torch
from conftest import FROZEN_A_METHODS, tiny_llama
from test_trainer import make_args, token_dataset

from hf_lorafa import LoRAFAConfig, LoRAFATrainer, inject_adapters, load_adapter, save_adapter
from hf_lorafa.tuners.calibration import init_frozen_a_from_data, set_frozen_a_directions
from hf_lorafa.tuners.injection import adapter_layers
from hf_lorafa.tuners.layers import A_ROW_NORM


def batches(n: int = 2):
    generator = torch.Generator().manual_seed(5)
    return [dict(input_ids=(ids := torch.randint(0, 256, (2, 12), generator=generator)), labels=ids) for _ in range(n)]


def full_gradients(base, data) -> dict[str, torch.Tensor]:
    """Full fine-tuning's gradient of every linear weight (but the head), summed over `data`: what A should span."""
    model = copy.deepcopy(base)
    weights = {n.removesuffix(".weight"): p for n, p in model.named_parameters() if n.endswith("proj.weight")}
    for p in model.parameters():
        p.requires_grad_(p in set(weights.values()))
    for batch in data:
        model(**batch).loss.backward()
    return {name: p.grad.double() for name, p in weights.items()}


def layer_inputs(base, data, name: str) -> torch.Tensor:
    """Layer `name`'s inputs over `data`, a row a token (every token: the batches have no padding)."""
    seen = []
    handle = base.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        for batch in data:
            base(batch["input_ids"])
    handle.remove()
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in seen]).double()


def row_space(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal projector onto A's row space."""
    q, _ = torch.linalg.qr(a.double().t())
    return q @ q.t()


@pytest.mark.parametrize("kind", ["gradient", "activations"])
@pytest.mark.parametrize("method", FROZEN_A_METHODS)
def test_a_spans_the_datas_top_directions_at_a_random_rows_scale(method, kind, llama):
    data = batches()
    model = inject_adapters(copy.deepcopy(llama), LoRAFAConfig(method=method, r=4))
    random_a = {n: m.lora_A.weight.detach().clone() for n, m in adapter_layers(model).items()}
    state = torch.random.get_rng_state()
    assert init_frozen_a_from_data(model, data, kind=kind) == 2
    assert torch.equal(torch.random.get_rng_state(), state)  # the training run draws what it would have drawn
    grads = full_gradients(llama, data)
    for name, layer in adapter_layers(model).items():
        a, r = layer.lora_A.weight.double(), layer.r
        assert not torch.equal(a.float(), random_a[name]), name
        x = layer_inputs(llama, data, name)
        second = x.t() @ x / x.shape[0]
        if kind == "gradient":  # full fine-tuning's gradient of W: its top-r right singular vectors
            top = torch.linalg.svd(grads[name])[2][:r]
        else:  # the inputs' covariance: its top-r eigenvectors
            centred = x - x.mean(0)
            top = torch.linalg.eigh(centred.t() @ centred / x.shape[0])[1][:, -r:].t()
        torch.testing.assert_close(row_space(a), row_space(top), atol=1e-5, rtol=0)
        # Rows stay orthogonal, and each z_i = A_i x has the mean square a random row has on average: A_ROW_NORM²·tr/d.
        gram = a @ a.t()
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-6, rtol=0)
        per_row = torch.einsum("ij,jk,ik->i", a, second, a)
        target = A_ROW_NORM**2 * torch.trace(second) / second.shape[0]
        torch.testing.assert_close(per_row, target.expand(r), rtol=1e-5, atol=0)
    # The model is still the base model: B = 0, or LaMDA's offset C = B₀S₀ over the new A.
    ids = data[0]["input_ids"]
    torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["lorafa", "lamda"])
def test_given_directions_are_set_at_a_random_rows_scale_and_the_model_is_unchanged(method, llama):
    """`set_frozen_a_directions` (what research/oracle_a.py freezes LoRA's learned row space with): A spans the given
    rows, each scaled to a random row's mean square over the batches; output, RNG and train mode as they were."""
    data = batches()
    model = inject_adapters(copy.deepcopy(llama), LoRAFAConfig(method=method, r=4))
    generator = torch.Generator().manual_seed(3)
    layers = adapter_layers(model)
    given = {
        name: torch.linalg.qr(torch.randn(layer.in_features, layer.r, generator=generator, dtype=torch.float64))[0].t()
        for name, layer in layers.items()
    }
    model.train()
    state = torch.random.get_rng_state()
    set_frozen_a_directions(model, data, given)
    assert torch.equal(torch.random.get_rng_state(), state) and model.training
    assert model.hf_lorafa_a_pending is False
    for name, layer in layers.items():
        a = layer.lora_A.weight.double()
        torch.testing.assert_close(row_space(a), given[name].t() @ given[name], atol=1e-5, rtol=0)
        x = layer_inputs(llama, data, name)
        second = x.t() @ x / x.shape[0]
        per_row = torch.einsum("ij,jk,ik->i", a, second, a)
        target = A_ROW_NORM**2 * torch.trace(second) / second.shape[0]
        torch.testing.assert_close(per_row, target.expand(layer.r), rtol=1e-5, atol=0)
    model.eval()
    ids = data[0]["input_ids"]
    torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=1e-5)


def test_a_from_the_gradient_keeps_more_of_it_than_a_random_a(llama):
    data = batches()
    model = inject_adapters(copy.deepcopy(llama), LoRAFAConfig(method="lorafa", r=4))
    random_a = {n: m.lora_A.weight.detach().double() for n, m in adapter_layers(model).items()}
    init_frozen_a_from_data(model, data)
    for name, g in full_gradients(llama, data).items():
        # B's first gradient is G Aᵀ: the share of G's energy it sees, in A's row space, against a random A's.
        kept = (g @ row_space(adapter_layers(model)[name].lora_A.weight)).square().sum()
        sigma = torch.linalg.svdvals(g)
        torch.testing.assert_close(kept, sigma[:4].square().sum(), rtol=1e-4, atol=0)
        assert (g @ row_space(random_a[name])).square().sum() < 0.9 * kept, name


@pytest.mark.parametrize("kind", ["gradient", "activations"])
def test_a_budget_for_one_layer_takes_a_pass_a_layer_and_sets_the_same_a(kind, llama):
    data = batches()
    one_pass = inject_adapters(copy.deepcopy(llama), LoRAFAConfig(method="lorafa", r=4))
    per_layer = copy.deepcopy(one_pass)
    init_frozen_a_from_data(one_pass, data, kind=kind)
    forwards = []
    per_layer.register_forward_pre_hook(lambda m, args, kwargs: forwards.append(1), with_kwargs=True)
    init_frozen_a_from_data(per_layer, data, kind=kind, budget=1)  # every layer's sums alone in a pass
    layers = adapter_layers(per_layer)
    assert len(forwards) == len(data) * (len(layers) + 1)  # a pass a layer, then the scale pass
    for name, layer in adapter_layers(one_pass).items():
        torch.testing.assert_close(layers[name].lora_A.weight, layer.lora_A.weight, rtol=0, atol=1e-6)


def test_lora_and_a_from_w_say_which_settings_take_a_gradient_a():
    with pytest.raises(ValueError, match="frozen_a_init='random' with method='lora'"):
        LoRAFAConfig(method="lora", frozen_a_init="gradient")
    with pytest.raises(ValueError, match="lamda_init='residual'.*'spectral', 'identity' or 'published'"):
        LoRAFAConfig(method="lamda", lamda_init="residual", frozen_a_init="gradient")
    with pytest.raises(ValueError, match="`frozen_a_init` must be one of random, gradient, activations; got 'pca'"):
        LoRAFAConfig(method="lorafa", frozen_a_init="pca")
    with pytest.raises(ValueError, match="this model's adapters train A"):
        init_frozen_a_from_data(inject_adapters(tiny_llama(), LoRAFAConfig(method="lora", r=4)), batches())
    model = inject_adapters(tiny_llama(), LoRAFAConfig(method="lorafa", r=4))
    with pytest.raises(ValueError, match="needs at least one training batch"):
        init_frozen_a_from_data(model, [])
    with pytest.raises(ValueError, match="`kind` must be 'gradient' or 'activations'; got 'pca'"):
        init_frozen_a_from_data(model, batches(), kind="pca")


@pytest.mark.parametrize("method", FROZEN_A_METHODS)
@pytest.mark.parametrize("kind", ["gradient", "activations"])
def test_the_trainer_sets_a_once_before_the_first_step_and_a_saved_adapter_keeps_it(method, kind, tmp_path, caplog):
    model = tiny_llama()
    args = make_args(tmp_path, adapter_method=method, frozen_a_init=kind)
    trainer = LoRAFATrainer(model=model, args=args, train_dataset=token_dataset())
    assert trainer.lorafa_config.frozen_a_init == kind
    random_a = {n: m.lora_A.weight.detach().clone() for n, m in adapter_layers(model).items()}
    with caplog.at_level(logging.INFO, logger="hf_lorafa.training.trainer"):
        trainer.train()
    assert model.hf_lorafa_a_batches == 4
    assert re.search(rf"frozen A set from the {kind} of 4 training batches; peak \d+ MiB \(process_rss\)", caplog.text)
    assert trainer.memory.overall_peak > 0
    set_a = {n: m.lora_A.weight.detach().clone() for n, m in adapter_layers(model).items()}
    assert all(not torch.equal(set_a[n], random_a[n]) for n in set_a)
    trainer.train()  # a second call trains on from where the first left off; A is not set again
    assert all(torch.equal(m.lora_A.weight, set_a[n]) for n, m in adapter_layers(model).items())
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(tiny_llama(), tmp_path / "adapter")
    ids = token_dataset()[:2]["input_ids"]
    torch.testing.assert_close(loaded(torch.tensor(ids)).logits, model(torch.tensor(ids)).logits)
    # Training on from a loaded adapter keeps the A it was saved with (its B was trained over that A).
    assert loaded.hf_lorafa_config.frozen_a_init == kind and not loaded.hf_lorafa_a_pending
    loaded_a = {n: m.lora_A.weight.detach().clone() for n, m in adapter_layers(loaded).items()}
    LoRAFATrainer(model=loaded, args=make_args(tmp_path / "again"), train_dataset=token_dataset()).train()
    assert all(torch.equal(m.lora_A.weight, loaded_a[n]) for n, m in adapter_layers(loaded).items())
