"""Mixture-of-Experts models: adapters on the stacked expert parameters (`target_parameters`, as PEFT's).

One table, methods × MoE families (tiny random Qwen3-MoE and Mixtral), holding the contract: a training step trains
the adapters only (A frozen for LoRA-FA) and leaves the base unchanged; the saved adapter gives PEFT's logits; it
reloads and merges to the same logits; the memory estimator counts its trainable parameters exactly. Then: what
`all-linear` says on an MoE model, and the methods and options `target_parameters` refuses.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from hf_lorafa import LoRAFAConfig, inject_adapters, load_adapter, merge_adapters, save_adapter
from hf_lorafa.memory.estimate import estimate_memory
from hf_lorafa.memory.measure import saved_tensor_bytes
from hf_lorafa.tuners.injection import count_parameters

TINY = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
FAMILIES = {
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(
        Qwen3MoeConfig(**TINY, head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=4,
                       num_experts_per_tok=2)
    ),
    "mixtral": lambda: MixtralForCausalLM(
        MixtralConfig(**TINY, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)
    ),
}  # fmt: skip
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
METHODS = ["lora", "lorafa"]


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # the router starts at zero in some families: give the tokens different experts
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0, 0.5)
    return model


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_expert_adapters_train_save_reload_merge(family, method, tmp_path):
    from peft import PeftModel

    base = tiny(family)
    model = inject_adapters(copy.deepcopy(base), LoRAFAConfig(method=method, r=2, target_parameters=EXPERTS))
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n and ".lora_" in n}
    assert len(experts) == 2 * 2 * 2  # layers × expert parameters × (A, B)
    assert all(p.requires_grad == (method == "lora" or "lora_B" in n) for n, p in experts.items())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == param.requires_grad, name  # adapters moved, the base (experts included) did not
    assert all(not torch.equal(p, before[n]) for n, p in experts.items() if "lora_B" in n)

    ours = logits(model, ids)
    assert not torch.allclose(ours, logits(base, ids))
    save_adapter(model, tmp_path)
    peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(peft, ids), ours, rtol=0, atol=1e-6)
    reloaded = load_adapter(copy.deepcopy(base), tmp_path)
    assert reloaded.hf_lorafa_config.target_parameters == EXPERTS
    torch.testing.assert_close(logits(reloaded, ids), ours, rtol=0, atol=0)
    merged = merge_adapters(reloaded)
    assert not any(".lora_" in n or ".base_layer." in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("targets", [None, EXPERTS, ["gate_up_proj"]])
def test_estimator_counts_expert_adapters(family, method, targets):
    model = inject_adapters(tiny(family), LoRAFAConfig(method=method, r=2, target_parameters=targets))
    estimate = estimate_memory(model, method, batch=1, seq=8, r=2, target_parameters=targets)
    assert estimate.trainable_parameters == count_parameters(model)[0]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_estimator_counts_what_expert_adapters_keep(family, method):
    """The bytes expert adapters add to what one forward saves for backward, measured with the hooks, as predicted."""
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    added = []
    for targets in (None, EXPERTS):
        model = inject_adapters(tiny(family), LoRAFAConfig(method=method, r=2, target_parameters=targets)).train()
        saved, _ = saved_tensor_bytes(model, lambda m=model: m(input_ids=ids, labels=ids).loss)
        estimate = estimate_memory(model, method, 2, 16, r=2, dtype=torch.float32, target_parameters=targets)
        added.append((saved, estimate.activations))
    (saved, estimated), (saved_experts, estimated_experts) = added
    assert saved_experts - saved == estimated_experts - estimated > 0


def test_all_linear_says_once_what_it_left(caplog):
    with caplog.at_level(logging.WARNING, logger="hf_lorafa"):
        inject_adapters(tiny("qwen3_moe"), LoRAFAConfig(r=2))
    notices = [r.getMessage() for r in caplog.records if "all-linear" in r.getMessage()]
    assert len(notices) == 1
    assert "mlp.experts.gate_up_proj (×2)" in notices[0] and "target_parameters" in notices[0]
    assert "q_proj" in notices[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_lorafa"):
        inject_adapters(tiny("qwen3_moe"), LoRAFAConfig(r=2, target_parameters=["gate_up_proj"]))
    (notice,) = [r.getMessage() for r in caplog.records if "all-linear" in r.getMessage()]
    assert "down_proj" in notice and "gate_up_proj" not in notice
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_lorafa"):
        inject_adapters(tiny("mixtral"), LoRAFAConfig(r=2, target_parameters=EXPERTS))
    assert not [r for r in caplog.records if "all-linear" in r.getMessage()]


def test_experts_only(tmp_path):
    """`target_modules=[]` beside `target_parameters` adapts the experts alone, as in PEFT."""
    model = inject_adapters(tiny("mixtral"), LoRAFAConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    assert {n.rsplit(".", 2)[0].split(".", 3)[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "mlp.experts",
        "mlp.experts.base_layer",
    }
    save_adapter(model, tmp_path)
    assert load_adapter(tiny("mixtral"), tmp_path).hf_lorafa_config.target_modules == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "lamda"}, "'lora' or 'lorafa'"),
        ({"method": "lamda++"}, "'lora' or 'lorafa'"),
        ({"dropout": 0.1}, "dropout"),
        ({"frozen_a_init": "gradient"}, "frozen_a_init='random'"),
    ],
)
def test_target_parameters_refuses_what_it_cannot_do(options, message):
    with pytest.raises(ValueError, match=message):
        LoRAFAConfig(target_parameters=EXPERTS, **options)


def test_target_parameters_that_match_nothing_name_the_experts():
    with pytest.raises(ValueError, match=r"matched no parameter.*mlp\.experts\.gate_up_proj"):
        inject_adapters(tiny("qwen3_moe"), LoRAFAConfig(target_parameters=["experts.up_proj"]))
