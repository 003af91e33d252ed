"""Splitting a folder's cases over several jobs the way ``nnUNetv2_predict -num_parts N -part_id K`` does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from nnunet_samflare.errors import InputError

T = TypeVar("T")


def select_part(items: Sequence[T], num_parts: int = 1, part_id: int = 0) -> list[T]:
    """Part ``part_id`` of ``num_parts`` of ``items`` (already in nnU-Net's order: sorted by case id): every
    ``num_parts``-th item from position ``part_id``, as nnU-Net's ``predict_from_files`` slices its case list, so
    the parts together hold every item exactly once."""
    if num_parts < 1:
        raise InputError(None, f"--num_parts must be at least 1, not {num_parts}")
    if not 0 <= part_id < num_parts:
        raise InputError(None, f"--part_id must be between 0 and num_parts - 1 = {num_parts - 1}, not {part_id}")
    return list(items[part_id::num_parts])
