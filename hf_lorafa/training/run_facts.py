"""What `hf_lorafa.json` and the model card record about a training run: model, adapters, quantization, the
training settings, results and memory. Read from a `LoRAFATrainer` at save time."""

from __future__ import annotations

from typing import Any

from ..tuners.injection import adapter_layers, count_parameters
from ..tuners.quantization import is_quantized
from ..version import __version__


def run_facts(trainer) -> dict[str, Any]:
    """The facts of `trainer`'s run, as `hf_lorafa.json` stores them (the trainer's `run_info` merged in last)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable, total = count_parameters(model)
    quantization = None
    if trainer.args.load_in_4bit or trainer.args.load_in_8bit or is_quantized(model):
        quantization = {
            "load_in_4bit": bool(getattr(model, "is_loaded_in_4bit", trainer.args.load_in_4bit)),
            "load_in_8bit": bool(getattr(model, "is_loaded_in_8bit", trainer.args.load_in_8bit)),
            "bnb_4bit_quant_type": trainer.args.bnb_4bit_quant_type,
        }
    train_loss = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    eval_loss = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    results = dict(trainer.results)
    if train_loss:
        results.setdefault("train_loss", train_loss[-1])
    if eval_loss:
        results.setdefault("eval_loss", eval_loss[-1])
    memory = None
    if trainer.memory is not None:
        memory = {k: v for k, v in trainer.memory.summary().items() if k != "history"}
    args = trainer.args
    # Trainer ignores the epochs when max_steps is set; the card shows the setting that decided the run's length.
    length = {"max_steps": args.max_steps} if args.max_steps > 0 else {"num_train_epochs": args.num_train_epochs}
    return {
        "hf_lorafa_version": __version__,
        "base_model": getattr(getattr(model, "config", None), "name_or_path", None),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "adapted_layers": len(adapter_layers(model)),
        "quantization": quantization,
        "activation_savers": getattr(model, "hf_lorafa_savers", None),
        "training": {
            "learning_rate": args.learning_rate,
            **length,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "seed": args.seed,
            "optim": str(getattr(args.optim, "value", args.optim)),  # `adamw_torch`, not `OptimizerNames.…`
            "global_step": trainer.state.global_step,
        },
        "results": results,
        "memory": memory,
        **trainer.run_info,
    }
