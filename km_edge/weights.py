"""What a ``--weights`` string means: no weights, a local file, or a name the architecture knows.

Torch-free (``km_edge.config`` reads the project's ``[base] weights`` with it at CLI start-up);
``km_edge.models`` decides names and loads files with the same rule.
"""

from __future__ import annotations

from pathlib import Path

NO_WEIGHTS = (None, "", "none", "None")  # random weights (drawn once and saved, see config.random_base_name)
WEIGHTS_FILE_SUFFIXES = (".pth", ".pt")


def is_weights_file(weights: str | Path) -> bool:
    """A weights string names a local file when it ends in .pth/.pt (present or not: a missing file
    is then refused as a file) or when such a file exists; anything else is a weights name."""
    path = Path(weights)
    return path.suffix in WEIGHTS_FILE_SUFFIXES or path.is_file()
