"""Each private coupling in `hf_lorafa.compat`, checked against the installed transformers/accelerate/bitsandbytes.

A failure here means an upstream release changed a detail hf-lorafa relies on: the test name says which.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

from hf_lorafa import compat
from hf_lorafa.training.activation_savers import apply_activation_savers
from hf_lorafa.training.chunked_loss import loss_only


def test_transformers_trains_a_quantized_model_once_adapters_are_marked():
    from transformers.trainer_utils import validate_quantization_for_training

    model = tiny_llama()
    model.is_quantized = True  # what transformers sets on a bitsandbytes-loaded model
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(model)
    compat.mark_adapters_attached(model)
    validate_quantization_for_training(model)


def test_accelerate_marks_an_evaluated_model_prepared_and_forgets_it():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = tiny_llama()
    accelerator.prepare_model(model, evaluation_mode=True)
    assert getattr(model, "_is_accelerate_prepared", False)  # the flag prepare_model then short-circuits on
    compat.forget_accelerate_prepared(model)
    assert not hasattr(model, "_is_accelerate_prepared")


def test_bitsandbytes_still_has_the_cpu_unpacking_function():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert callable(getattr(functional, "_convert_weight_packed_for_cpu_inverse", None))


def test_transformers_keeps_the_output_head_unquantized():
    assert compat.keys_to_not_convert(tiny_llama()) == ["lm_head"]


def test_replaced_forward_is_per_instance():
    first, second = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    compat.replace_forward(first, lambda self, x: x * 0)
    x = torch.ones(1, 3)
    assert torch.equal(first(x), torch.zeros(1, 3))
    assert not torch.equal(second(x), torch.zeros(1, 3)) and "forward" not in second.__dict__


def test_loss_only_drops_the_logits_inside_the_block_only(input_ids):
    model = apply_activation_savers(tiny_llama())
    other = apply_activation_savers(tiny_llama(seed=1))
    with torch.no_grad():
        stock = model(input_ids=input_ids, labels=input_ids)
        with loss_only(model):
            lean = model(input_ids=input_ids, labels=input_ids)
            assert other(input_ids=input_ids, labels=input_ids).logits is not None  # another model is unaffected
        with loss_only(model, enabled=False):
            assert model(input_ids=input_ids, labels=input_ids).logits is not None
        after = model(input_ids=input_ids, labels=input_ids)
    assert lean.logits is None and stock.logits is not None and after.logits is not None
    torch.testing.assert_close(lean.loss, stock.loss)


def test_torch_shows_the_innermost_saved_tensors_hooks():
    def pack(t):
        return t

    def unpack(t):
        return t

    assert compat.current_saved_tensors_hooks() is None
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        assert compat.current_saved_tensors_hooks() == (pack, unpack)


def test_torch_checkpoint_replay_shows_its_frame_and_what_it_keeps():
    found = []

    def region(x):
        found.append(compat.checkpoint_recompute())
        return (x.sin() * 2).cos()

    x = torch.randn(8, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(region, x, use_reentrant=False)
    y.sum().backward()
    forward, replay = found
    assert forward is None and compat.checkpoint_recompute() is None  # only a replay, only while it runs
    frame, gid = replay
    assert isinstance(frame.recomputed, dict) and gid is not None
    assert not frame.recomputed[gid]  # backward has used, and dropped, everything the replay kept
