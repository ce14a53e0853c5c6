"""Quantized bases: the adapters over real bitsandbytes 4-bit (NF4, FP4 + double quant) and 8-bit layers on CPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import perturb_adapters, tiny_llama
from torch import nn

from hf_lorafa import (
    LoRAFAConfig,
    init_frozen_a_from_data,
    inject_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    saved_tensor_bytes,
)
from hf_lorafa.data.base_model import load_base_model, quantize_model
from hf_lorafa.tuners.injection import adapter_layers
from hf_lorafa.tuners.quantization import (
    check_base_layer,
    check_quantization,
    dequantize_model,
    dequantize_weight,
    prepare_kbit_model,
)

bnb = pytest.importorskip("bitsandbytes")

KINDS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
    "int8": {"load_in_8bit": True},
}
# Relative error of the quantized path against the same model with dequantized (dense fp32) weights. 4-bit: CPU
# bitsandbytes multiplies by the dequantized weight in fp32, so only summation order differs. 8-bit: LLM.int8() also
# quantizes the activations row-wise to int8 (and fp16 on CPU), about 1% per product.
FORWARD_RTOL = {"nf4": 1e-4, "fp4": 1e-4, "int8": 0.05}
GRAD_RTOL = {"nf4": 1e-4, "fp4": 1e-4, "int8": 0.1}
EXPECTED_LAYER = {"nf4": "Linear4bit", "fp4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(hidden=64).save_pretrained(path)
    return path


def quantized(path, kind: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_base_model(path, **KINDS[kind])
    return prepare_kbit_model(model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def test_load_quantizes_linear_layers_but_not_the_head(saved_llama):
    for kind, expected in EXPECTED_LAYER.items():
        model = quantized(saved_llama, kind)
        assert type(model.model.layers[0].mlp.down_proj).__name__ == expected, kind
        assert type(model.lm_head) is nn.Linear, kind
        assert model.config.quantization_config.quant_method == "bitsandbytes"


def test_prepare_keeps_half_precision_weights_and_trains(tmp_path, input_ids):
    tiny_llama(hidden=64, dtype=torch.float16).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = prepare_kbit_model(load_base_model(tmp_path, load_in_4bit=True, dtype=torch.float16))
    # No fp32 copies of embeddings / norms / head (PEFT's cast): the fp16 head still gets fp16 hidden states.
    assert {p.dtype for n, p in model.named_parameters() if "embed" in n or "norm" in n or "lm_head" in n} == {
        torch.float16
    }
    model = inject_adapters(model, LoRAFAConfig(method="lorafa", r=4)).train()
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    assert out.logits.dtype == torch.float16 and torch.isfinite(out.loss)
    assert model.get_input_embeddings()(input_ids).requires_grad  # enable_input_require_grads
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_quantize_model_in_memory_matches_loading(saved_llama, input_ids):
    full = tiny_llama(hidden=64)
    model = prepare_kbit_model(quantize_model(full, load_in_4bit=True))
    assert type(model.model.layers[1].self_attn.v_proj).__name__ == "Linear4bit"
    assert type(model.lm_head) is nn.Linear and type(full.model.layers[1].self_attn.v_proj) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, quantized(saved_llama, "nf4")(input_ids).logits)
    kept = quantize_model(full, load_in_8bit=True, keep_modules=["down_proj"])
    assert type(kept.model.layers[0].mlp.down_proj) is nn.Linear and type(kept.lm_head) is nn.Linear
    assert type(kept.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method", ["lora", "lorafa", "lamda"])  # LaMDA++ is LaMDA's layer with other ranks
def test_forward_backward_match_dequantized_reference(method, kind, saved_llama, input_ids):
    model = inject_adapters(quantized(saved_llama, kind), LoRAFAConfig(method=method, r=4))
    perturb_adapters(model, scale=0.2)
    reference = dequantize_model(copy.deepcopy(model))
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in reference.modules())
    results = []
    for net in (model, reference):
        net.train()
        embeds = net.get_input_embeddings()(input_ids).detach().requires_grad_(True)
        out = net(inputs_embeds=embeds, labels=input_ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
        results.append((out.logits.detach(), embeds.grad, grads))
    (logits, dx, grads), (ref_logits, ref_dx, ref_grads) = results
    assert rel_err(logits, ref_logits) < FORWARD_RTOL[kind]
    assert rel_err(dx, ref_dx) < GRAD_RTOL[kind]  # dx = Wᵀg through the quantized base
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert rel_err(grad, ref_grads[name]) < GRAD_RTOL[kind], name


def test_dequantize_after_bitsandbytes_cpu_repacking(saved_llama, input_ids):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # A model loaded by transformers directly (not load_base_model): bitsandbytes may repack it.
        model = AutoModelForCausalLM.from_pretrained(
            saved_llama,
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
        )
    layer = model.model.layers[0].self_attn.q_proj
    if not layer.support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    before = dequantize_weight(layer)
    with torch.no_grad():
        model.eval()(input_ids)  # eval-mode CPU forward: bitsandbytes repacks, rounding the scales to bf16
    assert layer.weight.quant_state.packing_format_for_cpu
    packed = layer.weight.data.clone()
    torch.testing.assert_close(dequantize_weight(layer), before, rtol=8e-3, atol=0)  # bf16 scales: 2⁻⁸ relative
    assert torch.equal(layer.weight.data, packed) and layer.weight.quant_state.packing_format_for_cpu  # untouched


def test_load_base_model_never_repacks(saved_llama, input_ids):
    model = load_base_model(saved_llama, load_in_4bit=True)
    with_grad = model(input_ids).logits.detach()
    with torch.no_grad():
        without_grad = model.eval()(input_ids).logits  # the path our autograd function's forward takes
    assert not getattr(model.model.layers[0].self_attn.q_proj.weight.quant_state, "packing_format_for_cpu", False)
    torch.testing.assert_close(without_grad, with_grad, rtol=0, atol=0)


def bnb_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor that defines the quantized weights: packed data, 4-bit absmax, 8-bit row scales."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name] = module.weight.data.clone()
            state[name + ".absmax"] = module.weight.quant_state.absmax.clone()
        elif isinstance(module, bnb.nn.Linear8bitLt):
            state[name] = module.weight.data.clone()
    return state


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("method", ["lorafa", "lamda"])
def test_training_keeps_quantized_base_bit_identical(method, kind, saved_llama, input_ids):
    model = inject_adapters(quantized(saved_llama, kind), LoRAFAConfig(method=method, r=4, dropout=0.05))
    quantized_before = bnb_state(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model.train()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():  # an evaluation in between, as the Trainer's, must not repack the 4-bit weights
            model.eval()(input_ids)
    after = bnb_state(model)
    assert after.keys() == quantized_before.keys() and after
    for name, tensor in quantized_before.items():
        assert torch.equal(tensor, after[name]), f"quantized {name} changed"
    for name, param in model.named_parameters():
        if "lora_A" in name:
            assert torch.equal(param, before[name]), name
        elif "lora_B" in name or "lora_S" in name:
            assert not torch.equal(param, before[name]), name


def test_saved_bytes_of_4bit_lorafa_near_floor_and_below_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    # test_core's size: z (r values per token per layer) is ~1% of a hidden-256 block's activations.
    tiny_llama(hidden=256, vocab=1024).save_pretrained(tmp_path)
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    r, dropout = 8, 0.05

    def measure(model: nn.Module) -> int:
        model.train()
        nbytes, out = saved_tensor_bytes(model, lambda: model(input_ids=ids, labels=ids))
        out.loss.backward()  # the measured graph is a working training graph
        return nbytes

    floor = measure(quantized(tmp_path, "nf4").requires_grad_(False))  # input grads on: prepare_kbit_model
    ours = measure(inject_adapters(quantized(tmp_path, "nf4"), LoRAFAConfig(method="lorafa", r=r, dropout=dropout)))
    peft_config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear")
    peft_model = get_peft_model(quantized(tmp_path, "nf4"), peft_config)
    for name, param in peft_model.named_parameters():
        if "lora_A" in name:
            param.requires_grad_(False)
    peft = measure(peft_model)
    print(
        f"\n4-bit saved-for-backward: LoRA-FA/floor = {ours / floor:.4f}, LoRA-FA/PEFT(A frozen) = {ours / peft:.4f}"
    )
    assert ours <= 1.03 * floor
    assert ours < peft


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_adapter_reload_merge_save_and_requantize(kind, saved_llama, input_ids, tmp_path):
    config = LoRAFAConfig(method="lorafa", r=4, target_modules=["q_proj", "v_proj"])
    model = inject_adapters(quantized(saved_llama, kind), config)
    perturb_adapters(model, scale=0.2)
    save_adapter(model, tmp_path / "adapter")
    model = load_adapter(quantized(saved_llama, kind), tmp_path / "adapter")  # as `hf-lorafa merge` does
    with torch.no_grad():
        adapted = model.eval()(input_ids).logits
    merged = merge_adapters(dequantize_model(model))  # adapted and plain bnb layers alike become nn.Linear
    assert not adapter_layers(merged)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        merged_logits = merged(input_ids).logits
    # Merging only reorders fp32 sums for 4-bit; for 8-bit the merged model skips int8 activation rounding.
    assert rel_err(merged_logits, adapted) < FORWARD_RTOL[kind]
    merged.save_pretrained(tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()
    with torch.no_grad():
        reloaded = load_base_model(tmp_path / "merged")
        torch.testing.assert_close(reloaded(input_ids).logits, merged_logits)
        requantized = prepare_kbit_model(load_base_model(tmp_path / "merged", load_in_4bit=True))
        assert type(requantized.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        in_memory = prepare_kbit_model(quantize_model(merged, load_in_4bit=True))
        torch.testing.assert_close(requantized(input_ids).logits, in_memory(input_ids).logits)
        # 4-bit rounding of a random tiny model moves logits ~10-30%; unrelated logits would be ~140% apart.
        assert rel_err(requantized(input_ids).logits, merged_logits) < 0.5


def test_4bit_and_8bit_together_is_a_clear_error(saved_llama):
    with pytest.raises(ValueError, match="`load_in_4bit` and `load_in_8bit` are both True; pick one"):
        load_base_model(saved_llama, load_in_4bit=True, load_in_8bit=True)


def test_unsupported_quantized_kinds_are_clear_errors(saved_llama):
    dynamic = torch.ao.quantization.quantize_dynamic(tiny_llama(), {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(TypeError, match=r"layer 'model.layers.0.self_attn.q_proj' is a torch.ao.*load_in_4bit=True"):
        prepare_kbit_model(dynamic)

    gptq = tiny_llama()
    gptq.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(TypeError, match="quantized with 'gptq'.*load_base_model"):
        check_quantization(gptq)

    model = quantized(saved_llama, "nf4")
    model.model.layers[0].mlp.up_proj = bnb.nn.OutlierAwareLinear(64, 128, bias=False)
    check_base_layer("model.layers.0.self_attn.q_proj", model.model.layers[0].self_attn.q_proj)
    with pytest.raises(TypeError, match=r"layer 'up' is a bitsandbytes.*OutlierAwareLinear.*`target_modules`"):
        check_base_layer("up", model.model.layers[0].mlp.up_proj)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_from_the_gradient_over_a_quantized_base(kind, saved_llama, input_ids):
    model = inject_adapters(quantized(saved_llama, kind), LoRAFAConfig(method="lorafa", r=4))
    dense = dequantize_model(copy.deepcopy(model))  # the same weights, dense fp32: the reference
    quantized_before = bnb_state(model)
    data = [dict(input_ids=input_ids, labels=input_ids)]
    for m in (model, dense):
        init_frozen_a_from_data(m, data)
    after = bnb_state(model)
    assert after and all(torch.equal(t, after[n]) for n, t in quantized_before.items())  # the base is untouched
    reference = {n: layer.lora_A.weight.double() for n, layer in adapter_layers(dense).items()}
    for name, layer in adapter_layers(model).items():
        # The row spaces agree up to the quantized kernels' rounding (principal-angle cosines > 0.999 here).
        q, q_ref = (torch.linalg.qr(a.t())[0] for a in (layer.lora_A.weight.double(), reference[name]))
        assert torch.linalg.svdvals(q_ref.t() @ q).min() > 0.99, name
