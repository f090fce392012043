"""CelebAMask-HQ facts: attribute names, the 19-class part label map, the release's file layout.

Everything that knows the official layout lives here, so the synthetic generator (which writes it) and the
preparation job (which reads it) cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# The 40 CelebA attributes, in the header order of CelebAMask-HQ-attribute-anno.txt.
ATTRIBUTE_NAMES: tuple[str, ...] = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin",
    "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open",
    "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline",
    "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)
NUM_ATTRIBUTES = len(ATTRIBUTE_NAMES)

# Label 0 is background; labels 1..18 follow the official order. Parts are painted in this order, so a later
# part covers an earlier one where masks overlap (as the dataset's own g_mask.py does).
PART_NAMES: tuple[str, ...] = (
    "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)
PART_LABELS: dict[str, int] = {name: i + 1 for i, name in enumerate(PART_NAMES)}
NUM_PART_CLASSES = len(PART_NAMES) + 1  # with background

# The 10 face-part groups the conditional models use (the paper's mask channels).
DEFAULT_PART_GROUPS: dict[str, tuple[str, ...]] = {
    "hair": ("hair",),
    "hat": ("hat",),
    "eyeglasses": ("eye_g",),
    "eyes": ("l_eye", "r_eye"),
    "eyebrows": ("l_brow", "r_brow"),
    "nose": ("nose",),
    "mouth": ("mouth",),
    "lips": ("u_lip", "l_lip"),
    "ears": ("l_ear", "r_ear"),
    "earrings": ("ear_r",),
}

# Release layout, relative to the dataset root.
IMAGE_DIR = "CelebA-HQ-img"
MASK_DIR = "CelebAMask-HQ-mask-anno"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
MAPPING_FILE = "CelebA-HQ-to-CelebA-mapping.txt"
PARTITION_FILE = "list_eval_partition.txt"  # CelebA's, optional: the user adds it
MASKS_PER_FOLDER = 2000


def image_path(root: Path, image_id: int) -> Path:
    return Path(root) / IMAGE_DIR / f"{image_id}.jpg"


def mask_path(root: Path, image_id: int, part: str) -> Path:
    return Path(root) / MASK_DIR / str(image_id // MASKS_PER_FOLDER) / f"{image_id:05d}_{part}.png"


def paint_label_map(part_masks: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Merge binary part masks into one uint8 label map, later parts in PART_NAMES order on top."""
    label_map = np.zeros(shape, dtype=np.uint8)
    for name in PART_NAMES:
        mask = part_masks.get(name)
        if mask is not None:
            label_map[np.asarray(mask, dtype=bool)] = PART_LABELS[name]
    return label_map


def group_parts(label_maps: np.ndarray, groups: dict[str, tuple[str, ...]]) -> np.ndarray:
    """(..., H, W) label maps -> (..., G, H, W) binary float32 channels, one per part group."""
    channels = [np.isin(label_maps, [PART_LABELS[p] for p in parts]) for parts in groups.values()]
    return np.stack(channels, axis=-3).astype(np.float32)
