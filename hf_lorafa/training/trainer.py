"""`LoRAFATrainerMixin`: hf-lorafa's behaviour for any `Trainer` subclass; `LoRAFATrainer` is it over `Trainer`.

Overrides (each short): `__init__` (quantize if asked, continue a PeftModel's LoRA, inject, activation savers, the
padding-free probe), `compute_loss` (training batches without their padding where `remove_padding` applies),
`create_optimizer` (LoRA-FA's B learning-rate multiplier as a param group of whatever `args.optim` builds), `log`
(memory figures and the base learning rate, so every reporting integration sees them), `_save` (adapter only),
`_load_from_checkpoint` / `_load_best_model` (adapter only), `create_model_card` and `push_to_hub` (our card, adapter
upload). LaMDA's freezing schedule, the activation-byte sampling and the warmup-length check are callbacks on step
boundaries. The mixin goes first among the bases (`class MyTrainer(LoRAFATrainerMixin, SFTTrainer)`), so its
overrides wrap the other trainer's.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from transformers import Trainer

from ..adapter_io.output_folder import exclusive_folder, refuse_model_folder, staged_files
from ..adapter_io.peft_format import save_adapter
from ..adapter_io.zero3 import gather_adapter_tensors
from ..compat import forget_accelerate_prepared
from ..tuners.calibration import init_frozen_a_from_data
from ..tuners.config import is_adapter_tensor
from ..tuners.injection import adapter_layers, count_parameters
from ..tuners.layers import dropout_follows_tokens
from .arguments import LoRAFAArguments, LoRAFATrainingArguments
from .callbacks import LaMDAScheduleCallback, MemoryCallback, WarmupCheckCallback
from .checkpoints import TRAINING_STATE_FILE, check_same_adapter, check_writable, complete_checkpoints, resolve_resume
from .chunked_loss import loss_only
from .cpu_memory import TrimCallback, malloc_trim, set_mmap_threshold
from .memory_logging import MemoryTracker
from .model_setup import prepare_model
from .packed_attention import use_packed_attention
from .padding_free import padding_free_refusal, token_layout, without_padding
from .param_groups import lorafa_param_groups, lr_ratios
from .preemption import preemptible
from .run_facts import run_facts

logger = logging.getLogger(__name__)
# Training batches whose gradient sets a frozen A (`frozen_a_init="gradient"`): LoRA-GA's 64 examples at batch 16.
FROZEN_A_BATCHES = 4


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


class LoRAFATrainerMixin:
    """
    Gives a [`~transformers.Trainer`] subclass hf-lorafa's behaviour: adapters injected from the arguments' adapter
    fields (after quantizing the base if `load_in_4bit` / `load_in_8bit`), LoRA-FA's learning-rate groups, LaMDA's
    freezing schedule, memory figures in every log, and adapter-only saving (PEFT format + `hf_lorafa.json` + card).

    The model may come with adapters already (from [`inject_adapters`] or [`load_adapter`]), as a `peft.PeftModel`
    whose LoRA adapter then continues in hf-lorafa's layers, or as a name/folder loaded with [`load_base_model`].
    The arguments must carry [`LoRAFAArguments`]' fields.

    Example:

    ```python
    >>> from transformers import Trainer
    >>> from hf_lorafa import LoRAFATrainerMixin
    >>> class MyTrainer(LoRAFATrainerMixin, Trainer):  # the mixin first, so its overrides run first
    ...     pass
    ```
    """

    # What `args=None` builds, and what a wrong `args` is told to use instead.
    lorafa_args_class: type[LoRAFAArguments] = LoRAFATrainingArguments
    # hf-lorafa's chunked LM-head loss; off where the trainer brings its own (TRL's fused LM head).
    lorafa_chunked_loss: bool = True

    def __init__(self, model: torch.nn.Module | str | None = None, args: LoRAFAArguments | None = None, *a, **kw):
        args = self.lorafa_args_class(output_dir="trainer_output") if args is None else args
        if not isinstance(args, LoRAFAArguments):
            wanted = self.lorafa_args_class.__name__
            raise TypeError(
                f"`args` is a {type(args).__name__}; {type(self).__name__} needs {wanted}. Replace "
                f"`{type(args).__name__}(...)` by `{wanted}(...)` (same fields, plus the adapter ones)."
            )
        if args.should_save:  # here, not at the first checkpoint after the steps
            check_writable(args.output_dir)
        model = prepare_model(model, args, chunked_loss=self.lorafa_chunked_loss, trainer=type(self).__name__)
        if args.gradient_checkpointing and not args.gradient_checkpointing_kwargs:
            args.gradient_checkpointing_kwargs = {"use_reentrant": False}
        super().__init__(model, args, *a, **kw)
        # Decided once, on the model as it will train (adapters and savers in, on its device).
        # With it, SDPA attends within each flattened sequence (module `packed_attention`); the probe checks both.
        packed = args.remove_padding and use_packed_attention(self.model)
        refusal = padding_free_refusal(self.model) if args.remove_padding else "remove_padding=False"
        self.lorafa_padding_free = refusal is None
        if refusal is None:
            logger.info("hf-lorafa: training batches without their padding (remove_padding)")
        else:
            logger.info("hf-lorafa: training batches keep their padding: %s", refusal)
            if packed:
                self.model.config._attn_implementation = "sdpa"
        self.results: dict[str, float] = {}
        # Extra facts for hf_lorafa.json and the card that only the caller knows (e.g. {"dataset": "chatterbot"}).
        self.run_info: dict[str, Any] = {}
        self.memory = MemoryTracker(model) if args.log_memory else None
        if self.memory is not None:
            self.add_callback(MemoryCallback(self.memory))
        # MALLOC_MMAP_THRESHOLD_ in the environment is the user's own choice of the same setting: it stands.
        if args.cpu_mmap_threshold and self.args.device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
            if not set_mmap_threshold(args.cpu_mmap_threshold):
                logger.info("hf-lorafa: cpu_mmap_threshold not set (this C library has no glibc mallopt)")
        trim = malloc_trim() if args.trim_cpu_memory and self.args.device.type == "cpu" else None
        if trim is not None:
            self.add_callback(TrimCallback(trim))
        self.add_callback(LaMDAScheduleCallback())
        self.add_callback(WarmupCheckCallback())
        savers = getattr(model, "hf_lorafa_savers", None)
        if savers:
            logger.info("hf-lorafa activation savers active: %s", ", ".join(savers))

    @property
    def lorafa_config(self):
        return self.accelerator.unwrap_model(self.model).hf_lorafa_config

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, resuming only from checkpoints whose save completed, whose files read cleanly (a kill
        mid-save leaves a partial `checkpoint-N` behind; `True`/`"last"` picks the newest complete one) and whose
        adapter options are this run's."""
        resume_from_checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir)
        if resume_from_checkpoint is not None:
            check_same_adapter(Path(resume_from_checkpoint), self.lorafa_config)
        from transformers.training_args import ParallelMode

        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if self.args.parallel_mode == ParallelMode.DISTRIBUTED and self.model_wrapped is self.model and not sharded:
            forget_accelerate_prepared(self.model)  # evaluate() before train() marked it prepared, unwrapped
        # Before any step: the base model's own folder is no place for an adapter, and one run writes a folder.
        refuse_model_folder(self.args.output_dir, "output_dir")
        with exclusive_folder(self.args.output_dir) if self.is_world_process_zero() else contextlib.nullcontext():
            if resume_from_checkpoint is None:
                self.init_frozen_a()
            with preemptible(self):  # SIGTERM: save a checkpoint at the step's end, then exit 143 (preemption.py)
                return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def init_frozen_a(self) -> None:
        """`frozen_a_init="gradient"` or `"activations"`: set each frozen A from the first `FROZEN_A_BATCHES` training
        batches, once, before the first step (a resumed run loads its A from the checkpoint instead)."""
        model = self.accelerator.unwrap_model(self.model)
        kind = self.lorafa_config.frozen_a_init
        if kind == "random" or not getattr(model, "hf_lorafa_a_pending", False):
            return  # a random A, one set already, or one loaded with its adapter
        loader = itertools.islice(self.get_train_dataloader(), FROZEN_A_BATCHES)
        batches = (self._prepare_inputs(batch) for batch in loader)
        if self.memory is not None:
            self.memory.reset_peak()
        # TRL's compute_loss records token counts and metrics as it goes; the calibration batches are not training.
        kept = {k: copy.deepcopy(getattr(self, k)) for k in ("_metrics", "_total_train_tokens") if hasattr(self, k)}
        count = init_frozen_a_from_data(model, batches, lambda m, b: self.compute_loss(m, b), kind=kind)
        for key, value in kept.items():
            setattr(self, key, value)
        model.hf_lorafa_a_batches = count  # init_frozen_a_from_data cleared hf_lorafa_a_pending
        peak = ""
        if self.memory is not None:  # the run's overall peak includes this pass; the step logs cover training only
            used = self.memory.peak_since_reset()
            self.memory.overall_peak = max(self.memory.overall_peak, used)
            self.memory.reset_peak()
            peak = f"; peak {used / 2**20:.0f} MiB ({self.memory.peak_kind})"
        logger.info("hf-lorafa: frozen A set from the %s of %d training batches%s", kind, count, peak)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """`Trainer.training_step`, stopping at the first non-finite loss instead of training on garbage. A batch that
        keeps its padding draws the dropout masks its padding-free form would (`dropout_follows_tokens`), so training
        with and without `remove_padding` sees the same masks."""
        real = token_layout(inputs, self.accelerator.unwrap_model(model).config)
        with dropout_follows_tokens(None if real is None else real.to(self.args.device)):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            good = complete_checkpoints(self.args.output_dir)
            raise TrainingDivergedError(
                f"the training loss became {loss.item()} at step {self.state.global_step + 1}; training stopped. "
                f"Last good checkpoint: {str(good[-1]) if good else 'none saved yet'}. Lower `learning_rate`, set "
                "`max_grad_norm`, or check the data for empty or corrupt rows."
            )
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """`Trainer.compute_loss` (or the next base's) on a training batch's tokens without its padding, where
        `remove_padding` applies (module `padding_free`: same loss and gradients; `num_items_in_batch`, counted on the
        padded labels, counts the same targets). Evaluation, and a custom `compute_loss_func`, see the padded batch."""
        if self.lorafa_padding_free and model.training and self.compute_loss_func is None:
            inputs = without_padding(inputs, self.accelerator.unwrap_model(model).config)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """`Trainer.prediction_step`; when only the loss is wanted, the chunked-loss saver computes it without the
        `(tokens × vocab)` logits (the largest tensor of an evaluation batch)."""
        with loss_only(self.accelerator.unwrap_model(model), enabled=prediction_loss_only):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """`args.optim`'s optimizer over trainable parameters; LoRA-FA's B, LaMDA's S and B at multiples of lr."""
        ratios = lr_ratios(self.lorafa_config)
        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        special = {"params", "model", "optimizer_dict"} & set(optimizer_kwargs)
        if self.optimizer is not None or not ratios or special or not isinstance(optimizer_cls, type):
            return super().create_optimizer(model)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups = lorafa_param_groups(opt_model, decay, self.args.learning_rate, self.args.weight_decay, ratios)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log` plus memory figures; `learning_rate` is the base rate (`Trainer` reports its first param
        group's, which may be LoRA-FA's B at `lorafa_lr_ratio` × it), each scaled tensor's as `learning_rate_<t>`."""
        groups = self.optimizer.param_groups if self.optimizer is not None else []
        if "learning_rate" in logs and any("lr_ratio" in group for group in groups):
            base = logs["learning_rate"] / groups[0].get("lr_ratio", 1.0)
            logs["learning_rate"] = base
            logs.update({f"learning_rate_{t}": base * ratio for t, ratio in lr_ratios(self.lorafa_config).items()})
        if self.memory is not None and not any(k.startswith(("eval_", "test_")) for k in logs):
            logs.update(self.memory.metrics(self.state.global_step, count_parameters(self.model)[0]))
        super().log(logs, start_time)

    def adapter_facts(self) -> dict[str, Any]:
        """What `hf_lorafa.json` and the model card say about this run."""
        return run_facts(self)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the adapter (PEFT format + `hf_lorafa.json`), its exact training state, tokenizer and card."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        # ZeRO-3: every rank gathers the adapter (a collective) before only the main one writes it; the state dict
        # `save_model` consolidated may lack it (frozen A excluded, or the 16-bit gather switched off).
        gathered = gather_adapter_tensors(model)
        if not self.args.should_save:
            return
        # Under FSDP/ZeRO-3 `save_model` passes the full state dict it gathered on every rank; otherwise None.
        full = {**(state_dict or {}), **gathered} or None
        # Unfolded adapter tensors (LaMDA's B and S separately): what resuming needs to continue exactly. LaMDA's
        # frozen columns follow from the global step, restored by the schedule callback at train begin.
        trainable = {
            n: (full or {}).get(n, p).detach().contiguous().clone()
            for n, p in model.named_parameters()
            if is_adapter_tensor(n) or p.requires_grad
        }
        with staged_files(output_dir) as staging:  # every file written, then all renamed in (see output_folder.py)
            save_adapter(model, staging, extra=self.adapter_facts(), state_dict=full)
            (staging / TRAINING_STATE_FILE).write_bytes(save(trainable))
            if self.processing_class is not None:
                self.processing_class.save_pretrained(staging)
            (staging / "training_args.json").write_text(self.args.to_json_string())
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
        if unexpected or any(is_adapter_tensor(k) for k in missing):
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
        from ..hub.push import create_hub_repo

        repo_id = self.args.hub_model_id or Path(self.args.output_dir).absolute().name
        self.hub_model_id = create_hub_repo(
            repo_id,
            token=token if token is not None else self.args.hub_token,
            private=bool(private if private is not None else self.args.hub_private_repo),
        )
        self.push_in_progress = None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push the checkpoint's adapter (never transformers' `training_args.bin`, a pickle that holds `hub_token`);
        a Hub failure warns and the next save retries, and nothing is written at the top of `output_dir`."""
        if self.is_world_process_zero() and self.args.hub_strategy != "end":
            from ..hub.push import push_checkpoint

            push_checkpoint(
                checkpoint_folder,
                self.args.hub_model_id or Path(self.args.output_dir).resolve().name,
                step=self.state.global_step,
                token=self.args.hub_token,
                private=bool(self.args.hub_private_repo),
            )

    def create_model_card(self, output_dir: str | None = None, **kwargs) -> None:
        """Write README.md (the adapter's model card) beside the adapter."""
        from ..hub.card import write_model_card

        directory = output_dir or self.args.output_dir
        # The usage samples name the Hub repo when it is known.
        extra = dict(kwargs)
        if self.args.hub_model_id:
            extra.setdefault("repo_id", self.args.hub_model_id)
        if self.args.should_save and (Path(directory) / "hf_lorafa.json").exists():
            write_model_card(directory, extra=extra or None)

    def push_to_hub(
        self,
        commit_message: str | None = "End of training",
        blocking: bool = True,
        token: str | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> str:
        """Save locally first, then upload the adapter, card and memory plot to `args.hub_model_id`."""
        from ..hub.push import push_adapter

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


class LoRAFATrainer(LoRAFATrainerMixin, Trainer):
    """
    [`~transformers.Trainer`] for hf-lorafa adapters: pass [`LoRAFATrainingArguments`] instead of
    `TrainingArguments` and everything else in your script stays the same (see [`LoRAFATrainerMixin`]).

    `save_model()` writes only the adapter (PEFT format + `hf_lorafa.json`) and the model card.

    Example:

    ```python
    >>> from hf_lorafa import LoRAFATrainer, LoRAFATrainingArguments
    >>> args = LoRAFATrainingArguments(output_dir="out", adapter_method="lorafa", lora_r=16)
    >>> trainer = LoRAFATrainer(model=model, args=args, train_dataset=train_ds)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """
