"""TRL spec: `LoRAFASFTTrainer` is TRL's real `SFTTrainer` with hf-lorafa's adapters, schedule, memory and saving.

The table runs every method over TRL's dataset paths (prompt-completion with and without completion-only loss,
packing off and on) at TRL's own defaults, bf16 autocast included.
"""

from __future__ import annotations

import pytest
import torch
from conftest import METHODS, assert_only_adapter_trained, tiny_llama
from datasets import Dataset
from safetensors.torch import load_file
from test_trainer import QUICK_RUN
from transformers import AutoTokenizer, TrainerCallback, TrainingArguments

from hf_lorafa.data.offline import smollm2_path
from hf_lorafa.tuners.lamda import LaMDALayer

trl = pytest.importorskip("trl")
from hf_lorafa.trl import LoRAFASFTConfig, LoRAFASFTTrainer  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_path())


def pairs(n: int = 32) -> Dataset:
    return Dataset.from_list([{"prompt": f"What is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(n)])


def sft_args(tmp_path, **overrides) -> LoRAFASFTConfig:
    values = dict(output_dir=str(tmp_path / "out"), max_length=64, **QUICK_RUN)
    values.update(overrides)
    return LoRAFASFTConfig(**values)


def sft(tokenizer, args, model=None, dataset=None) -> LoRAFASFTTrainer:
    model = model if model is not None else tiny_llama(vocab=len(tokenizer))
    return LoRAFASFTTrainer(model=model, args=args, train_dataset=dataset or pairs(), processing_class=tokenizer)


@pytest.mark.parametrize("packing", [False, True], ids=["packing-off", "packing-on"])
@pytest.mark.parametrize("completion_only", [True, False], ids=["completion-only", "full-sequence"])
@pytest.mark.parametrize("method", METHODS)
def test_sft_trains_the_adapter_with_our_memory_logs(method, completion_only, packing, tokenizer, tmp_path):
    # B is kept unfrozen (as in test_trainer) so the snapshot sees it move; the schedule has its own test below.
    options = dict(packing=packing, completion_only_loss=completion_only, lamda_freeze_fraction=1.0)
    args = sft_args(tmp_path, adapter_method=method, **options)
    assert args.bf16  # TRL's default on every device: bf16 autocast over fp32 weights here
    trainer = sft(tokenizer, args)
    model = trainer.model
    # The prompt tokens (most of each row) are left out of the loss exactly when completion-only loss is on;
    # otherwise only padding and, packed, each sequence's first token are.
    batch = next(iter(trainer.get_train_dataloader()))
    real = batch.get("attention_mask", torch.ones_like(batch["labels"])) == 1
    masked = ((batch["labels"] == -100) & real).sum() / real.sum()
    assert (masked > 0.4) == completion_only, masked
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert_only_adapter_trained(model, before, a_trains=method == "lora")
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"memory/peak_mib", "trainable_params", "mean_token_accuracy"} <= h.keys() for h in logged)
    assert any(h.get("memory/activation_mib", 0) > 0 for h in logged)
    assert "chunked_loss" not in model.hf_lorafa_savers  # TRL's fused LM head computes the loss instead


@pytest.mark.parametrize("method", ["lamda", "lamda++"])
def test_sft_runs_lamdas_schedule_to_r_squared_per_layer(method, tokenizer, tmp_path):
    trainer = sft(tokenizer, sft_args(tmp_path, adapter_method=method, lamda_freeze_fraction=0.5))
    trainer.train()
    layers = [m for m in trainer.model.modules() if isinstance(m, LaMDALayer)]
    assert layers and not any(layer.lora_B.weight.requires_grad for layer in layers)
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    assert trained == sum(layer.r**2 for layer in layers)


@pytest.mark.parametrize("frozen_a", ["random", "gradient"])
def test_sft_saves_a_peft_adapter_with_the_same_logits(frozen_a, tokenizer, tmp_path):
    from peft import PeftModel

    trainer = sft(tokenizer, sft_args(tmp_path, adapter_method="lamda", bf16=False, frozen_a_init=frozen_a))
    trainer.init_frozen_a()  # what train() does first; SFTTrainer's token count and metrics leave it out
    assert trainer._total_train_tokens == 0 and not any(trainer._metrics[mode] for mode in ("train", "eval"))
    trainer.train()
    # A from the gradient is set by SFTTrainer's own loss over its own first batches, once, before the first step.
    assert getattr(trainer.model, "hf_lorafa_a_batches", 0) == (4 if frozen_a == "gradient" else 0)
    trainer.save_model()
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "hf_lorafa.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    ids = torch.randint(0, len(tokenizer), (2, 10), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model(input_ids=ids).logits
        theirs = PeftModel.from_pretrained(tiny_llama(vocab=len(tokenizer)), str(out)).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


class StopAfter(TrainerCallback):
    """Stops the run after `step` (as a preemption would), leaving max_steps and so every schedule unchanged."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


@pytest.mark.parametrize("method", ["lorafa", "lamda"])
def test_sft_resume_continues_exactly(method, tokenizer, tmp_path):
    def run(folder, stop=None, resume=None):
        args = sft_args(folder, adapter_method=method, lamda_freeze_fraction=0.5, save_strategy="steps", save_steps=2)
        trainer = sft(tokenizer, args)
        if stop is not None:
            trainer.add_callback(StopAfter(stop))
        trainer.train(resume_from_checkpoint=resume)

    run(tmp_path / "full")
    run(tmp_path / "cut", stop=2)
    assert not (tmp_path / "cut" / "out" / "checkpoint-4").exists()
    run(tmp_path / "cut", resume=str(tmp_path / "cut" / "out" / "checkpoint-2"))
    full = load_file(tmp_path / "full" / "out" / "checkpoint-4" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "cut" / "out" / "checkpoint-4" / "adapter_model.safetensors")
    assert full.keys() == resumed.keys()
    for key in full:
        torch.testing.assert_close(resumed[key], full[key], rtol=0, atol=0)


def test_sft_refuses_plain_config_and_peft_config(tokenizer, tmp_path):
    from peft import LoraConfig

    plain = trl.SFTConfig(output_dir=str(tmp_path / "plain"), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="`args` is a SFTConfig; LoRAFASFTTrainer needs LoRAFASFTConfig"):
        sft(tokenizer, plain)
    with pytest.raises(ValueError, match="`peft_config` is not used.*`adapter_method`"):
        LoRAFASFTTrainer(
            model=tiny_llama(vocab=len(tokenizer)),
            args=sft_args(tmp_path),
            train_dataset=pairs(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4),
        )
    with pytest.raises(TypeError, match="LoRAFATrainingArguments"):
        from hf_lorafa import LoRAFATrainer

        LoRAFATrainer(model=tiny_llama(), args=TrainingArguments(output_dir=str(tmp_path / "t"), use_cpu=True))


def test_sft_qlora_from_a_model_folder(tokenizer, tmp_path):
    """TRL's QLoRA path: a folder name as `model`, `load_in_4bit`, TRL casting the trained factors to bf16."""
    pytest.importorskip("bitsandbytes")
    base = tmp_path / "base"
    tiny_llama(vocab=len(tokenizer)).save_pretrained(base)
    trainer = sft(tokenizer, sft_args(tmp_path, load_in_4bit=True), model=str(base))
    model = trainer.model
    assert model.is_loaded_in_4bit and {p.dtype for p in model.parameters() if p.requires_grad} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    trainer.train()
    trainer.save_model()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_A" in n)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
