"""Row checks before tokenizing: what a cell may hold, which rows are skipped (and counted), which are errors.

A null or blank question, answer or text has nothing to learn from: the row is skipped and counted. So is a
`messages` conversation that does not end on an assistant turn (training on a user turn as the answer would teach
the model to speak as the user). A cell of the wrong kind (a list where text belongs, a turn without `content`) is
a schema mistake, not noise: one error names the split, the row and the column. Rows whose prompt leaves no answer
token within `max_length` are dropped after tokenizing and counted too; when nothing is left the error names
`--max_length`.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

Turns = list[dict[str, str]]


@dataclass(frozen=True)
class Skipped:
    """What a row reader returns for a row with nothing to learn from; `reason` completes "N rows ..."."""

    reason: str


def check_max_length(max_length: Any) -> None:
    """`--max_length` must be a positive int: 0 or -5 would otherwise fail deep in the tokenizer, after loading."""
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"`--max_length` must be a positive number of tokens (e.g. 256); got {max_length!r}.")


def check_row_limit(value: Any, flag: str) -> None:
    """A row limit such as `--max_train_samples`: unset (all rows) or at least 1; 0 never silently means all."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{flag}` must be at least 1 (leave it unset to use every row); got {value!r}.")


def cell_text(value: Any, where: str) -> str | None:
    """The text of a cell; `None` for a null or blank one (the row is skipped). Numbers read as their digits."""
    if value is None or (isinstance(value, float) and math.isnan(value)):  # pandas/CSV write NaN for an empty cell
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    kind = type(value).__name__
    raise ValueError(
        f"`--dataset` {where} holds a {kind} ({repr(value)[:80]}), not text. Put one string per cell (join a list "
        "first), or use a `messages` column of {'role', 'content'} turns for conversations."
    )


def conversation(value: Any, where: str) -> tuple[Turns, Turns] | None:
    """(prompt turns, answer turn) of a `messages` cell; `None` when it does not end on an assistant turn."""
    if value is None or (isinstance(value, list) and not value):
        return None
    if not isinstance(value, list):
        raise ValueError(
            f"`--dataset` {where} holds a {type(value).__name__}, not a list of {{'role', 'content'}} turns."
        )
    for turn in value:
        if not (isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str)):
            raise ValueError(
                f"`--dataset` {where} has the turn {repr(turn)[:80]}; every turn must be {{'role': str, "
                "'content': str}."
            )
    if value[-1]["role"] != "assistant" or not value[-1]["content"].strip():
        return None
    return value[:-1], value[-1:]


def chat_columns(columns: list[str]) -> tuple[str, str] | None:
    """The (prompt, answer) columns of question/answer or prompt/completion rows; `None` when there are none."""
    for pair in (("question", "answer"), ("prompt", "completion")):
        if set(pair) <= set(columns):
            return pair
    return None


def check_one_format(split: Any, name: str, pair: tuple[str, str]) -> None:
    """Refuse a split that mixes `messages` rows with `pair` (question/answer) rows, naming the first of each.

    One format per dataset, as TRL decides it from the first row: a mix is most often two files concatenated by
    mistake, and a row holding both would be ambiguous. Reading only one kind would drop the others silently.
    """
    firsts: dict[str, int] = {}
    for index, row in enumerate(split):
        kind = "messages" if row["messages"] is not None else "/".join(pair) if row[pair[0]] is not None else None
        firsts.setdefault(kind, index)
        if len(firsts.keys() - {None}) == 2:
            (a, i), (b, j) = sorted((k, v) for k, v in firsts.items() if k is not None)
            raise ValueError(
                f"`--dataset` mixes {a} rows ({name} row {i} is the first) with {b} rows ({name} row {j} is the "
                "first); use one format per dataset: write each question/answer pair as messages [{'role': 'user', "
                "'content': question}, {'role': 'assistant', 'content': answer}], or the other way round."
            )


def check_label_sets(labels: dict[str, dict[int, int]], label_column: str) -> None:
    """Classification needs two classes or more in `train`, and no held-out label that `train` never shows.

    `labels` maps each split to {row index: class id} of its usable rows.

    One class would build a 1-label regressor (or a classifier that is always right); a label only in a held-out
    split is past the head's last output, an IndexError at the first evaluate.
    """
    seen = set(labels["train"].values())
    if len(seen) < 2:
        raise ValueError(
            f"`--label_column` {label_column!r} has one class in train (every usable row is {min(seen)}); "
            "classification needs at least two. Add rows of the other classes."
        )
    for name, values in labels.items():
        for index, label in values.items():
            if label not in seen:
                raise ValueError(
                    f"`--label_column` {label_column!r} has the class {label} in {name} row {index}, which no train "
                    f"row has (train classes: {', '.join(map(str, sorted(seen)))}); the model cannot learn it. "
                    "Move some of its rows into train, or drop them."
                )


def usable_rows(split: Any, name: str, read: Callable[[dict[str, Any], str], Any]) -> tuple[list[int], list[Any]]:
    """Indices and parsed values of the rows of `split` that `read(row, where)` does not skip.

    Skipped rows are counted per reason in one warning (an error when none is left); `read` raises for rows that
    are mistakes, naming `where` ("train row 3").
    """
    keep, parsed, skipped = [], [], Counter()
    for index, row in enumerate(split):
        value = read(row, f"{name} row {index}")
        if isinstance(value, Skipped):
            skipped[value.reason] += 1
        else:
            keep.append(index)
            parsed.append(value)
    reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common())
    if not keep:
        raise ValueError(
            f"`--dataset` has no usable {name} rows: all {len(split)} were skipped ({reasons}). Fill in the "
            "empty cells, or pass the right --text_column."
        )
    if skipped:
        logger.warning("%s: skipped %d of %d rows (%s).", name, sum(skipped.values()), len(split), reasons)
    return keep, parsed


def report_dropped(name: str, before: int, after: int, max_length: int) -> None:
    """Count the rows whose prompt filled `max_length`; none left is an error naming the flag."""
    if after == 0:
        raise ValueError(
            f"every {name} row was dropped: no row leaves an answer token within `--max_length` {max_length} "
            "(the prompt alone fills it). Raise --max_length, or shorten the prompts."
        )
    if after < before:
        logger.warning(
            "%s: dropped %d of %d rows whose prompt fills --max_length %d (no answer token left to train on); "
            "raise --max_length to keep them.",
            name, before - after, before, max_length,
        )  # fmt: skip
