"""Core spec: the four methods over plain linear bases — init, frozen parts, exact backward, memory, formats."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    FROZEN_A_METHODS,
    METHODS,
    assert_only_adapter_trained,
    perturb_adapters,
    tiny_llama,
    train_steps,
)
from torch import nn

from hf_lorafa import (
    LoRAFAConfig,
    count_parameters,
    inject_adapters,
    lamda_schedule_step,
    load_adapter,
    merge_adapters,
    save_adapter,
    saved_tensor_bytes,
)
from hf_lorafa.tuners.lamda import LaMDALayer
from hf_lorafa.tuners.layers import FrozenAAdapterFunction, LoRAFALayer


def adapted(method: str, base=None, **kwargs):
    base = base if base is not None else tiny_llama()
    return inject_adapters(copy.deepcopy(base), LoRAFAConfig(method=method, r=kwargs.pop("r", 4), **kwargs))


@pytest.mark.parametrize("method", METHODS)
def test_output_at_init_equals_base(method, llama, input_ids):
    model = adapted(method, llama)
    torch.testing.assert_close(model(input_ids).logits, llama(input_ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_training_changes_adapter_only(method, llama, input_ids):
    model = adapted(method, llama, dropout=0.05).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(model, input_ids)
    assert_only_adapter_trained(model, before, a_trains=method == "lora")


def reference_forward(x, A, B, S, W, bias, scaling, mask, C=None):
    """Plain-autograd float64 reference of `W x + b + s·(B S − C) A (mask ⊙ x)`."""
    h = x * mask
    u = h @ A.t() if S is None else h @ A.t() @ S.t()
    offset = 0 if C is None else h @ A.t() @ C.t()
    return x @ W.t() + bias + scaling * (u @ B.t() - offset)


@pytest.mark.parametrize("with_core", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_custom_backward_matches_float64_autograd(with_core, p):
    torch.manual_seed(0)
    base = nn.Linear(24, 16).double()
    layer = (LaMDALayer if with_core else LoRAFALayer)(base, r=4, alpha=8, dropout=p)
    if not with_core:
        layer.gradient_correction = False
    layer.init_lora(seed=0)
    perturb_adapters(layer, scale=0.3)
    layer.train()
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(42)
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)

    # Same seed → the same draw inside forward → the same mask, rebuilt here.
    torch.manual_seed(42)
    seed = int(torch.randint(0, 2**62, (1,)).item())
    from hf_lorafa.tuners.layers import dropout_mask

    mask = dropout_mask(x.shape, p, seed, x.device, x.dtype) if p else torch.ones_like(x)
    x_ref = x.detach().clone().requires_grad_(True)
    B = layer.lora_B.weight.detach().clone().requires_grad_(True)
    S = layer.lora_S.weight.detach().clone().requires_grad_(True) if with_core else None
    C = layer.lamda_offset if with_core else None  # LaMDA's default (residual) init subtracts its principal part
    assert (C is not None) == with_core
    y_ref = reference_forward(x_ref, layer.lora_A.weight, B, S, base.weight, base.bias, layer.scaling, mask, C)
    y_ref.backward(grad_out)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.lora_B.weight.grad, B.grad)
    if with_core:
        torch.testing.assert_close(layer.lora_S.weight.grad, S.grad)
    assert layer.lora_A.weight.grad is None


@pytest.mark.parametrize("generator", [None, "sfc64", "torch"])
def test_dropout_mask_is_a_fair_seeded_draw(generator):
    from hf_lorafa.tuners.layers import dropout_mask

    mask = dropout_mask(torch.Size([256, 1024]), 0.05, 7, torch.device("cpu"), torch.float32, generator)
    kept = mask > 0
    regenerated = dropout_mask(mask.shape, 0.05, 7, mask.device, mask.dtype, generator)  # as backward draws it
    assert torch.equal(mask, regenerated)
    assert abs(kept.float().mean().item() - 0.95) < 0.003  # 262k draws: std of the rate ≈ 0.0004
    assert torch.all(mask[kept] == 1 / 0.95)
    other = dropout_mask(mask.shape, 0.05, 8, mask.device, mask.dtype, generator) > 0
    both_dropped = ((~kept) & (~other)).float().mean().item()
    assert abs(both_dropped - 0.05**2) < 0.001  # independent across seeds, not the same pattern
    rows_dropped = (~kept).float().mean(dim=1)
    assert rows_dropped.std() < 0.02  # no token gets a systematically different rate


def test_keep_mask_draws_ties_from_the_low_bits():
    from hf_lorafa.tuners.layers import keep_mask

    # p = 2⁻⁹: the threshold 2²³ has top byte 0, so every drop comes from a tied byte (1/256) and its low bits (1/2).
    keep = keep_mask(torch.Size([1 << 22]), 2**-9, 3, torch.device("cpu"), torch.float32, "sfc64")
    assert keep.dtype == torch.bool
    assert abs((~keep).sum().item() - 8192) < 400  # 2²² / 512 expected, std ≈ 90


def test_dropout_mask_generators_differ_and_unknown_is_refused():
    from hf_lorafa.tuners.layers import dropout_mask

    args = (torch.Size([64, 64]), 0.3, 7, torch.device("cpu"), torch.float32)
    assert not torch.equal(dropout_mask(*args, "sfc64"), dropout_mask(*args, "torch"))
    assert torch.equal(dropout_mask(*args), dropout_mask(*args, "sfc64"))  # the CPU default
    with pytest.raises(ValueError, match="`generator` must be one of sfc64, torch"):
        dropout_mask(*args, "philox")


def test_gradient_correction_is_lorafa_v2():
    torch.manual_seed(0)
    layer = LoRAFALayer(nn.Linear(24, 16).double(), r=4, alpha=8)
    layer.init_lora(seed=0)
    x = torch.randn(7, 24, dtype=torch.float64)
    layer(x).sum().backward()
    corrected = layer.lora_B.weight.grad.clone()
    layer.lora_B.weight.grad = None
    layer.gradient_correction = False
    layer.refresh_preconditioner()
    layer(x).sum().backward()
    A = layer.lora_A.weight.double()
    expected = layer.lora_B.weight.grad @ torch.linalg.pinv(A @ A.t()) / layer.scaling**2
    torch.testing.assert_close(corrected, expected)
    torch.testing.assert_close(A @ A.t(), torch.eye(4, dtype=torch.float64) / 3)


def test_function_saves_only_rank_sized_tensors():
    torch.manual_seed(0)
    layer = LoRAFALayer(nn.Linear(256, 256), r=8, alpha=16, dropout=0.05).train()
    layer.init_lora(0)
    x = torch.randn(4, 32, 256, requires_grad=True)
    nbytes, _ = saved_tensor_bytes(layer, lambda: layer(x))
    assert nbytes == 4 * 32 * 8 * 4  # z only: tokens × r × fp32
    assert FrozenAAdapterFunction.backward is not None


def floor_bytes(base, ids) -> int:
    model = copy.deepcopy(base).train()
    model.requires_grad_(False)
    model.enable_input_require_grads()
    nbytes, _ = saved_tensor_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    return nbytes


def peft_lora_bytes(base, ids, r: int, dropout: float, freeze_a: bool = False) -> int:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear")
    ).train()
    if freeze_a:
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.requires_grad_(False)
    model.enable_input_require_grads()
    nbytes, _ = saved_tensor_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    return nbytes


def test_lorafa_saved_bytes_near_floor_and_far_below_peft():
    base = tiny_llama(hidden=256, layers=2, vocab=1024)
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    model = adapted("lorafa", base, r=8, dropout=0.05).train()
    model.enable_input_require_grads()
    ours, _ = saved_tensor_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    floor = floor_bytes(base, ids)
    peft = peft_lora_bytes(base, ids, r=8, dropout=0.05)
    print(f"LoRA-FA(dropout .05) / floor = {ours / floor:.4f}; / PEFT LoRA(dropout .05) = {ours / peft:.4f}")
    assert ours <= 1.03 * floor
    assert ours <= 0.6 * peft


@pytest.mark.parametrize("method", METHODS)
def test_merge_equals_unmerged(method, llama, input_ids):
    model = adapted(method, llama)
    perturb_adapters(model)
    expected = model(input_ids).logits
    merged = merge_adapters(model)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_and_peft_reproduce_logits(method, llama, input_ids, tmp_path):
    from peft import PeftModel

    model = adapted(method, llama)
    perturb_adapters(model)
    expected = model(input_ids).logits
    save_adapter(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
        "hf_lorafa.json",
    }
    reloaded = load_adapter(copy.deepcopy(llama), tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path)).eval()
    torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_plain_peft_lora_adapter_continues_as_lorafa(llama, input_ids, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        copy.deepcopy(llama), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    perturb_adapters(peft_model)
    expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    model = load_adapter(copy.deepcopy(llama), tmp_path)
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert model.hf_lorafa_config.method == "lorafa"
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)


def test_lamda_schedule_leaves_r_squared_per_layer(llama, input_ids):
    model = adapted("lamda", llama, r=4, lamda_freeze_fraction=0.5).train()
    layers = [m for m in model.modules() if isinstance(m, LaMDALayer)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for step in range(1, 11):
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trainable = lamda_schedule_step(model, progress=step / 10)
        if step == 2:  # progress .2 of a .5 window: 1 of 4 columns (the smallest singular value) frozen
            assert layers[0].frozen_columns == 1
            frozen = layers[0].lora_B.weight[:, -1:].detach().clone()
        if step == 3:  # momentum and weight decay did not move the frozen column; the others still train
            assert layers[0].frozen_columns == 2
            torch.testing.assert_close(layers[0].lora_B.weight[:, -1:], frozen, rtol=0, atol=0)
    assert all(not m.lora_B.weight.requires_grad for m in layers)
    assert trainable == len(layers) * 4 * 4
    assert count_parameters(model)[0] == trainable


def test_lamda_plus_plus_ranks_follow_the_spectrum(llama):
    q_proj = llama.model.layers[0].self_attn.q_proj
    with torch.no_grad():  # a nearly rank-1 weight: its top direction holds all the energy → the least rank
        q_proj.weight.copy_(torch.outer(torch.randn(64), torch.randn(64)) + 1e-4 * torch.randn(64, 64))
    model = adapted("lamda++", llama, r=4, lamda_min_rank=1)
    ranks = {n: m.r for n, m in model.named_modules() if isinstance(m, LaMDALayer)}
    assert sum(ranks.values()) == 4 * len(ranks)
    assert ranks["model.layers.0.self_attn.q_proj"] == 1
    assert max(ranks.values()) > 4


@pytest.mark.parametrize("method", FROZEN_A_METHODS + ["lora"])
def test_gradient_checkpointing_gives_same_gradients(method, llama, input_ids):
    grads = []
    for checkpointing in (False, True):
        model = adapted(method, llama, dropout=0.1).train()
        perturb_adapters(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(7)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_module_to_save_holds_no_adapter(method):
    """A module trained in full (here each layer's MLP, as BERT's `pooler` for a classifier) gets no adapter inside:
    its linear layers stay plain and train whole, as PEFT does, and a frozen A is never made trainable by it."""
    model = inject_adapters(tiny_llama(), LoRAFAConfig(method=method, r=4, modules_to_save=["mlp"]))
    for name, module in model.named_modules():
        if ".mlp" in name:
            assert not hasattr(module, "lora_A"), name
    mlp = dict(model.named_parameters())
    assert all(p.requires_grad for n, p in mlp.items() if ".mlp." in n)
    trained_a = [n for n, p in mlp.items() if "lora_A" in n and p.requires_grad]
    assert bool(trained_a) == (method == "lora")  # only LoRA trains A
    assert any("self_attn.q_proj.lora_A" in n for n in mlp)  # the other layers still take adapters
