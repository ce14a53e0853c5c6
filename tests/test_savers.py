"""Activation savers spec: exact loss and adapter gradients against the stock model, stock inference, less memory."""

from __future__ import annotations

import collections
import copy
import functools
import logging

import pytest
import torch
from conftest import METHODS, perturb_adapters, tiny_llama
from transformers import GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_lorafa import LoRAFAConfig, inject_adapters, saved_tensor_bytes
from hf_lorafa.training.activation_savers import apply_activation_savers

SAVERS = {
    "chunked_loss": {"recompute": False, "block_recompute": False},
    "recompute": {"chunked_loss": False, "block_recompute": False},
    "block_recompute": {"chunked_loss": False, "recompute": False},
    "all": {},
}
ALL = ["chunked_loss", "swiglu_recompute", "rmsnorm_recompute", "block_recompute"]


def adapted(base, method: str = "lorafa", dropout: float = 0.05):
    model = inject_adapters(copy.deepcopy(base), LoRAFAConfig(method=method, r=4, alpha=8, dropout=dropout))
    perturb_adapters(model)
    return model.train()


@functools.cache
def float64_adapted(method: str):
    """One adapted float64 model per method, shared by the saver cases (each test works on deep copies)."""
    return adapted(tiny_llama(dtype=torch.float64), method)


def batch(vocab: int = 256, seq: int = 12):
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt, as SFT collators produce
    return ids, labels


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks in both models
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training(stock, saved, ids, labels, **kwargs):
    for extra in ({}, {"num_items_in_batch": torch.tensor(9)}):  # Trainer's gradient-accumulation denominator
        expected, expected_grads = loss_and_grads(stock, ids, labels, **kwargs, **extra)
        got, grads = loss_and_grads(saved, ids, labels, **kwargs, **extra)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-6, atol=0)
        assert grads.keys() == expected_grads.keys() and grads
        for name, grad in grads.items():
            # The stock float64 model still computes its loss in fp32: allow fp32 rounding of the largest entry.
            reference = expected_grads[name]
            torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())


@pytest.mark.parametrize("savers", SAVERS)
@pytest.mark.parametrize("method", METHODS)
def test_loss_and_adapter_gradients_exact(method, savers):
    stock = copy.deepcopy(float64_adapted(method))
    saved = apply_activation_savers(copy.deepcopy(stock), loss_chunk_tokens=5, **SAVERS[savers])
    expected = {"chunked_loss": ALL[:1], "recompute": ALL[1:3], "block_recompute": ALL[3:], "all": ALL}[savers]
    assert saved.hf_lorafa_savers == expected
    ids, labels = batch()
    out, _ = loss_and_grads(saved, ids, labels)
    assert (out.logits is None) == ("chunked_loss" in expected)  # full logits are never built
    assert_same_training(stock, saved, ids, labels)


def test_tied_trainable_head_and_gradient_checkpointing():
    stock = copy.deepcopy(float64_adapted("lorafa"))
    stock.lm_head.weight = stock.model.embed_tokens.weight
    stock.lm_head.weight.requires_grad_(True)  # the head's gradient (summed with the embedding's) must be exact too
    stock.gradient_checkpointing_enable({"use_reentrant": False})
    saved = apply_activation_savers(copy.deepcopy(stock), loss_chunk_tokens=7)
    assert saved.lm_head.weight is saved.model.embed_tokens.weight and saved.hf_lorafa_savers == ALL
    assert_same_training(stock, saved, *batch())


def test_gemma_unit_offset_norm_and_gelu_are_exact():
    config = GemmaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    base = GemmaForCausalLM(config).double()
    with torch.no_grad():
        for module in base.modules():  # trained-looking (1 + weight) norms; Gemma initialises weight to 0
            if type(module).__name__ == "GemmaRMSNorm":
                module.weight.normal_(0, 0.3)
    stock = adapted(base)
    saved = apply_activation_savers(copy.deepcopy(stock), loss_chunk_tokens=5)
    assert saved.hf_lorafa_savers == ALL
    assert all(m.hf_lorafa_unit_offset for m in saved.modules() if hasattr(m, "hf_lorafa_unit_offset"))
    assert_same_training(stock, saved, *batch())


def test_inference_generation_and_evaluation_unchanged():
    stock = adapted(tiny_llama(), dropout=0.0).eval()
    saved = apply_activation_savers(copy.deepcopy(stock))
    ids, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(saved(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=0)
        evaluated, expected = saved(input_ids=ids, labels=labels), stock(input_ids=ids, labels=labels)
        torch.testing.assert_close(evaluated.logits, expected.logits, rtol=0, atol=0)  # eval: logits for metrics
        torch.testing.assert_close(evaluated.loss, expected.loss, rtol=0, atol=0)
    greedy = {"max_new_tokens": 6, "do_sample": False}
    assert torch.equal(saved.generate(ids, **greedy), stock.generate(ids, **greedy))
    assert saved.forward.__wrapped__ is type(stock).forward  # Trainer/generate introspect the stock signature
    forward = saved.forward
    assert apply_activation_savers(saved).hf_lorafa_savers == ALL and saved.forward is forward  # idempotent


def test_unsupported_architecture_left_unchanged_with_notice(caplog):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    forward = model.forward
    with caplog.at_level(logging.INFO, logger="hf_lorafa.training.activation_savers"):
        apply_activation_savers(model)
    assert model.hf_lorafa_savers == [] and model.forward == forward
    assert "chunked loss not applied" in caplog.text and "no SwiGLU MLP or RMSNorm" in caplog.text
    assert "no attention or MLP block" in caplog.text


def floor_model(base):
    model = copy.deepcopy(base).train()
    model.requires_grad_(False)
    model.enable_input_require_grads()
    return model


def retained(model, ids) -> int:
    nbytes, _ = saved_tensor_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)
    return nbytes


def test_saved_bytes_below_the_floor_with_32k_vocabulary():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(hidden=64, layers=2, vocab=32000)
    ids = torch.randint(0, 32000, (2, 128), generator=torch.Generator().manual_seed(0))
    floor = retained(floor_model(base), ids)
    ours = adapted(base, dropout=0.05)
    ours.enable_input_require_grads()
    saved = retained(apply_activation_savers(ours), ids)
    peft = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05,
                                                          target_modules="all-linear")).train()  # fmt: skip
    peft.enable_input_require_grads()
    peft_bytes = retained(peft, ids)
    print(f"32k vocab fp32: LoRA-FA+savers / floor = {saved / floor:.4f}; / PEFT LoRA = {saved / peft_bytes:.4f}")
    assert saved <= 0.6 * floor and saved <= 0.6 * peft_bytes


@pytest.mark.parametrize(
    "block_recompute, bound",
    [("all", 0.25), ("attention", 0.5), ("none", 0.75)],
    ids=["all blocks replayed (the trainer's default)", "attention replayed", "no block replayed"],
)
def test_savers_keep_at_most_half_the_floor_on_smollm2s_shape(block_recompute, bound):
    """SmolLM2-135M's own configuration (random weights), fp32, a batch of 2 × 256 tokens: the savers keep
    well under half of what the frozen stock model keeps for backward with every block replayed (the trainer's
    default), at most half with the attention blocks replayed; without it, the norms' and SwiGLU's recomputation and
    the chunked loss alone stay under three quarters."""
    from transformers import AutoConfig, LlamaForCausalLM

    from hf_lorafa.data.offline import smollm2_path

    config = AutoConfig.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
    floor = retained(floor_model(base), ids)
    ours = inject_adapters(copy.deepcopy(base), LoRAFAConfig(r=16, dropout=0.05)).train()
    saved = retained(apply_activation_savers(ours, block_recompute=block_recompute), ids)
    print(f"SmolLM2 shape, block_recompute={block_recompute}: savers / floor = {saved / floor:.3f}")
    assert saved <= bound * floor


def test_recomputation_alone_saves_per_layer_memory_in_bf16():
    base = tiny_llama(hidden=64, layers=2, vocab=256, dtype=torch.bfloat16)
    ids, _ = batch(seq=64)
    floor = retained(floor_model(base), ids)
    recomputed = retained(apply_activation_savers(floor_model(base), chunked_loss=False), ids)
    print(f"bf16, vocab 256: floor + recompute / floor = {recomputed / floor:.4f}")
    assert recomputed < 0.8 * floor


def test_exact_over_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.float32)
    stock = adapted(base)
    saved = apply_activation_savers(copy.deepcopy(stock), loss_chunk_tokens=5)
    assert saved.hf_lorafa_savers == ALL
    assert type(saved.model.layers[0].mlp.gate_proj.base_layer).__name__ == "Linear4bit"
    assert_same_training(stock, saved, *batch())


def test_block_recompute_keeps_only_the_blocks_inputs():
    """bf16, no chunked loss: each block keeps its input and r values per adapter, not q/k/v or gate/up."""
    base = tiny_llama(hidden=64, layers=2, vocab=256, dtype=torch.bfloat16)
    ids, _ = batch(seq=64)
    floor = retained(floor_model(base), ids)
    savers = {"chunked_loss": False}
    without = retained(apply_activation_savers(adapted(base), block_recompute=False, **savers), ids)
    with_blocks = retained(apply_activation_savers(adapted(base), **savers), ids)
    print(f"bf16: savers / floor = {without / floor:.3f}, with block recompute {with_blocks / floor:.3f}")
    assert with_blocks < 0.5 * floor and with_blocks < 0.6 * without


@pytest.mark.parametrize("checkpointing", ["block_recompute", "gradient_checkpointing"])
def test_a_replayed_adapter_call_draws_its_dropout_mask_once_in_backward(monkeypatch, checkpointing):
    """Forward draws each adapter's mask; a replay draws it again and that adapter's backward takes the replay's."""
    from hf_lorafa.tuners import layers

    draws = []
    real = layers.keep_mask
    monkeypatch.setattr(layers, "keep_mask", lambda *args, **kwargs: draws.append(args[2]) or real(*args, **kwargs))
    model = copy.deepcopy(float64_adapted("lorafa"))
    if checkpointing == "gradient_checkpointing":
        model.gradient_checkpointing_enable({"use_reentrant": True})  # the whole layer replays, in a nested backward
        model.enable_input_require_grads()
    else:
        model = apply_activation_savers(model, **SAVERS["block_recompute"])
    draws.clear()  # the savers' own probes
    torch.manual_seed(7)
    ids, labels = batch()
    model(input_ids=ids, labels=labels).loss.backward()
    adapters = [name for name, module in model.named_modules() if isinstance(module, layers.AdapterLayer)]
    per_seed = collections.Counter(draws)
    assert len(per_seed) == len(adapters)  # one seed per adapter call
    assert sorted(per_seed.values()) == [2] * len(adapters)  # forward, then the replay's or the backward's own draw
    assert not layers._REPLAYED_MASKS.masks  # every replayed mask was taken


def test_savers_survive_transformers_kernelization(tmp_path):
    """from_pretrained turns on transformers' hub kernels, which would put the stock forwards back at train()."""
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    stock = adapted(AutoModelForCausalLM.from_pretrained(tmp_path))
    saved = apply_activation_savers(adapted(AutoModelForCausalLM.from_pretrained(tmp_path)), loss_chunk_tokens=5)
    ids, labels = batch()
    before = retained(saved, ids)
    saved.eval()
    saved.train()
    assert saved.hf_lorafa_savers == ALL and retained(saved, ids) == before
    assert "forward" in saved.model.layers[0].input_layernorm.__dict__
    assert_same_training(stock, saved, ids, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_block_recompute_setting_trains_bit_identically(dtype):
    """Replayed MLP blocks run their class's forward (the SwiGLU saver's replay in backward would repeat the block's)
    and fp32 norms the stock ops (no fp32 copy to save): whichever blocks are replayed, the loss and every adapter
    gradient are the same bit for bit."""
    stock = adapted(tiny_llama(hidden=64, layers=2, vocab=256, dtype=dtype))
    results = {}
    for setting in ("none", "attention", "all"):
        model = apply_activation_savers(copy.deepcopy(stock), loss_chunk_tokens=5, block_recompute=setting)
        assert model.hf_lorafa_savers == (ALL if setting != "none" else ALL[:3])
        out, grads = loss_and_grads(model, *batch())
        results[setting] = out.loss, grads
    (loss, grads), others = results["none"], [results["attention"], results["all"]]
    assert grads and all(torch.equal(loss, other) for other, _ in others)
    assert all(torch.equal(grads[name], other[name]) for _, other in others for name in grads)
    mlp, norm = model.model.layers[0].mlp, model.model.norm  # the "all" model
    assert mlp.__dict__["hf_lorafa_block_forward"].__func__ is type(mlp).forward
    x = torch.randn(2, 64, dtype=dtype, requires_grad=True)
    replayed = {torch.float32: "MulBackward0", torch.bfloat16: "_RMSNormFunctionBackward"}[dtype]
    assert type(norm(x).grad_fn).__name__ == replayed
