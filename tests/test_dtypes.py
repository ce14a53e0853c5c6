"""Precision spec: every method trains under fp32, bf16 weights and bf16 autocast, with the savers off and on; a
frozen A from the data (`frozen_a_init`) spans the same directions in each.

bf16 autocast over fp32 weights is what `bf16=True` (TRL's SFTConfig default) does; bf16 weights is a base loaded
with `dtype=torch.bfloat16`. In each case the adapters stay fp32 (as PEFT's `autocast_adapter_dtype`), their
gradients point where the fp32 gradients point, and the Trainer with `bf16=True` trains the adapter only.
"""

from __future__ import annotations

import pytest
import torch
from conftest import METHODS, assert_only_adapter_trained, perturb_adapters, tiny_llama
from test_trainer import make_args, token_dataset

from hf_lorafa import LoRAFAConfig, LoRAFATrainer, inject_adapters
from hf_lorafa.training.activation_savers import apply_activation_savers

PRECISIONS = ["fp32", "bf16-weights", "bf16-autocast"]


def adapted(method: str, precision: str, savers: bool) -> torch.nn.Module:
    model = tiny_llama(dtype=torch.bfloat16 if precision == "bf16-weights" else torch.float32).train()
    inject_adapters(model, LoRAFAConfig(method=method, r=4, dropout=0.1, init_seed=0))
    perturb_adapters(model)  # LaMDA's S = 0 and LoRA's B = 0 would hide gradients that a trained adapter gets
    if savers:
        apply_activation_savers(model)
        assert model.hf_lorafa_savers == ["chunked_loss", "swiglu_recompute", "rmsnorm_recompute", "block_recompute"]
    return model


def adapter_grads(model: torch.nn.Module, input_ids: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # the same dropout masks in every precision
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("savers", [False, True], ids=["savers-off", "savers-on"])
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
def test_adapter_gradients_in_every_precision(method, precision, savers, input_ids):
    reference = adapter_grads(adapted(method, "fp32", savers=False), input_ids, "fp32")
    model = adapted(method, precision, savers)
    grads = adapter_grads(model, input_ids, precision)
    assert grads.keys() == reference.keys()
    params = dict(model.named_parameters())
    for name, grad in grads.items():
        assert grad is not None, name
        assert params[name].dtype == torch.float32 and grad.dtype == torch.float32, name
        if precision != "fp32" and "base_layer" not in name:
            # bf16 has 8 bits of mantissa: the direction survives, the last digits do not.
            cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference[name].flatten(), dim=0)
            assert cosine > 0.98, (name, cosine.item())
        elif precision == "fp32" and not savers:
            torch.testing.assert_close(grad, reference[name])


@pytest.mark.parametrize("method", ["lorafa", "lamda"])
def test_autocast_keeps_z_in_half_precision(method, input_ids):
    """Under autocast the one saved activation per adapted layer, z = A·x, is bf16: half the bytes of fp32."""
    from hf_lorafa.memory.measure import saved_tensor_bytes

    def saved(precision: str) -> int:
        model = adapted(method, precision, savers=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-autocast"):
            return saved_tensor_bytes(model, lambda: model(input_ids=input_ids, labels=input_ids))[0]

    assert saved("bf16-autocast") < saved("fp32")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["bf16-autocast", "bf16-weights"])
def test_trainer_with_bf16_trains_the_adapter_only(method, weights, tmp_path):
    model = tiny_llama(dtype=weights)
    args = make_args(tmp_path, adapter_method=method, bf16=True, activation_savers=True, lamda_freeze_fraction=1.0)
    trainer = LoRAFATrainer(model=model, args=args, train_dataset=token_dataset())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert_only_adapter_trained(model, before, a_trains=method == "lora")
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_fp16_on_cpu_is_refused_with_the_fix(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 mixed precision is valid on a GPU")
    with pytest.raises(ValueError, match=r"`fp16`.*bf16=True"):
        make_args(tmp_path, fp16=True)


@pytest.mark.parametrize("autocast", [False, True], ids=["no-autocast", "bf16-autocast"])
@pytest.mark.parametrize("method", ["lorafa", "lamda"])
def test_trained_factors_cast_to_bf16_over_an_fp32_a(method, autocast, input_ids):
    """TRL casts a QLoRA model's trainable parameters to bf16; the frozen A stays fp32 and training still works."""
    model = adapted(method, "fp32", savers=False)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    grads = adapter_grads(model, input_ids, "bf16-autocast" if autocast else "fp32")
    params = dict(model.named_parameters())
    assert grads and all(g is not None and g.dtype == params[n].dtype == torch.bfloat16 for n, g in grads.items())
    assert all(g.abs().sum() > 0 for g in grads.values())


def _frozen_a_after_training(precision: str, kind: str, tmp_path) -> dict[str, torch.Tensor]:
    """LaMDA's A (PMA) after a short Trainer run in `precision`, with the activation savers on (chunked loss
    included: the calibration's loss comes through them)."""
    model = tiny_llama(dtype=torch.bfloat16 if precision == "bf16-weights" else torch.float32)
    options = dict(adapter_method="lamda", frozen_a_init=kind, bf16=precision != "fp32", activation_savers=True)
    args = make_args(tmp_path / f"{precision}-{kind}", **options)
    LoRAFATrainer(model=model, args=args, train_dataset=token_dataset()).train()
    a = {n: p.detach() for n, p in model.named_parameters() if "lora_A" in n}
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in a.values())  # adapters stay fp32
    return {n: t.double() for n, t in a.items()}


@pytest.mark.parametrize("kind", ["gradient", "activations"])
@pytest.mark.parametrize("precision", ["bf16-weights", "bf16-autocast"])
def test_a_from_the_data_spans_in_bf16_what_it_spans_in_fp32(precision, kind, tmp_path):
    reference = _frozen_a_after_training("fp32", kind, tmp_path)
    a = _frozen_a_after_training(precision, kind, tmp_path)
    random = _frozen_a_after_training("fp32", "random", tmp_path / "random")
    for name, ref in reference.items():
        # The cosines of the principal angles between the row spaces: bf16 rounding turns them a little (> 0.997
        # on every layer here), while a random A's are far from 1.
        q_ref, q, q_random = (torch.linalg.qr(t.t())[0] for t in (ref, a[name], random[name]))
        assert torch.linalg.svdvals(q_ref.t() @ q).min() > 0.99, name
        assert torch.linalg.svdvals(q_ref.t() @ q_random).min() < 0.9, name
