"""FLARE23 label ids (docs/method.md §1). Pure Python: shared by training, inference and evaluation."""

FLARE_LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "right kidney",
    3: "spleen",
    4: "pancreas",
    5: "aorta",
    6: "inferior vena cava",
    7: "right adrenal gland",
    8: "left adrenal gland",
    9: "gallbladder",
    10: "esophagus",
    11: "stomach",
    12: "duodenum",
    13: "left kidney",
    14: "tumor",
}

ORGAN_LABELS: tuple[int, ...] = tuple(range(1, 14))
TUMOR_LABEL: int = 14
ALL_FOREGROUND_LABELS: tuple[int, ...] = ORGAN_LABELS + (TUMOR_LABEL,)
