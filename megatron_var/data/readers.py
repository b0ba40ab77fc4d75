"""Reading input rows, each tagged with where it came from (``file:line`` / ``file:item k`` / ``file:row k``).

JSON/JSONL (also ``.jsonl.gz``) are parsed here, line by line from bytes, so a malformed or non-UTF-8 line is one
bad row naming its line (``datasets`` can give neither); Parquet, CSV and ``save_to_disk`` directories go through
the ``datasets`` library. A name that is not a local path is a hub dataset for ``datasets.load_dataset``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from megatron_var.data.adapters import BadRow

logger = logging.getLogger(__name__)

DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}
FILE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".parquet", ".csv")
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_SURROGATE = re.compile("[\ud800-\udfff]")  # undecodable bytes after surrogateescape (or a lone \\udXXX escape)


def is_hub_name(name: str) -> bool:
    """``owner/name`` or ``name`` that is not a local path: sent to ``datasets.load_dataset``. Anything with a
    data-file suffix or more than one ``/`` is a mistyped local path instead (a clear "no such file" error)."""
    return not Path(name).exists() and bool(_HUB_NAME.fullmatch(name)) and not name.endswith(FILE_SUFFIXES)


class InputSource:
    """One input path; iterate to get ``(where, row)`` where row is a dict or a ``BadRow`` (malformed line)."""

    def __init__(self, path: str | Path, split: str | None = None):
        self.path = Path(path)
        self.label = str(path)  # how rows are named in messages; a DatasetDict adds [split]
        self._dataset = None
        if is_hub_name(str(path)):
            self._dataset, self.label = _load_hub(str(path), split)
        elif not self.path.exists():
            raise ValueError(f"--input {path}: no such file or directory")
        elif self.path.is_dir():
            self._dataset, self.label = _load_from_disk(self.path, split)
        elif split is not None:
            raise ValueError(f"--input {path}: --split {split} applies to save_to_disk DatasetDicts and hub "
                             "datasets, not to a single file (drop --split or pass the file of that split)")
        elif self.path.suffix in DATASETS_SUFFIXES:
            self._dataset = _load_with_datasets(self.path, DATASETS_SUFFIXES[self.path.suffix])
        elif not self.path.name.endswith((".json", ".jsonl", ".jsonl.gz")):
            raise ValueError(f"--input {path}: unsupported file type (use .jsonl, .jsonl.gz, .json, .parquet, .csv, "
                             "a datasets.save_to_disk directory or a hub dataset name)")

    def __len__(self) -> int:
        if self._dataset is not None:
            return len(self._dataset)
        if self._is_json_array():
            return len(self._json_array())
        with self._open() as f:
            return sum(1 for line in f if line.strip())

    def first_row(self) -> dict | None:
        """The first well-formed row (its keys are the columns for JSON; detection peeks at its values)."""
        for _, row in self:
            if isinstance(row, dict):
                return row
        return None

    def columns(self) -> set[str]:
        """Column names, for format detection (JSON: the keys of the first well-formed row)."""
        if self._dataset is not None:
            return set(self._dataset.column_names)
        return set(self.first_row() or ())

    def __iter__(self) -> Iterator[tuple[str, dict | BadRow]]:
        if self._dataset is not None:
            for k, row in enumerate(self._dataset):
                yield f"{self.label}:row {k + 1}", row
        elif self._is_json_array():
            for k, row in enumerate(self._json_array()):
                where = f"{self.path}:item {k + 1}"
                if not isinstance(row, dict):
                    row = BadRow(where, "malformed_json", "item is not an object")
                elif _has_undecodable(row):
                    row = BadRow(where, "invalid_utf8", "item holds bytes that are not valid UTF-8")
                yield where, row
        else:
            yield from self._iter_jsonl()

    def _open(self):
        return gzip.open(self.path, "rb") if self.path.name.endswith(".gz") else open(self.path, "rb")

    def _iter_jsonl(self):
        """Lines are decoded one by one, so one bad line is one bad row (``invalid_utf8``), not a failed file."""
        with self._open() as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{self.path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield where, BadRow(where, "invalid_utf8", _utf8_error(raw, e))
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRow(where, "malformed_json", f"malformed JSON line ({e.msg} at column {e.colno})")
                    continue
                yield where, row if isinstance(row, dict) else BadRow(where, "malformed_json", "line is not an object")

    def _is_json_array(self) -> bool:
        if self.path.suffix != ".json":
            return False
        with open(self.path, "rb") as f:
            head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
        return head.startswith(b"[")

    def _json_array(self) -> list:
        """Undecodable bytes are kept as surrogates (``surrogateescape``) so only the items holding them are bad."""
        if not hasattr(self, "_array"):
            text = self.path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
            try:
                self._array = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        return self._array


def _has_undecodable(value) -> bool:
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(v) for v in value)
    return False


def _first_invalid_utf8_line(path: Path) -> str | None:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return f"{path}:{lineno}: {_utf8_error(raw, e)}"
    return None


def _utf8_error(raw: bytes, e: UnicodeDecodeError) -> str:
    return f"line is not valid UTF-8 (byte {raw[e.start]:#04x} at byte column {e.start + 1})"


@contextlib.contextmanager
def _quiet_datasets():
    """datasets' own progress bars would interleave with ours; silence them only while loading."""
    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if was:
            datasets.enable_progress_bars()


def _load_with_datasets(path: Path, builder: str):
    if builder == "csv":  # CSV records may span lines, so a bad line cannot be skipped safely: name it and stop
        bad = _first_invalid_utf8_line(path)
        if bad:
            raise ValueError(f"{bad}; a CSV file must be UTF-8 as a whole (re-encode it, or convert it to JSONL "
                             "where --on-bad-row skip can skip such lines)")
    with _quiet_datasets() as datasets:
        loader = datasets.Dataset.from_parquet if builder == "parquet" else datasets.Dataset.from_csv
        try:
            return loader(str(path))
        except Exception as e:  # datasets raises many types for unreadable files
            raise ValueError(f"--input {path}: cannot read as {builder} ({type(e).__name__}: {e})") from None


def choose_split(splits: list[str], split: str | None, name: str) -> str:
    """``--split`` if given, else ``train`` if present, else the only split; otherwise say which splits exist."""
    if split is not None:
        if split not in splits:
            raise ValueError(f"--input {name}: no split {split!r} (splits: {', '.join(splits)})")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise ValueError(f"--input {name}: several splits and none is 'train' ({', '.join(splits)}); choose one with "
                     "--split NAME")


def _pick(ds, split: str | None, name: str):
    """A DatasetDict -> (its chosen split, 'name[split]'); a single Dataset -> (it, name)."""
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        split = choose_split(list(ds), split, name)
        logger.info("%s: using split %r", name, split)
        return ds[split], f"{name}[{split}]"
    return ds, f"{name}[{split}]" if split else name


def _load_from_disk(path: Path, split: str | None):
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise ValueError(
                f"--input {path}: not a datasets.save_to_disk directory ({type(e).__name__}: {e})"
            ) from None
    if split is not None and not isinstance(ds, datasets.DatasetDict):
        raise ValueError(f"--input {path}: --split {split} needs a saved DatasetDict; this directory holds one "
                         "dataset (drop --split)")
    return _pick(ds, split, str(path))


def _load_hub(name: str, split: str | None):
    """A dataset name, not a local path: ``datasets.load_dataset`` (downloads, or its cache when offline)."""
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # network, unknown name, unknown split, ...
            how = f"{name!r}" + (f", split={split!r}" if split else "")
            raise ValueError(f"--input {name}: not a local file or directory, and datasets.load_dataset({how}) "
                             f"failed ({type(e).__name__}: {e})") from None
    return _pick(ds, split, name)
