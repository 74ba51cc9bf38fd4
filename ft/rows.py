"""Where data rows come from: a JSONL file, or a Hugging Face dataset on local disk.

A :class:`Rows` is a sequence of raw rows that knows, for each, where it is (for error
messages) and which folder its relative paths resolve against. Nothing here parses a
conversation: :mod:`ft.messages` does, the same way for every source.

* **JSONL** (``*.jsonl``, ``*.json``): each non-blank line, unparsed (:class:`JsonlRows`);
  errors read ``file:line: field: reason``.
* **Hugging Face datasets** (:class:`DatasetRows`): a folder written by
  ``Dataset.save_to_disk``, or local Parquet or Arrow files (one file or a glob). Rows are
  read on access from memory-mapped Arrow, never all at once, and images stay undecoded
  (``{"bytes": ..., "path": ...}``, as Arrow stores ``datasets.Image``) until ft decodes
  them. Errors read ``dataset:row N: field: reason``, N counting rows from 0 as
  ``dataset[N]`` does.
"""

from __future__ import annotations

import glob
import os
from array import array
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets  # imported where a dataset is read: it brings pyarrow and pandas

__all__ = ["DataError", "DatasetRows", "JsonlRows", "Rows", "Where", "load_rows"]


class DataError(ValueError):
    """A data row that cannot be used; the message reads ``file:line: field: reason``
    (``dataset:row N: field: reason`` for a Hugging Face dataset)."""


class Where:
    """The place of a row, for error messages: a file and line, or a dataset and row."""

    def __init__(self, source: str, place: int | str):
        self.source, self.place = source, place

    def error(self, field: str, reason: str) -> DataError:
        return DataError(f"{self.source}:{self.place}: {field}: {reason}")


class Rows:
    """Raw rows of one source. Subclasses say how a row is stored and named."""

    name: str
    """The file, folder or glob the rows came from."""

    base: str
    """The folder that relative image and video paths resolve against."""

    def __len__(self) -> int:
        raise NotImplementedError

    def raw(self, index: int) -> str | dict[str, Any]:
        """Row `index` as stored: a JSONL line's text, or a dataset record."""
        raise NotImplementedError

    def where(self, index: int) -> Where:
        raise NotImplementedError

    def select(self, indices: list[int]) -> Rows:
        """The rows `indices` of these, in that order, keeping their places."""
        raise NotImplementedError


class JsonlRows(Rows):
    """The non-blank lines of a JSONL file, held unparsed: their UTF-8 bytes end to end
    in one buffer, with each row's start offset and 1-based line number in flat arrays
    (no Python object per row, and no ``datasets``/pyarrow/pandas in the process).

    Lines are not loaded with ``load_dataset("json")`` because that infers one schema for
    the whole file: rows whose ``content`` is a string in one place and a list in
    another, or whose ``image`` is a string or a list, are refused by older ``datasets``
    versions or rewritten with null-filled fields, and a malformed line fails the whole
    file without naming it.
    """

    def __init__(self, name: str, data: bytes, starts: array, numbers: array):
        self.name, self.data, self.starts, self.numbers = name, data, starts, numbers  # starts: len + 1
        self.base = os.path.dirname(os.path.abspath(name))

    @classmethod
    def read(cls, path: str) -> JsonlRows:
        data, starts, numbers = bytearray(), array("q", [0]), array("q")
        try:
            with open(path, "rb") as f:
                for number, raw in enumerate(f, start=1):
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataError(f"{path}:{number}: row: not valid UTF-8 ({e.reason})") from e
                    if number == 1 and text.startswith("\ufeff"):  # a byte-order mark some editors write
                        text = text.removeprefix("\ufeff")
                        raw = text.encode("utf-8")
                    if text.strip():
                        data += raw
                        starts.append(len(data))
                        numbers.append(number)
        except OSError as e:
            raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
        if not numbers:
            raise DataError(f"{path}: no rows (the file is empty)")
        return cls(path, bytes(data), starts, numbers)

    def __len__(self) -> int:
        return len(self.numbers)

    def raw(self, index: int) -> str:
        index = range(len(self))[index]  # negative indices and IndexError as a list has them
        return self.data[self.starts[index]:self.starts[index + 1]].decode("utf-8")

    def where(self, index: int) -> Where:
        return Where(self.name, self.numbers[index])

    @property
    def lines(self) -> list[int]:
        """The line number of each row."""
        return self.numbers.tolist()

    def select(self, indices: list[int]) -> JsonlRows:
        texts = [self.data[self.starts[i]:self.starts[i + 1]] for i in indices]
        starts = array("q", [0])
        for text in texts:
            starts.append(starts[-1] + len(text))
        return JsonlRows(self.name, b"".join(texts), starts, array("q", (self.numbers[i] for i in indices)))


class DatasetRows(Rows):
    """The records of a ``datasets.Dataset`` on local disk, read one at a time from its
    memory-mapped Arrow data (format ``"arrow"``: no decoding, so an image comes as its
    stored ``{"bytes", "path"}``)."""

    def __init__(self, name: str, dataset: datasets.Dataset, base: str, positions: list[int] | None = None):
        self.name, self.base = name, base
        self.dataset = dataset.with_format("arrow")
        self.positions = positions

    def __len__(self) -> int:
        return len(self.dataset)

    def raw(self, index: int) -> dict[str, Any]:
        return self.dataset[index].to_pylist()[0]

    def where(self, index: int) -> Where:
        return Where(self.name, f"row {self.positions[index] if self.positions is not None else index}")

    def select(self, indices: list[int]) -> DatasetRows:
        positions = [self.positions[i] for i in indices] if self.positions is not None else list(indices)
        return DatasetRows(self.name, self.dataset.select(indices), self.base, positions)


def load_rows(path: str | os.PathLike) -> Rows:
    """The rows at `path`: a JSONL file, a ``save_to_disk`` folder, or Parquet/Arrow
    files (a path or a glob such as ``data/train-*.parquet``). Raises DataError naming
    the path when there is nothing to read."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return _from_folder(path)
    if glob.has_magic(path) or path.endswith((".parquet", ".arrow")):
        return _from_files(path)
    return JsonlRows.read(path)


def _from_folder(path: str) -> DatasetRows:
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "state.json")))
        raise DataError(f"{path}: a DatasetDict with splits {', '.join(splits) or '(none)'}: point at one, "
                        f"e.g. {os.path.join(path, splits[0] if splits else 'train')}")
    if not os.path.isfile(os.path.join(path, "state.json")):
        raise DataError(f"{path}: not a dataset folder (Dataset.save_to_disk writes state.json and "
                        "dataset_info.json); for Parquet or Arrow files give their path or a glob")
    import datasets

    try:
        dataset = datasets.load_from_disk(path)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load the dataset: {e}") from e
    return _checked(path, dataset, os.path.abspath(path))


def _from_files(pattern: str) -> DatasetRows:
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    missing = [f for f in files if not os.path.isfile(f)]
    if not files or missing:
        raise DataError(f"{pattern}: {'no file matches' if not files else 'not found: ' + missing[0]}")
    kinds = {os.path.splitext(f)[1] for f in files}
    if kinds not in ({".parquet"}, {".arrow"}):
        raise DataError(f"{pattern}: expected .parquet or .arrow files, got {', '.join(sorted(kinds))}")
    import datasets

    try:
        if kinds == {".arrow"}:  # memory-mapped where they lie: nothing is copied
            dataset = datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in files])
        else:  # converted once into the datasets cache (HF_DATASETS_CACHE), then memory-mapped
            dataset = datasets.load_dataset("parquet", data_files=files, split="train")
    except (OSError, ValueError) as e:
        raise DataError(f"{pattern}: cannot load: {e}") from e
    return _checked(pattern, dataset, os.path.dirname(os.path.abspath(files[0])))


def _checked(name: str, dataset: datasets.Dataset, base: str) -> DatasetRows:
    columns = set(dataset.column_names)
    if not columns & {"messages", "conversations"}:
        raise DataError(f"{name}: no 'messages' or 'conversations' column (columns: {', '.join(sorted(columns))})")
    if len(dataset) == 0:
        raise DataError(f"{name}: no rows")
    return DatasetRows(name, dataset, base)
