"""Fine-tune a causal LM with hf-lorafa: an ordinary Hugging Face training script, the one to copy.

Compared with a plain `Trainer` script, two names change: `TrainingArguments` → `LoRAFATrainingArguments` and
`Trainer` → `LoRAFATrainer`. Every `LoRAFATrainingArguments` field is a flag (`--adapter_method lamda --lora_r 8`).

    python scripts/finetune.py --model_name_or_path smollm2 --dataset chatterbot --output_dir outputs/run
    accelerate launch --num_processes 2 scripts/finetune.py ...   # DDP (CPU: gloo)
"""

from dataclasses import dataclass, field

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser

from hf_lorafa import (
    LoRAFATrainer,
    LoRAFATrainingArguments,
    load_raw_dataset,
    pad_collator,
    resolve_model,
    take_rows,
    tokenize_for_causal_lm,
)


@dataclass
class ScriptArguments:
    model_name_or_path: str = field(default="smollm2", metadata={"help": "Hub id, local folder, smollm2 or minilm."})
    dataset: str = field(default="chatterbot", metadata={"help": "Hub id, .json/.jsonl/.csv/.parquet, or built-in."})
    text_column: str | None = field(default=None, metadata={"help": "Text column (default: chat pairs or text)."})
    max_length: int = field(default=256, metadata={"help": "Truncate examples to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})


def main() -> None:
    script_args, training_args = HfArgumentParser(
        (ScriptArguments, LoRAFATrainingArguments)
    ).parse_args_into_dataclasses()
    path = resolve_model(script_args.model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = tokenize_for_causal_lm(
        load_raw_dataset(script_args.dataset, seed=training_args.seed),
        tokenizer,
        script_args.text_column,
        script_args.max_length,
    )
    train = take_rows(data["train"], script_args.max_train_samples, "--max_train_samples")
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)

    trainer = LoRAFATrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=data["test"],
        data_collator=pad_collator(tokenizer),
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    if training_args.push_to_hub:
        trainer.push_to_hub()


if __name__ == "__main__":
    main()
