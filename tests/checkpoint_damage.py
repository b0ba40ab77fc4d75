"""Ways to damage or craft a checkpoint file, shared by the unit, e2e and distributed integrity tests."""

import os
import pickle
from pathlib import Path

from megatron_var.checkpoint import integrity as checkpoint_integrity


def flip64(path: Path) -> None:
    """Invert 64 bytes in the middle of the file (same size: only the hash can tell)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class Payload:
    """Unpickling it creates ``marker`` (stands for arbitrary code)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def craft_metadata(ckpt_dir: Path, marker: Path) -> None:
    """Hide a ``Payload`` inside the real ``.metadata`` of ``ckpt_dir`` and give the directory a matching manifest,
    as an attacker would (so the restricted unpickler, not the checksums, has to stop it)."""
    with open(ckpt_dir / ".metadata", "rb") as f:
        md = pickle.load(f)  # our own, real file
    md.planner_data = Payload(marker)
    with open(ckpt_dir / ".metadata", "wb") as f:
        pickle.dump(md, f)
    checkpoint_integrity.write_manifest(ckpt_dir)
