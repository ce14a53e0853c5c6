"""LaMDA's initialisations (lamda.py): step-0 output, first-step gradients, schedule, export, lr groups."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_only_adapter_trained, perturb_adapters, train_steps

from hf_lorafa import LoRAFAConfig, inject_adapters, load_adapter, merge_adapters, save_adapter
from hf_lorafa.training.param_groups import lorafa_param_groups, lr_ratios
from hf_lorafa.tuners.lamda import LaMDALayer, lamda_schedule_step

# init → (B gets gradient on the window's first step, S gets gradient on the first step)
INITS = {
    "residual": (True, True),
    "svd": (False, True),
    "published": (True, False),
    "identity": (True, False),
    "spectral": (True, True),
}


def lamda_model(base, init: str, method: str = "lamda", **kwargs):
    config = LoRAFAConfig(method=method, r=4, lamda_init=init, **kwargs)
    return inject_adapters(copy.deepcopy(base), config)


def first_step_grads(model, input_ids) -> dict[str, list[float]]:
    model.train()
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    return {
        part: [p.grad.abs().max().item() for n, p in model.named_parameters() if part in n]
        for part in ("lora_B", "lora_S")
    }


@pytest.mark.parametrize("method", ["lamda", "lamda++"])
@pytest.mark.parametrize("init", list(INITS))
def test_output_unchanged_at_step_0_and_first_step_gradients(init, method, llama, input_ids):
    model = lamda_model(llama, init, method)
    torch.testing.assert_close(model(input_ids).logits, llama(input_ids).logits, rtol=0, atol=1e-5)
    grads = first_step_grads(model, input_ids)
    b_moves, s_moves = INITS[init]
    # Every layer, not just one: a single zero means that layer's B or S is idle on the first step.
    assert all(g > 0 for g in grads["lora_B"]) == b_moves and (min(grads["lora_B"]) == 0) != b_moves
    assert all(g > 0 for g in grads["lora_S"]) == s_moves and (min(grads["lora_S"]) == 0) != s_moves


def test_residual_init_is_the_principal_part_over_an_untouched_base(llama):
    model = lamda_model(llama, "residual")
    layer = model.model.layers[0].self_attn.q_proj
    weight = llama.model.layers[0].self_attn.q_proj.weight.double()
    u, sigma, vh = torch.linalg.svd(weight)
    principal = (u[:, :4] * sigma[:4]) @ vh[:4]
    # s·B S A is W's rank-4 principal part, taken off again by the offset (the adapter adds nothing at step 0);
    # the stored base weight is bit-identical to the original.
    torch.testing.assert_close(layer.delta_weight(), torch.zeros(64, 64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        layer.scaling * (layer.lora_B.weight @ layer.lora_S.weight @ layer.lora_A.weight),
        principal.float(),
        atol=1e-5,
        rtol=1e-5,
    )
    assert torch.equal(layer.base_layer.weight, llama.model.layers[0].self_attn.q_proj.weight)


def test_default_spectral_init_is_w_spectrum_over_lorafas_random_a(llama):
    assert LoRAFAConfig(method="lamda").lamda_init == "spectral"
    model = lamda_model(llama, LoRAFAConfig.lamda_init)
    lorafa = inject_adapters(copy.deepcopy(llama), LoRAFAConfig(method="lorafa", r=4))
    layer = model.model.layers[0].self_attn.q_proj
    u, sigma, _ = torch.linalg.svd(llama.model.layers[0].self_attn.q_proj.weight.double())
    # A: LoRA-FA's random A (same seed), not W's singular vectors; B = U_r, S = diag(σ_r)/s; C = B₀S₀.
    torch.testing.assert_close(layer.lora_A.weight, lorafa.model.layers[0].self_attn.q_proj.lora_A.weight)
    torch.testing.assert_close(layer.lora_B.weight, u[:, :4].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_S.weight, torch.diag(sigma[:4] / layer.scaling).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.lamda_offset, layer.lora_B.weight @ layer.lora_S.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.delta_weight(), torch.zeros(64, 64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", list(INITS))
def test_schedule_ends_with_r_squared_and_export_matches_peft_on_the_original_base(init, llama, input_ids, tmp_path):
    from peft import PeftModel

    model = lamda_model(llama, init, lamda_freeze_fraction=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, 5):
        model.train()(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainable = lamda_schedule_step(model, progress=step / 4)
    layers = [m for m in model.modules() if isinstance(m, LaMDALayer)]
    assert trainable == sum(m.r**2 for m in layers) == 16 * len(layers)
    assert_only_adapter_trained(model, before, a_trains=False)
    expected = model.eval()(input_ids).logits
    assert not torch.allclose(expected, llama(input_ids).logits, atol=1e-3)  # it learned something to export
    save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    reloaded = load_adapter(copy.deepcopy(llama), tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merge_adapters(model)(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lamda", "lamda++"])
def test_default_window_leaves_r_squared_from_three_quarters_of_the_steps(method, llama):
    model = lamda_model(llama, "spectral", method)
    layers = [m for m in model.modules() if isinstance(m, LaMDALayer)]
    r_squared = sum(m.r**2 for m in layers)
    frozen = []
    for progress in (0.0, 0.25, 0.5, 0.7):
        assert lamda_schedule_step(model, progress=progress) > r_squared  # B still has columns that train
        frozen.append(sum(m.frozen_columns for m in layers))
    assert frozen[0] == 0 and frozen == sorted(frozen) and frozen[-1] > frozen[1] > 0  # one after another
    assert lamda_schedule_step(model, progress=0.75) == r_squared
    assert all(m.frozen_columns == m.r for m in layers)


def test_residual_offset_is_recomputed_not_saved(llama):
    model = lamda_model(llama, "residual")
    perturb_adapters(model)
    assert not any("lamda_offset" in k for k in model.state_dict())
    again = lamda_model(llama, "residual")
    for a, b in zip(model.modules(), again.modules()):
        if isinstance(a, LaMDALayer):
            assert torch.equal(a.lamda_offset, b.lamda_offset)


@pytest.mark.parametrize(
    "method, ratios",
    [
        ("lamda", {"lora_S": 12.0, "lora_B": 4.0}),
        ("lamda++", {"lora_S": 12.0, "lora_B": 4.0}),
        ("lorafa", {"lora_B": 2.0}),
        ("lora", {}),
    ],
)
def test_learning_rate_groups(method, ratios, llama):
    config = LoRAFAConfig(method=method, r=4, lamda_lr_ratio=4.0, lamda_s_lr_ratio=3.0, lorafa_lr_ratio=2.0)
    model = inject_adapters(copy.deepcopy(llama), config)
    assert lr_ratios(model.hf_lorafa_config) == ratios
    groups = lorafa_param_groups(model, set(), 1e-3, 0.0, ratios)
    lr_of = {id(p): g.get("lr", 1e-3) for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(lr_of) == len(trainable)
    for name, param in trainable:
        tensor = name.split(".")[-2]  # …q_proj.lora_S.weight -> lora_S
        assert lr_of[id(param)] == pytest.approx(1e-3 * ratios.get(tensor, 1.0)), name


def test_residual_lamda_trains_without_touching_the_base(llama, input_ids):
    model = lamda_model(llama, "residual", dropout=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model.train(), input_ids)
    assert_only_adapter_trained(model, before, a_trains=False)


@pytest.mark.parametrize("method", ["lamda", "lamda++"])
def test_twice_the_rank_recipe_trains_b_whole_at_four_times_then_r_squared(method, llama, input_ids):
    """README's recipe for LoRA's accuracy (identity init, B at 4x and whole until the window's end, S at 1x): B's
    every column trains up to the window's end, at 4x the learning rate, and S alone (r² a layer) after it."""
    recipe = dict(lamda_lr_ratio=4.0, lamda_s_lr_ratio=0.25, lamda_freeze_order="all")
    model = lamda_model(llama, "identity", method, **recipe)
    assert lr_ratios(model.hf_lorafa_config) == {"lora_B": 4.0}  # S at 4 x 0.25 = the learning rate itself
    layers = [m for m in model.modules() if isinstance(m, LaMDALayer)]
    whole = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert whole == sum(m.r**2 + m.lora_B.weight.numel() for m in layers)
    grads = first_step_grads(model, input_ids)
    assert min(grads["lora_B"]) > 0  # every layer's B learns from the first step, as LoRA-FA's does
    for progress in (0.0, 0.25, 0.5, 0.74):
        assert lamda_schedule_step(model, progress=progress) == whole
        assert all(m.frozen_columns == 0 for m in layers)
    assert lamda_schedule_step(model, progress=0.75) == sum(m.r**2 for m in layers)
    assert all(not m.lora_B.weight.requires_grad for m in layers)
