"""The example dataset that ships with the package (``flare_like``: real CT, FLARE23 label ids; see README.md).

``samflare demo`` and the tests train and predict on it, so a fresh install needs nothing beside it.
"""

from __future__ import annotations

from pathlib import Path

#: nnU-Net raw dataset folder of the example (``imagesTr``, ``labelsTr``, ``dataset.json``).
FLARE_LIKE = Path(__file__).resolve().parent / "flare_like"


def example_dataset() -> Path:
    """The example dataset's folder; a clear error if the installation lost it."""
    if not (FLARE_LIKE / "dataset.json").is_file():
        raise FileNotFoundError(f"{FLARE_LIKE}: the example dataset is missing from this installation")
    return FLARE_LIKE
