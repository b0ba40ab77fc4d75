"""Reading local input files row by row, each row tagged with where it came from (``file:line`` / ``file:row``).

JSON/JSONL are parsed here (line-accurate errors for malformed lines, which ``datasets`` cannot give); Parquet,
CSV and ``save_to_disk`` directories go through the ``datasets`` library.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from megatron_var.data.adapters import BadRow

logger = logging.getLogger(__name__)

DATASETS_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


class InputSource:
    """One input path; iterate to get ``(where, row)`` where row is a dict or a ``BadRow`` (malformed line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"--input {path}: no such file or directory")
        self._dataset = None
        if self.path.is_dir():
            self._dataset = _load_from_disk(self.path)
        elif self.path.suffix in DATASETS_SUFFIXES:
            self._dataset = _load_with_datasets(self.path, DATASETS_SUFFIXES[self.path.suffix])
        elif self.path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"--input {path}: unsupported file type (use .jsonl, .json, .parquet, .csv or a "
                             "datasets.save_to_disk directory)")

    def __len__(self) -> int:
        if self._dataset is not None:
            return len(self._dataset)
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip()) if not self._is_json_array() else len(self._json_array())

    def columns(self) -> set[str]:
        """Column names, for format detection (JSON: the keys of the first well-formed row)."""
        if self._dataset is not None:
            return set(self._dataset.column_names)
        for _, row in self:
            if isinstance(row, dict):
                return set(row)
        return set()

    def __iter__(self) -> Iterator[tuple[str, dict | BadRow]]:
        if self._dataset is not None:
            for k, row in enumerate(self._dataset):
                yield f"{self.path}:row {k + 1}", row
        elif self._is_json_array():
            for k, row in enumerate(self._json_array()):
                where = f"{self.path}:item {k + 1}"
                yield where, row if isinstance(row, dict) else BadRow(where, "malformed_json", "item is not an object")
        else:
            yield from self._iter_jsonl()

    def _iter_jsonl(self):
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield where, BadRow(where, "malformed_json", f"malformed JSON line ({e.msg} at column {e.colno})")
                    continue
                yield where, row if isinstance(row, dict) else BadRow(where, "malformed_json", "line is not an object")

    def _is_json_array(self) -> bool:
        if self.path.suffix != ".json":
            return False
        with open(self.path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        return head.startswith("[")

    def _json_array(self) -> list:
        if not hasattr(self, "_array"):
            try:
                self._array = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        return self._array


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
    with _quiet_datasets() as datasets:
        loader = datasets.Dataset.from_parquet if builder == "parquet" else datasets.Dataset.from_csv
        try:
            return loader(str(path))
        except Exception as e:  # datasets raises many types for unreadable files
            raise ValueError(f"--input {path}: cannot read as {builder} ({type(e).__name__}: {e})") from None


def _load_from_disk(path: Path):
    with _quiet_datasets() as datasets:
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise ValueError(
                f"--input {path}: not a datasets.save_to_disk directory ({type(e).__name__}: {e})"
            ) from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"--input {path}: a DatasetDict without a 'train' split (splits: {list(ds)}); "
                             f"pass {path}/<split> instead")
        logger.info("%s: DatasetDict, using its 'train' split", path)
        ds = ds["train"]
    return ds
