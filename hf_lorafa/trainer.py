"""`LoRAFATrainer`: a `Trainer` that injects adapters, trains them with the least memory and saves only them.

Overrides (each short): `__init__` (quantize if asked, inject, activation savers), `create_optimizer` (LoRA-FA's
B learning-rate multiplier as a param group of whatever `args.optim` builds), `log` (memory figures, so every
reporting integration sees them), `_save` (adapter only), `_load_from_checkpoint` / `_load_best_model` (adapter
only), `create_model_card` and `push_to_hub` (our card, adapter upload). LaMDA's freezing schedule and the
activation-byte sampling are callbacks on step boundaries.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from .arguments import LoRAFATrainingArguments
from .callbacks import TRAINING_STATE_FILE, LaMDAScheduleCallback, MemoryCallback, complete_checkpoints
from .injection import adapter_layers, count_parameters, has_adapters, inject_adapters
from .memory_log import MemoryTracker
from .optim import boosted_lr, lorafa_param_groups
from .run_facts import is_quantized, run_facts
from .saving import atomic_write, save_adapter

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


class LoRAFATrainer(Trainer):
    """
    [`~transformers.Trainer`] for hf-lorafa adapters: pass [`LoRAFATrainingArguments`] instead of
    `TrainingArguments` and everything else in your script stays the same.

    The model may come with adapters already (from [`inject_adapters`] or [`load_adapter`]); otherwise they are
    injected from the arguments (after quantizing the base if `load_in_4bit` / `load_in_8bit`).
    `save_model()` writes only the adapter (PEFT format + `hf_lorafa.json`) and the model card.

    Example:

    ```python
    >>> from hf_lorafa import LoRAFATrainer, LoRAFATrainingArguments
    >>> args = LoRAFATrainingArguments(output_dir="out", adapter_method="lorafa", lora_r=16)
    >>> trainer = LoRAFATrainer(model=model, args=args, train_dataset=train_ds)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    def __init__(self, model: torch.nn.Module | None = None, args: LoRAFATrainingArguments | None = None, *a, **kw):
        if model is None:
            raise ValueError("`model` is required: LoRAFATrainer injects adapters into a model you pass in.")
        if args is None:
            args = LoRAFATrainingArguments(output_dir="trainer_output")
        if not isinstance(args, LoRAFATrainingArguments):
            raise TypeError(
                f"`args` is a {type(args).__name__}; LoRAFATrainer needs LoRAFATrainingArguments. Replace "
                "`TrainingArguments(...)` by `LoRAFATrainingArguments(...)` (same fields, plus the adapter ones)."
            )
        if (args.load_in_4bit or args.load_in_8bit) and not is_quantized(model):
            from .loading import quantize_model

            model = quantize_model(
                model,
                load_in_4bit=args.load_in_4bit,
                load_in_8bit=args.load_in_8bit,
                bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            )
        if not has_adapters(model):
            inject_adapters(model, args.to_lorafa_config())
        if is_quantized(model):
            from .bnb import prepare_kbit_model

            prepare_kbit_model(model)
            # transformers refuses to train "purely quantized" models; ours carries trainable adapters.
            model._hf_peft_config_loaded = True
        if args.activation_savers:
            from .savers import apply_activation_savers

            apply_activation_savers(model)
        if args.gradient_checkpointing and not args.gradient_checkpointing_kwargs:
            args.gradient_checkpointing_kwargs = {"use_reentrant": False}
        super().__init__(model, args, *a, **kw)
        self.results: dict[str, float] = {}
        # Extra facts for hf_lorafa.json and the card that only the caller knows (e.g. {"dataset": "chatterbot"}).
        self.run_info: dict[str, Any] = {}
        self.memory = MemoryTracker(model, sample_every=args.logging_steps) if args.log_memory else None
        if self.memory is not None:
            self.add_callback(MemoryCallback(self.memory))
        self.add_callback(LaMDAScheduleCallback())
        savers = getattr(model, "hf_lorafa_savers", None)
        if savers:
            logger.info("hf-lorafa activation savers active: %s", ", ".join(savers))

    @property
    def lorafa_config(self):
        return self.accelerator.unwrap_model(self.model).hf_lorafa_config

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, resuming only from checkpoints whose save completed (a kill mid-save leaves a partial
        `checkpoint-N` behind; the previous complete one is used instead)."""
        if resume_from_checkpoint is True:
            complete = complete_checkpoints(self.args.output_dir)
            if not complete:
                raise ValueError(
                    f"`resume_from_checkpoint`=True but {self.args.output_dir!r} has no complete checkpoint-N folder; "
                    "train from scratch (drop the flag) or point it at a checkpoint folder."
                )
            resume_from_checkpoint = str(complete[-1])
        elif resume_from_checkpoint and Path(resume_from_checkpoint) not in complete_checkpoints(
            Path(resume_from_checkpoint).parent
        ):
            good = complete_checkpoints(Path(resume_from_checkpoint).parent)
            raise ValueError(
                f"`resume_from_checkpoint`={str(resume_from_checkpoint)!r} is not a complete checkpoint (missing, or "
                f"its save was interrupted); resume from {str(good[-1]) if good else 'a complete checkpoint-N'}."
            )
        from transformers.training_args import ParallelMode

        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if self.args.parallel_mode == ParallelMode.DISTRIBUTED and self.model_wrapped is self.model and not sharded:
            # evaluate() before train() marks the bare model "prepared" (no DDP wrapper); let train() wrap it.
            self.model.__dict__.pop("_is_accelerate_prepared", None)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """`Trainer.training_step`, stopping at the first non-finite loss instead of training on garbage."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            good = complete_checkpoints(self.args.output_dir)
            raise TrainingDivergedError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1}; training stopped. "
                f"Last good checkpoint: {str(good[-1]) if good else 'none saved yet'}. Lower `learning_rate`, set "
                "`max_grad_norm`, or check the data for empty or corrupt rows."
            )
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`Trainer.prediction_step`; when only the loss is wanted, the chunked-loss saver computes it without the
        `(tokens × vocab)` logits (the largest tensor of an evaluation batch)."""
        target = self.accelerator.unwrap_model(model)
        chunked = "chunked_loss" in (getattr(target, "hf_lorafa_savers", None) or [])
        target.hf_lorafa_loss_only = bool(prediction_loss_only and chunked)
        try:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        finally:
            target.hf_lorafa_loss_only = False

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """`args.optim`'s optimizer over trainable parameters; LoRA-FA's B, LaMDA's S and B at a multiple of lr."""
        ratio, boosted = boosted_lr(self.lorafa_config)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        special = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if self.optimizer is not None or ratio == 1.0 or special or not isinstance(optimizer_cls, type):
            return super().create_optimizer(model)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = lorafa_param_groups(opt_model, decay, self.args.learning_rate, self.args.weight_decay, ratio, boosted)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.memory is not None and not any(k.startswith(("eval_", "test_")) for k in logs):
            logs.update(self.memory.metrics(self.state.global_step, count_parameters(self.model)[0]))
        super().log(logs, start_time)

    def adapter_facts(self) -> dict[str, Any]:
        """What `hf_lorafa.json` and the model card say about this run."""
        return run_facts(self)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter (PEFT format + `hf_lorafa.json`), its exact training state, tokenizer and card."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        # Under FSDP/ZeRO-3 `save_model` passes the full state dict it gathered on every rank; otherwise None.
        full = state_dict or None
        save_adapter(model, output_dir, extra=self.adapter_facts(), state_dict=full)
        # Unfolded adapter tensors (LaMDA's B and S separately): what resuming needs to continue exactly. LaMDA's
        # frozen columns follow from the global step, restored by the schedule callback at train begin.
        trainable = {
            n: (full or {}).get(n, p).detach().contiguous().clone()
            for n, p in model.named_parameters()
            if "lora_" in n or p.requires_grad
        }
        atomic_write(Path(output_dir) / TRAINING_STATE_FILE, lambda tmp: save_file(trainable, tmp))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        Path(output_dir, "training_args.json").write_text(self.args.to_json_string())
        self.create_model_card(output_dir=output_dir)

    def _load_adapter_state(self, checkpoint: str) -> None:
        path = Path(checkpoint) / TRAINING_STATE_FILE
        if not path.exists():
            raise ValueError(
                f"`resume_from_checkpoint`={checkpoint!r} has no {TRAINING_STATE_FILE}; it was not written by "
                "LoRAFATrainer. Point it at a checkpoint-N folder of this output_dir."
            )
        model = self.accelerator.unwrap_model(self.model)
        state = load_file(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("lora_" in k for k in missing):
            raise ValueError(
                f"`resume_from_checkpoint`={checkpoint!r} holds an adapter for another model or configuration "
                f"({(unexpected or missing)[0]!r} does not match); resume with the same model and adapter arguments."
            )
        for layer in adapter_layers(model).values():
            refresh = getattr(layer, "refresh_preconditioner", None)
            if refresh is not None:
                refresh()

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_adapter_state(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_adapter_state(self.state.best_model_checkpoint)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        """Create the Hub repo before training (`push_to_hub=True`); a failure is one clear `HubUploadError`."""
        if not self.is_world_process_zero():
            return
        from .hub import create_hub_repo

        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.hub_model_id = create_hub_repo(
            repo_id,
            token=token if token is not None else self.args.hub_token,
            private=bool(private if private is not None else self.args.hub_private_repo),
        )
        self.push_in_progress = None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push the adapter (never transformers' `training_args.bin`, a pickle that holds `hub_token`)."""
        if self.is_world_process_zero() and self.args.hub_strategy != "end":
            self.push_to_hub(commit_message=f"Training in progress, step {self.state.global_step}")

    def create_model_card(self, output_dir: str | None = None, **kwargs) -> None:
        """Write README.md (the adapter's model card) beside the adapter."""
        from .model_card import write_model_card

        directory = output_dir or self.args.output_dir
        if self.args.should_save and (Path(directory) / "hf_lorafa.json").exists():
            write_model_card(directory, extra=kwargs or None)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> str:
        """Save locally first, then upload the adapter, card and memory plot to `args.hub_model_id`."""
        from .hub import push_adapter

        self.save_model(_internal_call=True)
        if not self.args.should_save:
            return ""
        repo_id = self.args.hub_model_id or Path(self.args.output_dir).resolve().name
        return push_adapter(
            self.args.output_dir,
            repo_id,
            token=token or self.args.hub_token,
            private=bool(self.args.hub_private_repo),
            revision=revision,
            commit_message=commit_message,
        )
