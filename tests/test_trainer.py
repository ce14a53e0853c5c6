"""Trainer spec: the two-name swap, per-method training (TRL's snapshot pattern), memory logs, checkpoints, resume."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import METHODS, assert_only_adapter_trained, perturb_adapters, tiny_llama
from datasets import Dataset
from transformers import HfArgumentParser

from hf_lorafa import LoRAFAConfig, LoRAFATrainer, LoRAFATrainingArguments, inject_adapters, load_adapter, save_adapter
from hf_lorafa.tuners.lamda import LaMDALayer

REPO = Path(__file__).resolve().parent.parent


def token_dataset(n: int = 32, length: int = 16, vocab: int = 256) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (n, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids})


# A short, quiet, CPU run: what every trainer test starts from (TRL's tests reuse it).
QUICK_RUN = dict(
    max_steps=4,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    lora_r=4,
    seed=0,
    disable_tqdm=True,
    use_cpu=True,
)


def make_args(tmp_path, **overrides) -> LoRAFATrainingArguments:
    values = dict(output_dir=str(tmp_path / "out"), activation_savers=False, **QUICK_RUN)
    values.update(overrides)
    return LoRAFATrainingArguments(**values)


@pytest.mark.parametrize("method", METHODS)
def test_training_moves_adapter_not_base(method, tmp_path):
    model = tiny_llama()
    # B's first gradient is zero while LaMDA's S is 0, so keep B unfrozen here; the schedule has its own test.
    args = make_args(tmp_path, adapter_method=method, lora_dropout=0.05, lamda_freeze_fraction=1.0)
    trainer = LoRAFATrainer(model=model, args=args, train_dataset=token_dataset())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert_only_adapter_trained(model, before, a_trains=method == "lora")
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all({"memory/peak_mib", "trainable_params"} <= h.keys() for h in logged)
    assert any("memory/activation_mib" in h and h["memory/activation_mib"] > 0 for h in logged)


def test_lorafa_b_gets_its_learning_rate_multiplier(tmp_path):
    trainer = LoRAFATrainer(
        model=tiny_llama(), args=make_args(tmp_path, lorafa_lr_ratio=3.0), train_dataset=token_dataset()
    )
    optimizer = trainer.create_optimizer()
    by_lr = {group["lr"]: sum(p.numel() for p in group["params"]) for group in optimizer.param_groups}
    assert set(by_lr) == {1e-2 * 3.0}  # LoRA-FA trains B only, all at the boosted rate
    assert type(optimizer).__name__ == "AdamW"


@pytest.mark.parametrize(
    "options, scaled",
    [
        (dict(adapter_method="lorafa", lorafa_lr_ratio=4.0), {"lora_B": 4.0}),
        (dict(adapter_method="lamda", lamda_lr_ratio=2.0, lamda_s_lr_ratio=3.0), {"lora_S": 6.0, "lora_B": 2.0}),
    ],
    ids=["lorafa", "lamda"],
)
def test_logged_learning_rate_is_the_one_set_and_scaled_tensors_log_their_own(options, scaled, tmp_path):
    args = make_args(tmp_path, lr_scheduler_type="constant", max_steps=2, **options)
    trainer = LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=token_dataset())
    trainer.train()
    logged = [h for h in trainer.state.log_history if "learning_rate" in h]
    assert len(logged) == 2
    for entry in logged:
        assert entry["learning_rate"] == pytest.approx(1e-2)
        for tensor, ratio in scaled.items():
            assert entry[f"learning_rate_{tensor}"] == pytest.approx(1e-2 * ratio)


@pytest.mark.parametrize(
    "warmup, scheduler, warns",
    [
        (10, "linear", True),
        (4, "cosine", True),
        (0.999, "linear", True),
        (2, "linear", False),
        (10, "constant", False),
    ],
    ids=["longer", "as-long", "fraction-as-long", "shorter", "no-warmup-schedule"],
)
def test_a_warmup_as_long_as_the_run_warns_once_at_the_start(warmup, scheduler, warns, tmp_path, caplog):
    args = make_args(tmp_path, warmup_steps=warmup, lr_scheduler_type=scheduler)  # 4 steps at 1e-2
    trainer = LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=token_dataset())
    with caplog.at_level("WARNING", logger="hf_lorafa.training.callbacks"):
        trainer.train()
    warnings = [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()]
    assert len(warnings) == int(warns), warnings
    rates = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert (max(rates) < 1e-2) == warns  # the warning says what happened: the rate set was never reached
    if warns:
        assert (
            "never reaching `learning_rate`=0.01" in warnings[0]
            and "not shorter than the run (4 steps)" in warnings[0]
        )
        assert f"peaks at {max(rates):.3g}" in warnings[0]


def test_ordinary_script_with_two_names_changed_trains_and_saves(tmp_path):
    script = tmp_path / "user_script.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from conftest import tiny_llama
from test_trainer import token_dataset
from hf_lorafa import LoRAFATrainer as Trainer, LoRAFATrainingArguments as TrainingArguments

args = TrainingArguments(output_dir={str(tmp_path / "run")!r}, max_steps=2, per_device_train_batch_size=4,
                         report_to="none", lora_r=4, use_cpu=True, save_strategy="no")
trainer = Trainer(model=tiny_llama(), args=args, train_dataset=token_dataset())
trainer.train()
trainer.save_model()
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "hf_lorafa.json", "memory.json", "memory.png"} <= files
    assert "model.safetensors" not in files and "training_args.bin" not in files
    assert "Memory summary" in result.stdout


def test_training_prints_no_warning_a_user_cannot_act_on(tmp_path):
    """A plain run (no quantization, no GPU flags) with an evaluation, in a fresh process so that import-time and
    once-per-process warnings are printed again."""
    script = tmp_path / "quiet.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(REPO / "tests")!r})
from conftest import tiny_llama
from test_trainer import token_dataset
from hf_lorafa import LoRAFATrainer, LoRAFATrainingArguments

args = LoRAFATrainingArguments(output_dir={str(tmp_path / "run")!r}, max_steps=2, per_device_train_batch_size=4,
                               report_to="none", lora_r=4, save_strategy="no", disable_tqdm=True)
trainer = LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=token_dataset(), eval_dataset=token_dataset(8))
trainer.evaluate()
trainer.train()
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # bitsandbytes' CPU kernel fetch (its line and `kernels`'), torch's pin_memory, transformers' cache rename.
    unactionable = ("gemm_4bit_forward", "quantization-bitsandbytes", "'pin_memory' argument", "`past_key_values`")
    assert [line for line in unactionable if line in result.stderr + result.stdout] == []


@pytest.mark.parametrize("max_steps, plotted", [(4, [2, 4]), (3, [2, 3])])
def test_memory_plot_has_one_point_per_step(max_steps, plotted, tmp_path):
    """The trainer's end-of-training summary log comes at the last step: a point only where no step log was."""
    args = make_args(tmp_path, max_steps=max_steps, logging_steps=2)
    LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=token_dataset()).train()
    history = json.loads((Path(args.output_dir) / "memory.json").read_text())["history"]
    assert [h["step"] for h in history] == plotted


def test_tensorboard_sees_memory_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = make_args(tmp_path, report_to="tensorboard")
    LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=token_dataset()).train()
    events = list(Path(args.output_dir).rglob("events.out.tfevents.*"))
    assert events
    tags = set()
    for event in events:
        accumulator = EventAccumulator(str(event))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/memory/peak_mib", "train/memory/activation_mib", "train/trainable_params"} <= tags


def final_adapter(tmp_path, name: str, resume: bool) -> dict[str, torch.Tensor]:
    args = make_args(
        tmp_path / name,
        max_steps=6,
        save_strategy="steps",
        save_steps=3,
        lora_dropout=0.1,
        adapter_method="lamda",
        lamda_freeze_fraction=0.5,
    )
    trainer = LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=token_dataset())
    if resume:
        trainer.train()  # produces checkpoint-3 and checkpoint-6; resume from 3 with a brand-new trainer
        trainer = LoRAFATrainer(model=tiny_llama(), args=args, train_dataset=token_dataset())
        trainer.train(resume_from_checkpoint=str(Path(args.output_dir) / "checkpoint-3"))
    else:
        trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def test_resume_from_checkpoint_gives_the_same_adapter(tmp_path):
    straight = final_adapter(tmp_path, "straight", resume=False)
    resumed = final_adapter(tmp_path, "resumed", resume=True)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def test_checkpoints_hold_no_full_size_weights(tmp_path):
    from safetensors import safe_open

    args = make_args(tmp_path, save_strategy="steps", save_steps=2)
    model = tiny_llama()
    base_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    LoRAFATrainer(model=model, args=args, train_dataset=token_dataset()).train()
    checkpoints = sorted(Path(args.output_dir).glob("checkpoint-*"))
    assert len(checkpoints) == 2
    for checkpoint in checkpoints:
        assert not list(checkpoint.glob("model*.safetensors")) and not list(checkpoint.glob("*.bin"))
        for weights in checkpoint.glob("*.safetensors"):
            with safe_open(weights, "pt") as f:
                for key in f.keys():
                    assert "lora_" in key, f"{weights.name} holds base weight {key}"
                    assert f.get_slice(key).get_shape() not in base_shapes.values()


def test_lamda_schedule_drops_trainable_params_to_r_squared(tmp_path):
    model = tiny_llama()
    args = make_args(tmp_path, adapter_method="lamda", max_steps=6, lamda_freeze_fraction=0.5)
    trainer = LoRAFATrainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train()
    counts = [h["trainable_params"] for h in trainer.state.log_history if "trainable_params" in h]
    layers = [m for m in model.modules() if isinstance(m, LaMDALayer)]
    assert counts[0] > counts[-1] == len(layers) * 4 * 4


def test_arguments_round_trip_through_hfargumentparser(tmp_path):
    parser = HfArgumentParser(LoRAFATrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        args=[
            "--output_dir",
            str(tmp_path),
            "--adapter_method",
            "lamda++",
            "--lora_r",
            "8",
            "--load_in_4bit",
            "--lora_target_modules",
            "q_proj,v_proj",
            "--lamda_rank_budget",
            "64",
            "--log_memory",
            "false",
        ]
    )
    assert (args.adapter_method, args.lora_r, args.load_in_4bit, args.log_memory) == ("lamda++", 8, True, False)
    assert args.to_lorafa_config().target_modules == ["q_proj", "v_proj"]
    fields = {k: v for k, v in args.to_dict().items() if k.startswith(("lora_", "lamda_", "adapter_", "load_in"))}
    (tmp_path / "args.json").write_text(json.dumps({"output_dir": str(tmp_path), **fields}))
    (from_json,) = parser.parse_json_file(str(tmp_path / "args.json"))
    import yaml

    (tmp_path / "args.yaml").write_text(yaml.safe_dump({"output_dir": str(tmp_path), **fields}))
    (from_yaml,) = parser.parse_yaml_file(str(tmp_path / "args.yaml"))
    for parsed in (from_json, from_yaml):
        assert {k: getattr(parsed, k) for k in fields} == fields


def test_trainer_applies_activation_savers_and_records_them(tmp_path, caplog):
    import logging

    model = tiny_llama()
    with caplog.at_level(logging.INFO, logger="hf_lorafa.training.trainer"):
        trainer = LoRAFATrainer(
            model=model,
            args=make_args(tmp_path, activation_savers=True, block_recompute=True),
            train_dataset=token_dataset(),
        )
    assert set(model.hf_lorafa_savers) == {"chunked_loss", "swiglu_recompute", "rmsnorm_recompute", "block_recompute"}
    assert "activation savers active: chunked_loss" in caplog.text
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    trainer.save_model()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_B" in n)
    facts = json.loads((Path(trainer.args.output_dir) / "hf_lorafa.json").read_text())
    assert facts["activation_savers"] == model.hf_lorafa_savers


BLOCK_SETTINGS = {  # setting: (savers include block_recompute, attention replayed, MLP replayed)
    "default": ({}, (True, True, True)),
    "attention": ({"block_recompute": "attention"}, (True, True, False)),
    "True": ({"block_recompute": True}, (True, True, True)),
    "mlp": ({"block_recompute": "mlp"}, (True, False, True)),
    "none": ({"block_recompute": "none"}, (False, False, False)),
    "False": ({"block_recompute": False}, (False, False, False)),
    "all, under GC": ({"block_recompute": "all", "gradient_checkpointing": True}, (False, False, False)),
}


@pytest.mark.parametrize("setting, expected", BLOCK_SETTINGS.values(), ids=BLOCK_SETTINGS.keys())
def test_block_recompute_replays_every_block_by_default_and_nothing_under_gc(tmp_path, setting, expected):
    model = tiny_llama()
    LoRAFATrainer(
        model=model, args=make_args(tmp_path, activation_savers=True, **setting), train_dataset=token_dataset()
    )
    layer = model.model.layers[0]
    got = (
        "block_recompute" in model.hf_lorafa_savers,
        "hf_lorafa_norm" in layer.self_attn.__dict__,
        "hf_lorafa_norm" in layer.mlp.__dict__,
    )
    assert got == expected
    assert {"chunked_loss", "swiglu_recompute", "rmsnorm_recompute"} <= set(model.hf_lorafa_savers)


def test_block_recompute_names_its_values_when_given_another():
    with pytest.raises(ValueError, match="`block_recompute` must be one of 'none', 'all', 'attention', 'mlp'"):
        LoRAFATrainingArguments(output_dir="unused", block_recompute="attn")


def test_loss_only_evaluation_skips_the_logits_with_the_same_loss(tmp_path):
    calls = []
    losses = {}
    for savers in (False, True):
        model = tiny_llama()
        trainer = LoRAFATrainer(
            model=model, args=make_args(tmp_path, activation_savers=savers), eval_dataset=token_dataset(8)
        )
        model.lm_head.register_forward_hook(lambda *_, savers=savers: calls.append(savers))
        losses[savers] = trainer.evaluate()["eval_loss"]
    assert calls and set(calls) == {False}  # with the saver, the head never produced the (tokens × vocab) logits
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    # Metrics need logits: then they come back as usual.
    trainer.compute_metrics = lambda pred: {"logit_rows": float(len(pred.predictions))}
    assert trainer.evaluate()["eval_logit_rows"] == 8


@pytest.mark.parametrize("method", ["lorafa", "lora"])
def test_peft_model_continues_in_our_layers(method, tmp_path):
    """A script that kept `get_peft_model`: its LoRA continues as `adapter_method`, same outputs, PEFT-loadable."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_lorafa.tuners.layers import LoRAFALayer, LoRALayer

    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    perturb_adapters(peft_model)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = peft_model(input_ids=ids).logits.detach()
    args = make_args(tmp_path, adapter_method=method)
    trainer = LoRAFATrainer(model=peft_model, args=args, train_dataset=token_dataset())
    model = trainer.model
    layers = [m for m in model.modules() if isinstance(m, (LoRALayer, LoRAFALayer))]
    assert len(layers) == 4 and all(type(m) is (LoRAFALayer if method == "lorafa" else LoRALayer) for m in layers)
    assert not any("lora_A.default" in n for n, _ in model.named_parameters())  # no PEFT layer left inside
    torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert_only_adapter_trained(model, before, a_trains=method == "lora")
    trainer.save_model()
    model.eval()
    reloaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "out")).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_peft_model_that_cannot_continue_fails_at_once_with_the_fix(tmp_path):
    from peft import IA3Config, LoraConfig, get_peft_model

    ia3 = get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match=r"IA3.*Pass the base model instead \(`model.unload\(\)`"):
        LoRAFATrainer(model=ia3, args=make_args(tmp_path))
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"not as `adapter_method`='lamda'.*`model.unload\(\)`"):
        LoRAFATrainer(model=lora, args=make_args(tmp_path, adapter_method="lamda"))


def test_train_help_lists_our_flags_first_with_their_choices():
    result = subprocess.run(
        [sys.executable, "-m", "hf_lorafa.cli", "train", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    order = [
        "hf-lorafa: adapter, quantization and memory:",
        "--adapter_method {lora,lorafa,lamda,lamda++}",
        "--lamda_freeze_order {ascending,all}",
        "--bnb_4bit_quant_type {nf4,fp4}",
        "--hub_base_model_id",
        "model and data:",
        "--model_name_or_path",
        "training (transformers TrainingArguments):",
        "--learning_rate",
    ]
    assert text.startswith("usage: hf-lorafa train ")
    at = text.index("\n\n")  # after the usage line, each needle comes after the one before it
    for needle in order:
        at = text.find(needle, at)
        assert at != -1, f"{needle!r} missing or out of order"


def test_classification_head_includes_an_untrained_pooler(tmp_path):
    """`--task classification` trains BERT's pooler with the classifier (drug-review protocol 3), `score` elsewhere;
    the pooler trains whole (no adapter inside), is saved with the adapter and loads back in ours and in PEFT."""
    from peft import PeftModel
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    from hf_lorafa.cli.main_job import classification_head

    torch.manual_seed(0)
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).eval()
    base = copy.deepcopy(bert)
    assert classification_head(bert) == ["classifier", "pooler"]
    llama = LlamaForSequenceClassification(
        LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )
    assert classification_head(llama) == ["score"]
    model = inject_adapters(bert, LoRAFAConfig(method="lorafa", r=2, modules_to_save=classification_head(bert)))
    assert not hasattr(model.bert.pooler.dense, "lora_A")
    assert all(p.requires_grad for p in model.bert.pooler.parameters())
    with torch.no_grad():
        model.bert.pooler.dense.weight.add_(0.5)
        model.classifier.weight.add_(0.5)
        model.bert.encoder.layer[0].attention.self.query.lora_B.weight.fill_(0.1)
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = model(ids).logits
    save_adapter(model, tmp_path / "adapter")
    torch.testing.assert_close(load_adapter(copy.deepcopy(base), tmp_path / "adapter").eval()(ids).logits, expected)
    torch.testing.assert_close(PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(ids).logits, expected)


def test_a_head_tied_to_the_embeddings_trains_saves_and_loads_as_peft_does(tmp_path):
    """`lora_modules_to_save=lm_head` on a model with `tie_word_embeddings=True`: like PEFT's ModulesToSaveWrapper,
    the head trains as its own copy, the input embeddings stay the base's, and the saved adapter gives the trained
    model's logits through PEFT and through `load_adapter`."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    def tied_llama():
        config = copy.deepcopy(tiny_llama().config)
        config.tie_word_embeddings = True
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()

    model = tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.model.embed_tokens.weight.detach().clone()
    args = make_args(tmp_path, max_steps=2, lora_modules_to_save="lm_head")
    trainer = LoRAFATrainer(model=model, args=args, train_dataset=token_dataset())
    trainer.train()
    trainer.save_model()
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert not torch.equal(model.lm_head.weight, embeddings)
    ids = torch.tensor(token_dataset(2)["input_ids"])
    with torch.no_grad():
        trained = model.eval()(input_ids=ids).logits
        through_peft = PeftModel.from_pretrained(tied_llama(), args.output_dir).eval()(input_ids=ids).logits
        through_ours = load_adapter(tied_llama(), args.output_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(through_peft, trained)
    torch.testing.assert_close(through_ours, trained)


def test_memory_log_gives_the_largest_step_activations_of_its_interval():
    from hf_lorafa.memory.measure import saved_tensor_bytes
    from hf_lorafa.training.memory_logging import MemoryTracker

    model = tiny_llama()
    batches = [torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(n)) for n in (8, 24, 16)]
    alone = [saved_tensor_bytes(model, lambda ids=ids: model(input_ids=ids, labels=ids))[0] for ids in batches]
    assert alone[1] > max(alone[0], alone[2])  # the longest batch keeps the most
    tracker = MemoryTracker(model)
    for ids in batches:  # one interval of three steps, the largest in the middle
        tracker.sample_next_forward()
        model(input_ids=ids, labels=ids).loss.backward()
    entry = tracker.metrics(step=3, trainable=0)
    assert entry["memory/activation_mib"] == round(alone[1] / 2**20, 3)
    tracker.sample_next_forward()
    model(input_ids=batches[0], labels=batches[0]).loss.backward()
    assert tracker.metrics(step=4, trainable=0)["memory/activation_mib"] == round(alone[0] / 2**20, 3)
    assert "memory/activation_mib" not in tracker.metrics(step=5, trainable=0)  # no step sampled since
    assert tracker.summary()["activation_bytes"] == alone[1]  # the run's largest
    tracker.remove()
