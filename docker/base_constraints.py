"""Print a pip constraints file that pins the packages the base image compiled together.

Why: the NGC PyTorch image ships a source-built torch (e.g. ``2.10.0a0+b4e4ee81d3``) with
Transformer Engine, apex and flash-attn compiled against it. A plain ``pip install`` of a
package that asks for ``torch>=X`` could pull a PyPI torch over it and silently break TE/apex.
Pinning every such package to its installed version makes pip keep them, or fail loudly.

Usage (in the Dockerfile):  python docker/base_constraints.py > /tmp/base-constraints.txt
"""
from __future__ import annotations

import importlib.metadata as md
import sys

# Distributions built into (or against) the base image's torch; absent ones are skipped.
KEEP = (
    "torch",
    "torchvision",
    "torchaudio",
    "triton",
    "pytorch-triton",
    "transformer-engine",
    "transformer-engine-torch",
    "transformer-engine-cu12",
    "transformer-engine-cu13",
    "apex",
    "flash-attn",
    "numpy",
)


def constraint_lines(names: tuple[str, ...] = KEEP) -> list[str]:
    """``name==installed_version`` for each installed distribution in ``names``."""
    lines = []
    for name in names:
        try:
            lines.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            continue
    return lines


def main() -> int:
    lines = constraint_lines()
    if not any(line.startswith("torch==") for line in lines):
        print("base_constraints.py: torch is not installed in this image; "
              "BASE_IMAGE must be an NGC PyTorch image", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
