"""Padding-free spec: the flattened batch, its exact loss and gradients, the probe, the cost rule, the trainer path."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import perturb_adapters, tiny_llama
from datasets import Dataset
from fixtures.families import tiny_model
from test_trainer import make_args

from hf_lorafa import LoRAFAConfig, LoRAFATrainer, inject_adapters
from hf_lorafa.training.activation_savers import apply_activation_savers
from hf_lorafa.training.padding_free import flatten_batch, flattening_pays, padding_free_refusal, token_layout
from hf_lorafa.tuners.layers import dropout_follows_tokens

IDS = torch.tensor([[11, 12, 13, 14], [21, 22, 0, 0], [31, 32, 33, 0]])
MASK = (IDS != 0).long()
LABELS = torch.tensor([[11, -100, 13, 14], [21, 22, -100, -100], [31, 32, 33, -100]])  # -100 inside row 0 kept


def padded(ids=IDS, mask=MASK, labels=LABELS, **extra):
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, **extra}


def test_flatten_batch_puts_the_rows_end_to_end_without_padding():
    flat = flatten_batch(padded())
    assert set(flat) == {"input_ids", "position_ids", "labels", "use_cache"} and flat["use_cache"] is False
    assert flat["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 31, 32, 33]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    assert flat["labels"].tolist() == [[-100, -100, 13, 14, -100, 22, -100, 32, 33]]
    assert LABELS[0, 0] == 11  # the caller's labels are left as they were


@pytest.mark.parametrize(
    "batch",
    [
        padded(ids=IDS.flip(1), mask=MASK.flip(1), labels=LABELS.flip(1)),  # left padding
        padded(token_type_ids=torch.zeros_like(IDS)),  # a key the flattened row would not carry
        padded(position_ids=torch.arange(4).expand(3, 4)),
        {"input_ids": IDS, "attention_mask": MASK},  # no labels
        padded(mask=torch.ones_like(MASK), labels=IDS),  # no padding to remove
        padded(ids=IDS[:1], mask=MASK[:1], labels=LABELS[:1]),  # one row, no padding
        padded(mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]])),  # an empty row
        padded(mask=torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 0]])),  # a hole inside a row
        padded(labels=IDS),  # padding positions are targets of the padded loss
    ],
    ids=["left-padded", "extra-key", "position-ids", "no-labels", "no-padding", "one-row", "empty-row", "hole",
         "padding-targets"],
)  # fmt: skip
def test_flatten_batch_leaves_other_batches_alone(batch):
    assert flatten_batch(batch) is None
    assert token_layout(batch, tiny_llama().config) is None  # their dropout is drawn as it always was


def test_token_layout_is_the_real_tokens_of_a_decoder_only_models_batch():
    assert torch.equal(token_layout(padded(), tiny_llama().config), MASK.bool())
    assert token_layout(padded(), tiny_model("t5").config) is None  # an encoder-decoder's decoder has other tokens


def variable_batch(vocab: int = 256):
    """Three right-padded rows of 12, 7 and 4 tokens, a prompt left out of row 0's loss."""
    lengths = [12, 7, 4]
    ids = torch.randint(3, vocab, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(12) < torch.tensor(lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :5] = -100
    return padded(ids=ids * mask, mask=mask, labels=labels)


def loss_and_grads(model, batch, num_items_in_batch):
    model.zero_grad()
    kwargs = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("savers", [False, True], ids=["stock", "savers"])
@pytest.mark.parametrize("method", ["lorafa", "lora"])
def test_one_step_on_the_flattened_batch_has_the_padded_loss_and_gradients(method, savers):
    model = inject_adapters(tiny_llama(), LoRAFAConfig(method=method, r=4, alpha=8))
    perturb_adapters(model)
    if savers:
        apply_activation_savers(model)
    model.train()
    batch = variable_batch()
    # What Trainer passes: the targets of the padded labels, counted after the causal shift (or None: the mean).
    for count in (batch["labels"][:, 1:].ne(-100).sum(), None):
        loss, grads = loss_and_grads(model, batch, count)
        flat_loss, flat_grads = loss_and_grads(model, flatten_batch(batch), count)
        torch.testing.assert_close(flat_loss, loss, rtol=1e-5, atol=0)
        assert grads.keys() == flat_grads.keys() and any("lora_B" in n for n in grads)
        for name, grad in grads.items():
            torch.testing.assert_close(flat_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("savers", [False, True], ids=["stock", "savers"])
@pytest.mark.parametrize("method", ["lorafa", "lamda"])
def test_a_padded_batch_under_its_token_layout_draws_the_flattened_batchs_dropout(method, savers):
    """With dropout, the padded batch under `dropout_follows_tokens` trains as its flattened form does (the same
    masks, token for token); without it, the masks are drawn for the padded shape and differ."""
    model = inject_adapters(tiny_llama(), LoRAFAConfig(method=method, r=4, alpha=8, dropout=0.3))
    perturb_adapters(model)
    if savers:
        apply_activation_savers(model)  # block recompute: masks drawn again in backward's replays, and handed over
    model.train()
    batch = variable_batch()
    count = batch["labels"][:, 1:].ne(-100).sum()
    runs = {}
    for name, layout in (
        ("flat", None),
        ("padded, token layout", token_layout(batch, model.config)),
        ("padded", None),
    ):
        torch.manual_seed(3)
        with dropout_follows_tokens(layout):
            runs[name] = loss_and_grads(model, flatten_batch(batch) if name == "flat" else batch, count)
    (flat_loss, flat_grads), (loss, grads), (plain_loss, _) = runs.values()
    torch.testing.assert_close(loss, flat_loss, rtol=1e-5, atol=0)
    assert grads.keys() == flat_grads.keys() and any("lora_B" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, flat_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert abs(plain_loss - flat_loss) > 1e-4  # the padded shape's own masks


def test_one_step_under_bf16_autocast_matches_to_bf16_rounding():
    model = inject_adapters(tiny_llama(), LoRAFAConfig(method="lorafa", r=4, alpha=8)).train()
    perturb_adapters(model)
    batch = variable_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, batch, None)
        flat_loss, flat_grads = loss_and_grads(model, flatten_batch(batch), None)
    torch.testing.assert_close(flat_loss, loss, rtol=2e-2, atol=0)
    for name, grad in grads.items():
        assert (flat_grads[name] - grad).norm() <= 5e-2 * grad.norm(), name


@pytest.mark.parametrize(
    "family, reason",
    [
        ("llama", None),
        ("qwen3_moe", None),
        ("gpt2", None),  # learned absolute positions, taken from position_ids
        ("opt", "reaches across"),  # builds its mask from the attention mask alone
        ("bloom", "no `position_ids`"),  # ALiBi, positions from the attention mask
        ("t5", "encoder-decoder"),
        ("bart", "encoder-decoder"),
    ],
)
def test_probe_accepts_models_that_keep_packed_sequences_apart(family, reason):
    model = tiny_model(family)
    got = padding_free_refusal(model)
    assert got is None if reason is None else reason in got, got


def test_probe_runs_without_dropout_and_leaves_the_model_as_it_was():
    model = inject_adapters(tiny_model("llama"), LoRAFAConfig(method="lorafa", r=4, dropout=0.5)).train()
    perturb_adapters(model, scale=0.5)  # adapters whose dropout changes the outputs
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.5
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    assert padding_free_refusal(model) is None
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and all(p.grad is None for p in model.parameters())


LLAMA = tiny_llama().config  # hidden 64, 2 layers, vocab 256


@pytest.mark.parametrize(
    "lengths, width, attention, pays",
    [
        ([16, 5, 9, 4], 16, "sdpa", True),  # half padding
        ([16, 16], 16, "sdpa", False),  # nothing to remove: attention over the longer row costs more
        ([16, 16], 16, "flash_attention_2", False),  # varlen: the same operations, so no change
        ([1000, 990], 1000, "sdpa", False),  # a little padding, long rows: the T² attention dominates
        ([1000, 990], 1000, "flash_attention_2", True),
    ],
)
def test_cost_rule_flattens_only_when_it_saves_operations(lengths, width, attention, pays):
    config = copy.deepcopy(LLAMA)
    config._attn_implementation = attention
    assert flattening_pays(config, lengths, width) is pays


def ragged_dataset(n: int = 16, vocab: int = 256) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 17, (n,), generator=generator).tolist()
    ids = [torch.randint(3, vocab, (k,), generator=generator).tolist() for k in lengths]
    return Dataset.from_dict({"input_ids": ids})


def pad_right(rows: list[dict]) -> dict[str, torch.Tensor]:
    """A padding collator: rows right-padded to the longest, padding left out of the loss."""
    width = max(len(row["input_ids"]) for row in rows)
    ids = torch.tensor([row["input_ids"] + [0] * (width - len(row["input_ids"])) for row in rows])
    mask = torch.tensor([[1] * len(row["input_ids"]) + [0] * (width - len(row["input_ids"])) for row in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("savers", [True, False], ids=["savers", "stock"])
def test_trainer_trains_on_flattened_batches_with_the_padded_losses(savers, dropout, tmp_path, caplog):
    """The same losses and adapter either way; with dropout, the padded batches draw their flattened form's masks."""
    runs = {}
    for remove in (False, True):
        model = tiny_llama()
        args = make_args(
            tmp_path / str(remove), activation_savers=savers, remove_padding=remove, max_steps=3, lora_dropout=dropout
        )
        with caplog.at_level(logging.INFO, logger="hf_lorafa.training.trainer"):
            trainer = LoRAFATrainer(
                model=model, args=args, data_collator=pad_right, train_dataset=ragged_dataset(),
                eval_dataset=ragged_dataset(8),
            )  # fmt: skip
        seen = []  # (training?, input_ids' shape, position ids given?) of every forward

        def record(module, _args, kwargs, seen=seen):
            seen.append((module.training, tuple(kwargs["input_ids"].shape), "position_ids" in kwargs))

        model.register_forward_pre_hook(record, with_kwargs=True)
        trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"]
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        runs[remove] = losses, eval_loss, seen, {n: p.detach() for n, p in model.named_parameters() if "lora_B" in n}
    assert "training batches without their padding (remove_padding)" in caplog.text
    assert "training batches keep their padding: remove_padding=False" in caplog.text
    (losses, eval_loss, seen, adapter), (flat_losses, flat_eval, flat_seen, flat_adapter) = runs[False], runs[True]
    assert len(losses) == 3 and losses == pytest.approx(flat_losses, rel=1e-5)
    assert flat_eval == pytest.approx(eval_loss, rel=1e-5)
    for name, value in adapter.items():  # Adam's first steps move each weight by about lr whatever its gradient's
        # size, so a gradient near zero that rounds differently (here lr = 1e-2) moves its weight by up to about 1e-5;
        # with dropout such gradients are more common, and over 3 steps one weight moved by up to about 2e-5
        torch.testing.assert_close(flat_adapter[name], value, rtol=1e-4, atol=3e-5 if dropout else 1e-5)
    assert not any(flat for _, _, flat in seen)
    trained = [shape for training, shape, flat in flat_seen if training and flat]
    assert len(trained) == 3 and all(shape[0] == 1 for shape in trained)  # every step on one row of tokens
    evaluated = [(shape[0], flat) for training, shape, flat in flat_seen if not training]
    assert evaluated == [(8, False)]  # evaluation: the padded batch of 8 rows


def test_trainer_keeps_the_padding_of_a_model_that_would_mix_sequences(tmp_path, caplog):
    model = tiny_model("opt")
    with caplog.at_level(logging.INFO, logger="hf_lorafa.training.trainer"):
        trainer = LoRAFATrainer(model=model, args=make_args(tmp_path, lora_target_modules="q_proj,v_proj"))
    assert not trainer.lorafa_padding_free
    assert "training batches keep their padding: its attention reaches across" in caplog.text


def test_trl_sft_batches_train_without_padding_with_the_same_losses_and_metrics(tmp_path):
    """TRL's collator pads prompt-completion rows to `{input_ids, attention_mask, labels}`: flattened the same way."""
    pytest.importorskip("trl")
    from test_trl import pairs, sft_args
    from transformers import AutoTokenizer

    from hf_lorafa.data.offline import smollm2_path
    from hf_lorafa.trl import LoRAFASFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    runs = {}
    for remove in (False, True):
        model = tiny_llama(vocab=len(tokenizer))
        args = sft_args(tmp_path / str(remove), remove_padding=remove, bf16=False, max_steps=3)
        trainer = LoRAFASFTTrainer(model=model, args=args, train_dataset=pairs(), processing_class=tokenizer)
        shapes = []
        model.register_forward_pre_hook(
            lambda _m, _a, kw, shapes=shapes: shapes.append(kw["input_ids"].shape[0]), with_kwargs=True
        )
        trainer.train()
        logged = [h for h in trainer.state.log_history if "loss" in h]
        runs[remove] = shapes, [h[k] for h in logged for k in ("loss", "mean_token_accuracy", "num_tokens")]
    (shapes, logged), (flat_shapes, flat_logged) = runs[False], runs[True]
    assert 1 not in shapes and 1 in flat_shapes
    assert len(logged) == 3 * 3 and flat_logged == pytest.approx(logged, rel=1e-5)
