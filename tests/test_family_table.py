"""Every model family users fine-tune × every method: the adapter contract on transformers' own architectures.

Each family is a tiny random config of transformers' own classes (hidden 32, one layer, vocab 64); each case injects,
trains one step (A frozen where the method freezes it, the base unchanged), checks the activation savers are exact
where they apply, and round-trips the adapter through PEFT (`PeftModel.from_pretrained`) and through our
`load_adapter` + `merge_adapters` with the same logits. Adding a family is one line in `fixtures/families.py`.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import METHODS, assert_only_adapter_trained, perturb_adapters
from fixtures.families import FAMILIES, FLOAT32_ONLY, SAVERS, VOCAB, tiny_model

from hf_lorafa import LoRAFAConfig, inject_adapters, load_adapter, merge_adapters, save_adapter
from hf_lorafa.training.activation_savers import apply_activation_savers


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100  # a masked prompt, as the collators produce
    return {"input_ids": ids, "labels": labels}


def logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits in eval mode; an encoder-decoder decodes the input ids (labels only feed the decoder there)."""
    extra = {"decoder_input_ids": inputs["input_ids"]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model.eval()(input_ids=inputs["input_ids"], **extra).logits


def loss_and_grads(model, inputs):
    model.train().zero_grad()
    torch.manual_seed(7)  # the same dropout masks with and without savers
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_family_holds_the_adapter_contract(family, method, tmp_path):
    from peft import PeftModel

    model = inject_adapters(tiny_model(family), LoRAFAConfig(method=method, r=4, alpha=8))
    inputs = batch()

    # One training step: B (and S) move, A only where it trains, the base not at all.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    for _ in range(2):  # LoRA's A gets no gradient while B is still zero: the second step moves it
        loss_and_grads(model, inputs)
        optimizer.step()
    assert_only_adapter_trained(model, before, a_trains=method == "lora")

    # Activation savers change what is kept for backward, never the loss or the adapter gradients (exact).
    # float64 where the family runs in it; transformers' grouped expert matmul takes float32 at most.
    stock = copy.deepcopy(model).to(torch.float32 if family in FLOAT32_ONLY else torch.float64)
    saved = apply_activation_savers(copy.deepcopy(stock), loss_chunk_tokens=5)
    assert set(saved.hf_lorafa_savers) == SAVERS[family]
    expected_loss, expected_grads = loss_and_grads(stock, inputs)
    loss, grads = loss_and_grads(saved, inputs)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        reference = expected_grads[name]
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())

    # Save -> PEFT loads it with our logits; our own reload, merged into plain layers, too.
    perturb_adapters(model)
    expected = logits(model, inputs)
    save_adapter(model, tmp_path)
    task_type = json.loads((tmp_path / "adapter_config.json").read_text())["task_type"]
    assert task_type == ("SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM")
    peft_model = PeftModel.from_pretrained(tiny_model(family), str(tmp_path))
    torch.testing.assert_close(logits(peft_model, inputs), expected, rtol=1e-5, atol=1e-5)
    merged = merge_adapters(load_adapter(tiny_model(family), tmp_path))
    assert not any("lora_" in n for n in merged.state_dict())
    torch.testing.assert_close(logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)
