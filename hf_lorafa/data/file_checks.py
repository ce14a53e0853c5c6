"""A local `--dataset` file, checked before `datasets` reads it: every mistake names the file, line and column.

`datasets` reports a malformed JSON line as "An error occurred while generating the dataset" and reads bytes that
are not UTF-8 without a word (they turn into replacement characters in the training text). Text formats are read
here once, line by line: the first byte that is not UTF-8, or the first line that is not JSON, is one error naming
where it is. A `.json` file is JSON lines when its first non-blank line is a JSON value by itself (as `datasets`
reads it), otherwise one JSON document.
"""

from __future__ import annotations

import json
from pathlib import Path

TEXT_FORMATS = (".json", ".jsonl", ".csv")


def check_data_file(path: Path) -> None:
    """Refuse a missing, folder, empty, non-UTF-8 or malformed-JSON `--dataset` file with one error saying where."""
    if path.is_dir():
        raise ValueError(f"`--dataset` {str(path)!r} is a folder, not a file; pass the data file inside it.")
    if not path.is_file():
        raise ValueError(f"`--dataset` file {str(path)!r} does not exist; check the path.")
    if path.stat().st_size == 0:
        raise ValueError(f"`--dataset` file {str(path)!r} is empty; give it some training examples.")
    if path.suffix.lower() not in TEXT_FORMATS:
        return
    lines = []
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"`--dataset` file {str(path)!r} line {number}, column {len(raw[: err.start].decode()) + 1}: byte "
                    f"0x{raw[err.start]:02x} is not UTF-8. Save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
    if path.suffix.lower() != ".csv":
        _check_json(path, lines)


def _check_json(path: Path, lines: list[str]) -> None:
    first = next((n for n, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise ValueError(f"`--dataset` file {str(path)!r} is empty; give it some training examples.")
    try:
        json.loads(lines[first])
        numbered = [(n, line) for n, line in enumerate(lines) if line.strip()]  # JSON lines: one value per line
        form = "each line must be one JSON object"
    except json.JSONDecodeError:
        numbered = [(0, "".join(lines))]  # one document spread over lines (a pretty-printed list)
        form = "the file must be one JSON document, or one JSON object per line"
    for offset, text in numbered:
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"`--dataset` file {str(path)!r} line {offset + err.lineno}, column {err.colno}: not valid JSON "
                f"({err.msg}); {form}."
            ) from None
