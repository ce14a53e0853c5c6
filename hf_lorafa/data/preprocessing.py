"""Datasets for the training job: built-in offline names, local files, or Hub ids; tokenized for Trainer.

Question/answer rows (`question`/`answer`, `prompt`/`completion` or `messages`) use the tokenizer's chat template
and train on the answer only (prompt tokens get label -100, as TRL's completion-only loss); a `text_column` trains
on the whole text; an encoder-decoder reads the prompt and learns the answer; classification rows are `text` +
integer `label`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset

from .file_checks import check_data_file
from .offline import BUILTIN_DATASETS, chatterbot_pairs, drugreview_split
from .row_checks import (
    Skipped,
    cell_text,
    chat_columns,
    check_label_sets,
    check_max_length,
    check_one_format,
    check_row_limit,
    conversation,
    report_dropped,
    usable_rows,
)

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_raw_dataset(name: str, eval_size: float | int = 0.1, seed: int = 42) -> DatasetDict:
    """`train` and `test` splits from a built-in name, a local .json/.jsonl/.csv/.parquet file, or a Hub id."""
    if name == "chatterbot":
        data = DatasetDict({"train": Dataset.from_list(chatterbot_pairs())})
    elif name == "drugreview":
        return DatasetDict({s: Dataset.from_list(drugreview_split(s)) for s in ("train", "test")})
    elif Path(name).suffix.lower() in FILE_FORMATS:
        check_data_file(Path(name))
        try:
            data = load_dataset(FILE_FORMATS[Path(name).suffix.lower()], data_files=name)
        except Exception as err:  # datasets wraps parse errors in its own generic exception
            if "corresponds to no data" in str(err):  # a CSV header without rows, `[]` in a .json file
                raise ValueError(f"`--dataset` {name!r} has no rows; give it some training examples.") from None
            raise ValueError(
                f"`--dataset` file {name!r} could not be read as {Path(name).suffix} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}); check its format."
            ) from None
    elif Path(name).exists():
        raise ValueError(
            f"`--dataset` {name!r} is a folder or a file of an unknown type; pass a .json, .jsonl, .csv or .parquet "
            f"file, a Hub dataset id, or one of {', '.join(BUILTIN_DATASETS)}."
        )
    else:
        try:
            data = load_dataset(name)
        except Exception as err:  # noqa: BLE001 - offline, unknown repo, bad script: datasets raises many types
            raise ValueError(
                f"`--dataset` {name!r} is not a local file and could not be loaded from the Hub "
                f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else 'no detail'}); pass a "
                f".json/.jsonl/.csv/.parquet file, one of {', '.join(BUILTIN_DATASETS)}, or check the id and network."
            ) from None
        if "train" not in data:
            raise ValueError(
                f"`--dataset` {name!r} has no 'train' split (splits: {', '.join(data)}); pass a dataset with one."
            )
    if len(data["train"]) == 0:
        raise ValueError(f"`--dataset` {name!r} has no rows; give it some training examples.")
    if "test" not in data:
        if len(data["train"]) < 2:
            raise ValueError(f"`--dataset` {name!r} has one row; a held-out split needs at least 2 rows.")
        split = data["train"].train_test_split(test_size=eval_size, seed=seed)
        data = DatasetDict({"train": split["train"], "test": split["test"]})
    return data


def row_reader(columns: list[str], text_column: str | None) -> tuple[bool, Callable[[dict[str, Any], str], Any]]:
    """(chat, read): whether rows are prompt/answer pairs, and `read(row, where)` giving each row's text or
    (prompt turns, answer turn), or `Skipped` for a row with nothing to learn from."""
    pair = chat_columns(columns)
    chat = text_column is None and ("messages" in columns or pair is not None)
    if not chat:
        column = text_column or ("text" if "text" in columns else None)
        if column is None or column not in columns:
            raise ValueError(
                f"`--text_column` {column!r} is not a column of the dataset (columns: {', '.join(columns)}); "
                "pass --text_column with one of them, or use question/answer, prompt/completion or messages rows."
            )

    def read(row: dict[str, Any], where: str) -> Any:
        if chat and "messages" in columns:
            turns = conversation(row["messages"], f"{where}, column 'messages'")
            return Skipped("whose messages do not end on an assistant turn") if turns is None else turns
        names = pair if chat else (column,)
        texts = [cell_text(row[name], f"{where}, column {name!r}") for name in names]
        for name, text in zip(names, texts):
            if text is None:
                return Skipped(f"with a null or blank {name!r}")
        if not chat:
            return texts[0]
        return [{"role": "user", "content": texts[0]}], [{"role": "assistant", "content": texts[1]}]

    return chat, read


def read_split(split: Dataset, name: str, read: Callable[[dict[str, Any], str], Any], chat: bool) -> list[Any]:
    """The parsed usable rows of one split; chat rows mixing `messages` with question/answer rows are refused."""
    columns = split.column_names
    pair = chat_columns(columns)
    if chat and pair is not None and "messages" in columns:
        check_one_format(split, name, pair)
    return usable_rows(split, name, read)[1]


def tokenize_for_causal_lm(
    data: DatasetDict, tokenizer, text_column: str | None = None, max_length: int = 256
) -> DatasetDict:
    """`input_ids`, `attention_mask` and `labels` (prompt masked for chat rows) for every split.

    Rows with nothing to learn from (null or blank cells, a conversation that ends on a user turn, a prompt that
    fills `max_length`) are skipped with a count; cells of the wrong kind are one error naming the row and column.
    """
    check_max_length(max_length)
    chat, read = row_reader(data["train"].column_names, text_column)

    def encode(value: Any) -> tuple[list[int], list[int]]:
        if not chat:
            ids = tokenizer(value, truncation=True, max_length=max_length)["input_ids"]
            return ids, list(ids)
        prompt, answer = value
        if tokenizer.chat_template:
            prefix = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        else:
            prefix = prompt[-1]["content"] + "\n"
            full = prefix + answer[-1]["content"] + (tokenizer.eos_token or "")
        n_prompt = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        ids = tokenizer(full, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        return ids, [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]

    splits = {}
    for name, split in data.items():
        values = read_split(split, name, read, chat)
        encoded = [encode(value) for value in values]
        encoded = [(ids, labels) for ids, labels in encoded if any(label != -100 for label in labels)]
        report_dropped(name, len(values), len(encoded), max_length)
        splits[name] = Dataset.from_dict(
            {
                "input_ids": [ids for ids, _ in encoded],
                "attention_mask": [[1] * len(ids) for ids, _ in encoded],
                "labels": [labels for _, labels in encoded],
            }
        )
    return DatasetDict(splits)


def tokenize_for_seq2seq(data: DatasetDict, tokenizer, max_length: int = 256) -> DatasetDict:
    """`input_ids`/`attention_mask` of each prompt and `labels` of its answer, for encoder-decoder models (T5, BART).

    The encoder reads the prompt (a conversation's earlier turns, one per line) and the decoder learns the answer,
    as `DataCollatorForSeq2Seq` and transformers' summarization/translation examples expect.
    """
    check_max_length(max_length)
    columns = data["train"].column_names
    if "messages" not in columns and chat_columns(columns) is None:
        raise ValueError(
            f"`--task seq2seq` needs prompt/answer rows: question/answer, prompt/completion or messages columns "
            f"(the dataset has {', '.join(columns)}); the encoder reads the prompt and the decoder learns the answer."
        )
    _, read = row_reader(columns, None)
    splits = {}
    for name, split in data.items():
        values = read_split(split, name, read, chat=True)
        prompts = ["\n".join(turn["content"] for turn in prompt) for prompt, _ in values]
        answers = [answer[-1]["content"] for _, answer in values]
        encoded = tokenizer(prompts, text_target=answers, truncation=True, max_length=max_length)
        splits[name] = Dataset.from_dict(dict(encoded))
    return DatasetDict(splits)


def tokenize_for_classification(
    data: DatasetDict, tokenizer, text_column: str = "text", label_column: str = "label", max_length: int = 128
) -> DatasetDict:
    """`input_ids`, `attention_mask` and integer `labels`; rows with a null or blank text are skipped, counted."""
    check_max_length(max_length)
    columns = data["train"].column_names
    for flag, column in (("--text_column", text_column), ("--label_column", label_column)):
        if column not in columns:
            raise ValueError(
                f"`{flag}` {column!r} is not a column of the dataset (columns: {', '.join(columns)}); pass one."
            )

    for split in data.values():
        for i, label in enumerate(split[label_column]):
            if (
                isinstance(label, bool)
                or not isinstance(label, int)
                and not (isinstance(label, float) and label.is_integer())
            ):
                raise ValueError(
                    f"`--label_column` {label_column!r} must hold integer class ids (0, 1, ...); row {i} has "
                    f"{label!r}. Map the labels to integers first, or pass --label_column with the integer column."
                )
            if label < 0:
                raise ValueError(
                    f"`--label_column` {label_column!r} has the negative class id {label} in row {i}; class ids "
                    "start at 0."
                )

    def read(row: dict[str, Any], where: str) -> Any:
        text = cell_text(row[text_column], f"{where}, column {text_column!r}")
        return Skipped(f"with a null or blank {text_column!r}") if text is None else (text, int(row[label_column]))

    usable = {name: usable_rows(split, name, read) for name, split in data.items()}
    check_label_sets(
        {name: dict(zip(keep, (label for _, label in values))) for name, (keep, values) in usable.items()},
        label_column,
    )
    splits = {}
    for name, (_, values) in usable.items():
        encoded = tokenizer([text for text, _ in values], truncation=True, max_length=max_length)
        splits[name] = Dataset.from_dict({**encoded, "labels": [label for _, label in values]})
    return DatasetDict(splits)


def take_rows(split: Dataset, limit: int | None, flag: str) -> Dataset:
    """The first `limit` rows of `split` (all when `None`); 0 or less is an error naming `flag`, never "all"."""
    check_row_limit(limit, flag)
    return split if limit is None else split.select(range(min(len(split), limit)))


def pad_collator(tokenizer):
    """Right-pads `input_ids`/`attention_mask` with the pad token and `labels` with -100."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        batch = {
            "input_ids": [r["input_ids"] + [pad_id] * (length - len(r["input_ids"])) for r in rows],
            "attention_mask": [r["attention_mask"] + [0] * (length - len(r["attention_mask"])) for r in rows],
            "labels": [r["labels"] + [-100] * (length - len(r["labels"])) for r in rows],
        }
        return {k: torch.tensor(v) for k, v in batch.items()}

    return collate


def classification_metrics(eval_pred) -> dict[str, float]:
    """Accuracy and macro-F1 from logits, offline (no `evaluate` download)."""
    import numpy as np

    logits, labels = eval_pred
    predictions = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    f1s = []
    for c in np.unique(np.concatenate([labels, predictions])):
        tp = np.sum((predictions == c) & (labels == c))
        precision = tp / max(np.sum(predictions == c), 1)
        recall = tp / max(np.sum(labels == c), 1)
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float(np.mean(predictions == labels)), "macro_f1": float(np.mean(f1s))}
