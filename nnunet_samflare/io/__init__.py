"""Scans and label maps on disk, below both inference and evaluation: finding cases (:mod:`.cases`), reading them
with every bad-input check (:mod:`.reading`, :mod:`.validation`) and writing outputs atomically (:mod:`.writing`).

Every problem with an input is an :class:`~nnunet_samflare.errors.InputError`, whose message is one line naming the
file and the cause; the ``samflare`` CLI prints it and exits with status 2.
"""

from nnunet_samflare.errors import InputError
from nnunet_samflare.io.cases import (
    DICOM_OUTPUT_ENDING,
    IMAGE_ENDINGS,
    Case,
    check_num_channels,
    find_cases,
    image_ending,
    list_image_files,
    strip_image_ending,
)
from nnunet_samflare.io.reading import nnunet_properties, read_case, read_header, read_label_map
from nnunet_samflare.io.validation import Geometry, Grid, check_geometry, check_grids_fit
from nnunet_samflare.io.writing import (
    TEMP_PREFIX,
    atomic_output,
    check_output_folder,
    remove_stale_temporaries,
    seg_to_image,
    temporary_path,
    write_image_atomic,
    write_json_atomic,
    write_seg_atomic,
)

__all__ = [
    "DICOM_OUTPUT_ENDING",
    "IMAGE_ENDINGS",
    "TEMP_PREFIX",
    "Case",
    "Geometry",
    "Grid",
    "InputError",
    "atomic_output",
    "check_geometry",
    "check_grids_fit",
    "check_num_channels",
    "check_output_folder",
    "find_cases",
    "image_ending",
    "list_image_files",
    "nnunet_properties",
    "read_case",
    "read_header",
    "read_label_map",
    "remove_stale_temporaries",
    "seg_to_image",
    "strip_image_ending",
    "temporary_path",
    "write_image_atomic",
    "write_json_atomic",
    "write_seg_atomic",
]
