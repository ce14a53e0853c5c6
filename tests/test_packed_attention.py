"""Packed attention spec: a flattened row attends one sequence at a time, as transformers' masked SDPA does."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from fixtures.families import tiny_model
from test_padding_free import ragged_dataset
from test_trainer import make_args
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_lorafa import LoRAFATrainer
from hf_lorafa.training import packed_attention
from hf_lorafa.training.padding_free import flatten_batch

LENGTHS = [5, 3, 7]


def packed_row(vocab: int = 256) -> dict:
    ids = torch.randint(1, vocab, (len(LENGTHS), max(LENGTHS)), generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1] * n + [0] * (max(LENGTHS) - n) for n in LENGTHS])
    flat = flatten_batch({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    del flat["labels"]
    return flat


@pytest.fixture
def sdpa_calls(monkeypatch):
    """The query lengths of every `F.scaled_dot_product_attention` call (each still runs)."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def counted(query, *args, **kwargs):
        calls.append(query.shape[2])
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counted)
    return calls


def run(model, flat: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits, the embeddings' gradient from all logits, and from the second sequence's logits only."""
    embeds = model.get_input_embeddings()(flat["input_ids"]).detach().requires_grad_(True)
    kwargs = {k: v for k, v in flat.items() if k != "input_ids"}
    logits = model(inputs_embeds=embeds, **kwargs).logits
    (whole,) = torch.autograd.grad(logits.float().square().sum(), embeds, retain_graph=True)
    second = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    (cross,) = torch.autograd.grad(logits[0, second].float().sum(), embeds)
    return logits.detach(), whole, cross


def llama(dtype: torch.dtype, kv_heads: int):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).eval()


CASES = {
    "fp32, grouped-query": dict(dtype=torch.float32, kv_heads=2),
    "fp32, multi-head": dict(dtype=torch.float32, kv_heads=4),
    "bf16 weights": dict(dtype=torch.bfloat16, kv_heads=2),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_packed_row_runs_one_causal_call_per_sequence_with_the_masked_result(case, sdpa_calls):
    model = llama(case["dtype"], case["kv_heads"])
    assert model.config._attn_implementation == "sdpa"
    flat = packed_row()
    expected = run(model, flat)
    stock_calls = list(sdpa_calls)
    assert stock_calls == [sum(LENGTHS)] * model.config.num_hidden_layers  # one masked call per layer
    sdpa_calls.clear()
    assert packed_attention.use_packed_attention(model)
    assert model.config._attn_implementation == "hf_lorafa_sdpa"
    got = run(model, flat)
    assert sdpa_calls == LENGTHS * model.config.num_hidden_layers  # each sequence alone, in every layer
    eps = torch.finfo(case["dtype"]).eps
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=8 * eps, atol=8 * eps * b.abs().max().item())
    assert got[2][0, : LENGTHS[0]].count_nonzero() == 0  # nothing reaches across sequences, exactly


def test_any_other_mask_goes_to_transformers_sdpa_unchanged():
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    q, k, v = (torch.randn(1, heads, 9, 16) for heads in (4, 2, 2))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4]])
    packed = torch.ones(9, 9, dtype=torch.bool).tril() & (torch.arange(9)[:, None] >= 4).eq(torch.arange(9) >= 4)
    padded = packed.clone()
    padded[:, 8] = False  # a padding key on top of the packing: not the packed mask
    for mask in (padded, torch.ones(9, 9, dtype=torch.bool).tril()):
        mask = mask[None, None]
        got = packed_attention.packed_sdpa_attention_forward(attention, q, k, v, mask, position_ids=positions)[0]
        want = sdpa_attention_forward(attention, q, k, v, mask, position_ids=positions)[0]
        assert torch.equal(got, want)
    assert packed_attention._sequence_lengths(packed[None, None], positions) == [4, 5]
    assert packed_attention._sequence_lengths(padded[None, None], positions) is None


def test_the_trainer_uses_it_with_padding_removal_and_not_otherwise(tmp_path, caplog):
    trainer = LoRAFATrainer(model=tiny_llama(), args=make_args(tmp_path / "a"), train_dataset=ragged_dataset())
    assert trainer.lorafa_padding_free and trainer.model.config._attn_implementation == "hf_lorafa_sdpa"
    off = LoRAFATrainer(model=tiny_llama(), args=make_args(tmp_path / "b", remove_padding=False))
    assert off.model.config._attn_implementation == "sdpa"
    with caplog.at_level(logging.INFO, logger="hf_lorafa.training.trainer"):
        opt = LoRAFATrainer(model=tiny_model("opt"), args=make_args(tmp_path / "c", lora_target_modules="q_proj"))
    assert not opt.lorafa_padding_free  # refused, so its attention is as it was
    assert opt.model.config._attn_implementation in ("sdpa", "eager")
    assert opt.model.config._attn_implementation != "hf_lorafa_sdpa"
