"""Procedural faces written in the official CelebAMask-HQ release layout: the embedded default dataset.

`write_synthetic_celebamask(out, n)` writes `CelebA-HQ-img/{id}.jpg` (size², JPEG q95), one binary mask per
present part under `CelebAMask-HQ-mask-anno/{id // 2000}/{id:05d}_{part}.png` at (size/2)² (0/255; even ids
1-channel "L", odd ids 3-channel RGB, as the release mixes both), the attribute file, the CelebA mapping file and
optionally a CelebA `list_eval_partition.txt` (id % 10 == 0 test, == 5 val, else train), so `prepare celebamask`
reads it exactly as it reads the real release. `render_face(id, size, seed)` is the ground truth of one record.

Every shape is an analytic function of normalised coordinates, evaluated twice: on a 2x supersampled image grid
(then box-filtered, for anti-aliasing) and on the mask grid (pixel centres). Parts are painted in PART_NAMES order
(decorations such as the beard right after their host part, inside its mask), so the image agrees with
`paint_label_map(part_masks)`. A part's mask is where the part is, even where a later part covers it (skin runs
under the eyes), except that ears, hair and neck exclude the face and the neck excludes the necklace, as their
visible extent is the truth. Masks are point-sampled, so thin parts can vanish at small sizes: none do at
size >= 128; at 64 brows, lips or narrow eyes sometimes do (accessory and mouth masks still match the attributes).

Attributes with a visible effect (VISIBLE_ATTRIBUTES):

| attribute           | pixels                                                              | part masks             |
|---------------------|---------------------------------------------------------------------|------------------------|
| Black/Blond/Brown/Gray_Hair | hair black / blond / brown / grey, brows a darker shade; none set: ginger | `hair` |
| Bald                | no hair at all (Male only); no hair colour, Bangs or hair style     | no `hair`              |
| Bangs               | fringe over the forehead down to just above the brows               | `hair` covers forehead |
| Receding_Hairline   | no hair at all inside the face outline (default: a thin hairline)   | `hair`                 |
| Wavy_Hair           | wavy hair outline                                                   | `hair`                 |
| Sideburns           | hair strips down the sides of the face (Male)                       | `hair`                 |
| Male                | short hair cap (female: long hair to below the chin, over the ears) | `hair`                 |
| No_Beard            | 0 (Male only): dark beard over jaw and chin, inside the skin        | (on `skin`)            |
| Goatee              | darker chin patch (only with a beard)                               | (on `skin`)            |
| Mustache            | dark band between nose and upper lip (Male)                         | (on `skin`)            |
| Eyeglasses          | near-black frames, bridge and arms; dark-tinted lenses over the eyes | `eye_g`               |
| Wearing_Hat         | saturated blue/green/purple dome + brim over the top of the head    | `hat`                  |
| Wearing_Earrings    | bright cyan discs at both ear lobes                                 | `ear_r`                |
| Wearing_Necklace    | golden arc across the neck                                          | `neck_l` (not `neck`)  |
| Wearing_Necktie     | dark red tie down the shirt (else a V neckline)                     | (on `cloth`)           |
| Smiling             | wider mouth, corners curved upwards                                 | `mouth`, `u_lip/l_lip` |
| Mouth_Slightly_Open | dark red-black gap between the lips (closed: lips touch)            | `mouth` only when open |
| Wearing_Lipstick    | lips saturated red (else muted, skin-derived)                       | `u_lip`, `l_lip`       |
| Big_Lips            | lips 1.5x thicker                                                   | `u_lip`, `l_lip`       |
| Pale_Skin           | skin (252,232,220) on face, nose, ears, neck; non-pale tones darker | (colour only)          |
| Heavy_Makeup        | purple eyeshadow above the eyes (only with lipstick)                | (on `skin`)            |
| Rosy_Cheeks         | pink blush on both cheeks                                           | (on `skin`)            |
| Narrow_Eyes         | eyes 40% flatter                                                    | `l_eye`, `r_eye`       |
| Arched_Eyebrows     | brows arched 2.5x higher                                            | `l_brow`, `r_brow`     |
| Bushy_Eyebrows      | brows 1.6x thicker                                                  | `l_brow`, `r_brow`     |
| Big_Nose            | nose tip 1.45x wider                                                | `nose`                 |
| Chubby / Oval_Face  | face 12% wider / 8% narrower and 4% taller                          | `skin` (and the rest)  |

The other attributes (5_o_Clock_Shadow, Attractive, Bags_Under_Eyes, Blurry, Double_Chin, High_Cheekbones,
Pointy_Nose, Straight_Hair, Young) are sampled with plausible probabilities and correlations (Straight_Hair only
when not wavy, High_Cheekbones mostly when smiling, Gray_Hair mostly when not Young) but change no pixel.
Background, skin tone, clothes, hat and iris colour and the face's position and scale vary per id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from facediff.data.celebamask import (
    ATTRIBUTE_FILE, ATTRIBUTE_NAMES, IMAGE_DIR, MAPPING_FILE, MASK_DIR, MASKS_PER_FOLDER, PART_NAMES, PARTITION_FILE,
    image_path, mask_path,
)
from facediff.data.synthetic.parallel import map_jobs
from facediff.data.staging import staged_output

VISIBLE_ATTRIBUTES: tuple[str, ...] = (
    "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Bald", "Bangs", "Receding_Hairline", "Wavy_Hair",
    "Sideburns", "Male", "No_Beard", "Goatee", "Mustache", "Eyeglasses", "Wearing_Hat", "Wearing_Earrings",
    "Wearing_Necklace", "Wearing_Necktie", "Smiling", "Mouth_Slightly_Open", "Wearing_Lipstick", "Big_Lips",
    "Pale_Skin", "Heavy_Makeup", "Rosy_Cheeks", "Narrow_Eyes", "Arched_Eyebrows", "Bushy_Eyebrows", "Big_Nose",
    "Chubby", "Oval_Face",
)

# Strong, distinct colours so a simple rule can read each attribute back from pixels.
HAIR_COLOURS: dict[str | None, tuple[int, int, int]] = {
    "Black_Hair": (28, 24, 24), "Blond_Hair": (236, 204, 112), "Brown_Hair": (122, 72, 36),
    "Gray_Hair": (178, 178, 184), None: (196, 82, 38),  # None: no hair colour attribute set -> ginger
}
SKIN_TONES = ((232, 190, 160), (210, 160, 125), (180, 126, 92), (150, 100, 72))
PALE_SKIN = (252, 232, 220)
LIPSTICK = (205, 22, 48)
HAT_COLOURS = ((34, 64, 196), (28, 142, 72), (124, 44, 164))
EARRING = (0, 230, 255)
FRAME = (18, 18, 24)
MOUTH = (48, 12, 20)
_IRIS = ((92, 56, 30), (60, 110, 170), (70, 120, 70))
_CELEBA_SIZE = 202599  # CelebA's image count: orig_idx is an affine bijection of id modulo it
_HAIR_DRAW = (("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", None), (0.30, 0.22, 0.28, 0.03, 0.17),
              (0.25, 0.10, 0.20, 0.35, 0.10))  # names, P(young), P(old)


@dataclass(frozen=True)
class SyntheticFace:
    image: np.ndarray  # (size, size, 3) uint8 RGB, exactly what was JPEG-encoded
    part_masks: dict[str, np.ndarray]  # part name -> (size//2, size//2) bool, only parts present
    attributes: np.ndarray  # (40,) int8 in {0,1}, ATTRIBUTE_NAMES order


# ------------------------------------------------------------------------------------------ attributes
def _sample_attributes(rng: np.random.Generator) -> dict[str, bool]:
    a = dict.fromkeys(ATTRIBUTE_NAMES, False)

    def p(prob: float) -> bool:
        return bool(rng.random() < prob)

    male = a["Male"] = p(0.4)
    young = a["Young"] = p(0.75)
    a["Bald"] = male and p(0.2)
    if not a["Bald"]:
        names, p_young, p_old = _HAIR_DRAW
        colour = names[rng.choice(len(names), p=p_young if young else p_old)]
        if colour is not None:
            a[colour] = True
        a["Bangs"] = p(0.3 if male else 0.4)
        a["Receding_Hairline"] = not a["Bangs"] and p(0.15)
        a["Wavy_Hair"] = p(0.3)
        a["Straight_Hair"] = not a["Wavy_Hair"] and p(0.4)
        a["Sideburns"] = male and p(0.3)
    beard = male and p(0.5)
    a["No_Beard"] = not beard
    a["Goatee"] = beard and p(0.4)
    a["Mustache"] = male and p(0.5 if beard else 0.15)
    a["5_o_Clock_Shadow"] = male and not beard and p(0.3)
    a["Eyeglasses"] = p(0.3)
    a["Wearing_Hat"] = p(0.25)
    a["Wearing_Earrings"] = p(0.05 if male else 0.55)
    a["Wearing_Necklace"] = p(0.05 if male else 0.25)
    a["Wearing_Necktie"] = male and p(0.2)
    a["Smiling"] = p(0.5)
    a["High_Cheekbones"] = p(0.75 if a["Smiling"] else 0.2)
    a["Mouth_Slightly_Open"] = p(0.45)
    a["Pale_Skin"] = p(0.3)
    a["Wearing_Lipstick"] = not male and p(0.55)
    a["Heavy_Makeup"] = a["Wearing_Lipstick"] and p(0.7)
    a["Rosy_Cheeks"] = p(0.15 if male else 0.25)
    a["Arched_Eyebrows"] = p(0.1 if male else 0.45)
    a["Bushy_Eyebrows"] = p(0.3 if male else 0.08)
    a["Narrow_Eyes"] = p(0.15)
    a["Big_Nose"] = p(0.25)
    a["Pointy_Nose"] = not a["Big_Nose"] and p(0.3)
    a["Big_Lips"] = p(0.25)
    a["Chubby"] = p(0.1)
    a["Double_Chin"] = p(0.5 if a["Chubby"] else 0.03)
    a["Oval_Face"] = not a["Chubby"] and p(0.3)
    a["Attractive"] = p(0.6 if young else 0.3)
    a["Bags_Under_Eyes"] = p(0.1 if young else 0.45)
    a["Blurry"] = p(0.05)
    return a


# -------------------------------------------------------------------------------------------- geometry
def _shapes(a: dict[str, bool], g: dict[str, float], X: np.ndarray, Y: np.ndarray) -> dict[str, np.ndarray]:
    """Every part and decoration as a bool mask on the grid X (1, n), Y (n, 1) of pixel centres in [0, 1]."""
    cx, cy, s, rx, ry = g["cx"], g["cy"], g["s"], g["rx"], g["ry"]

    def ell(x, y, ax, ay):
        return ((X - x) / ax) ** 2 + ((Y - y) / ay) ** 2 <= 1

    def box(x0, x1, y0, y1):
        return (X >= x0) & (X <= x1) & (Y >= y0) & (Y <= y1)

    def curve(x0, half_width):  # t in [-1, 1] across a feature, and w = 1 - t² (0 at its ends)
        t = (X - x0) / half_width
        return np.abs(t) < 1, np.clip(1 - t**2, 0, 1)

    sh: dict[str, np.ndarray] = {}
    face = sh["skin"] = ell(cx, cy, rx, ry)
    ey, dx = cy - 0.03 * s, 0.085 * s  # eye line, eye offset from the centre line
    my = cy + 0.16 * s  # mouth line
    sides = ((0, -1), (1, 1))  # (index, sign): l_* on the image's left

    # Skin decorations.
    lower = (((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 >= 0.45) & (Y > cy + 0.03 * s)
    sh["beard"] = face & (lower | (Y > my + 0.02 * s)) if not a["No_Beard"] else face & False
    sh["goatee"] = face & ell(cx, my + 0.065 * s, 0.055 * s, 0.065 * s) & a["Goatee"]
    sh["mustache"] = face & box(cx - 0.07 * s, cx + 0.07 * s, cy + 0.11 * s, my - 0.01 * s) & a["Mustache"]
    sh["cheeks"] = face & (ell(cx - 0.11 * s, cy + 0.07 * s, 0.04 * s, 0.03 * s)
                           | ell(cx + 0.11 * s, cy + 0.07 * s, 0.04 * s, 0.03 * s)) & a["Rosy_Cheeks"]
    sh["shadow"] = face & (ell(cx - dx, ey - 0.012 * s, 0.05 * s, 0.03 * s)
                           | ell(cx + dx, ey - 0.012 * s, 0.05 * s, 0.03 * s)) & a["Heavy_Makeup"]

    nw = (0.046 if a["Big_Nose"] else 0.032) * s
    sh["nose"] = box(cx - 0.012 * s, cx + 0.012 * s, ey + 0.01 * s, cy + 0.06 * s)  # bridge
    sh["nose"] |= ell(cx, cy + 0.075 * s, nw, 0.028 * s)  # tip
    sh["nostrils"] = sh["nose"] & (ell(cx - 0.45 * nw, cy + 0.087 * s, 0.011 * s, 0.007 * s)
                                   | ell(cx + 0.45 * nw, cy + 0.087 * s, 0.011 * s, 0.007 * s))

    inner = [ell(cx + k * dx, ey, 0.05 * s, 0.035 * s) for _, k in sides]
    outer = [ell(cx + k * dx, ey, 0.066 * s, 0.051 * s) for _, k in sides]
    arms = face & (Y >= ey - 0.016 * s) & (Y <= ey - 0.002 * s) & (np.abs(X - cx) >= dx + 0.05 * s)
    bridge = box(cx - dx + 0.05 * s, cx + dx - 0.05 * s, ey - 0.016 * s, ey - 0.002 * s)
    sh["eye_g"] = (outer[0] | outer[1] | bridge | arms) & a["Eyeglasses"]
    sh["lenses"] = sh["eye_g"] & (inner[0] | inner[1])
    sh["frame"] = sh["eye_g"] & ~sh["lenses"]

    ery = (0.011 if a["Narrow_Eyes"] else 0.019) * s
    bt, arch = (0.016 if a["Bushy_Eyebrows"] else 0.01) * s, (0.02 if a["Arched_Eyebrows"] else 0.008) * s
    for i, k in sides:
        side = "lr"[i]
        eye = sh[f"{side}_eye"] = ell(cx + k * dx, ey, 0.038 * s, ery)
        sh[f"{side}_iris"] = eye & ell(cx + k * dx, ey, 0.017 * s, 0.017 * s)
        sh[f"{side}_pupil"] = eye & ell(cx + k * dx, ey, 0.007 * s, 0.007 * s)
        inside, w = curve(cx + k * dx, 0.05 * s)
        sh[f"{side}_brow"] = inside & (np.abs(Y - (ey - 0.055 * s - arch * w)) <= bt * (0.5 + 0.5 * np.sqrt(w)))
        ear = ell(cx + k * rx, ey + 0.035 * s, 0.04 * s, 0.065 * s)
        sh[f"{side}_ear"] = ear & ~face
        sh[f"{side}_inner_ear"] = sh[f"{side}_ear"] & ell(cx + k * (rx + 0.015 * s), ey + 0.035 * s, 0.014 * s,
                                                           0.04 * s)

    # Mouth: lips around a centre line that curves up at the corners when smiling; open -> a gap between them.
    inside, w = curve(cx, (0.085 if a["Smiling"] else 0.07) * s)
    centre = my - (0.03 if a["Smiling"] else 0.0) * s * (1 - w)
    gap = (0.045 * s if a["Mouth_Slightly_Open"] else 0.0) * w / 2
    thick = (1.5 if a["Big_Lips"] else 1.0) * s * np.sqrt(w)
    sh["mouth"] = inside & (Y >= centre - gap) & (Y < centre + gap)
    sh["u_lip"] = inside & (Y < centre - gap) & (Y >= centre - gap - 0.02 * thick)
    sh["l_lip"] = inside & (Y >= centre + gap) & (Y < centre + gap + 0.026 * thick)

    # Hair: a cap (male) or a cap with long sides (female), minus the face below the hairline.
    if a["Bald"]:
        sh["hair"] = face & False
    else:
        wave = 0.05 * np.sin(np.arctan2(Y - cy, X - cx) * 16) if a["Wavy_Hair"] else 0.0
        hx, hy = rx + (0.03 if a["Male"] else 0.05) * s, ry + (0.03 if a["Male"] else 0.05) * s
        hair = ((X - cx) / hx) ** 2 + ((Y - cy + 0.04 * s) / hy) ** 2 <= (1 + wave) ** 2
        if a["Male"]:
            hair &= Y < ey - 0.01 * s
        else:
            sway = 0.012 * s * np.sin(Y * 90) if a["Wavy_Hair"] else 0.0
            hair &= Y < cy - 0.04 * s
            hair |= (np.abs(X - cx) <= hx + sway) & (Y >= cy - 0.04 * s) & (Y <= cy + ry + 0.06 * s)
        if a["Bangs"]:
            hairline = ey - 0.075 * s + 0.01 * s * np.sin(X * 150)
        else:
            hairline = cy - ry + (0.0 if a["Receding_Hairline"] else 0.06 * s)
        hair &= ~(face & (Y > hairline))
        if a["Sideburns"]:
            hair |= face & (np.abs(X - cx) >= rx - 0.035 * s) & (Y >= ey - 0.06 * s) & (Y <= ey + 0.07 * s)
        sh["hair"] = hair

    base = cy - ry + 0.07 * s  # the hat's brim line, across the upper forehead
    sh["hat"] = ((ell(cx, base, rx + 0.04 * s, ry * 0.75) & (Y <= base))
                 | ell(cx, base, rx + 0.1 * s, 0.03 * s)) & a["Wearing_Hat"]
    sh["hat_band"] = sh["hat"] & (Y >= base - 0.045 * s) & (Y <= base - 0.02 * s)
    sh["ear_r"] = (ell(cx - rx - 0.012 * s, ey + 0.1 * s, 0.025 * s, 0.025 * s)
                   | ell(cx + rx + 0.012 * s, ey + 0.1 * s, 0.025 * s, 0.025 * s)) & a["Wearing_Earrings"]

    neck = box(cx - 0.085 * s, cx + 0.085 * s, cy, 2.0) & ~face
    ny = cy + ry - 0.02 * s
    sh["neck_l"] = neck & ell(cx, ny, 0.1 * s, 0.11 * s) & ~ell(cx, ny, 0.085 * s, 0.09 * s) & (Y > ny)
    sh["neck_l"] &= a["Wearing_Necklace"]
    sh["neck"] = neck & ~sh["neck_l"]
    top = cy + ry + 0.13 * s  # shoulders
    cloth = ell(cx, top + 0.23 * s, 0.4 * s, 0.23 * s) | ((Y >= top + 0.23 * s) & (np.abs(X - cx) <= 0.4 * s))
    if a["Wearing_Necktie"]:
        sh["tie"] = cloth & (np.abs(X - cx) <= 0.02 * s + 0.12 * (Y - top)) & (Y >= top)
    else:
        cloth &= Y >= top + 0.1 * s - 1.4 * np.abs(X - cx)  # V neckline
        sh["tie"] = cloth & False
    sh["cloth"] = cloth
    return sh


# Decorations painted right after their host part: (host, shape, colour key, alpha).
_DECORATIONS = (
    ("skin", "cheeks", "blush", 0.4), ("skin", "shadow", "eyeshadow", 0.55), ("skin", "beard", "beard", 1.0),
    ("skin", "goatee", "goatee", 1.0), ("skin", "mustache", "goatee", 1.0), ("nose", "nostrils", "nostril", 1.0),
    ("eye_g", "frame", "frame", 1.0),
    ("l_eye", "l_iris", "iris", 1.0), ("l_eye", "l_pupil", "pupil", 1.0),
    ("r_eye", "r_iris", "iris", 1.0), ("r_eye", "r_pupil", "pupil", 1.0),
    # Tinted lenses in front of both eyes, so painted after the last eye (the label map keeps the eyes, seen
    # through the lens, as CelebAMask-HQ's does). Clear lenses left the eyes white: at the demo's 32 px and a
    # factor-4 latent, frames around white eyes averaged to the same grey as bare eyes and the VQ lost them.
    ("r_eye", "lenses", "lens", 0.85),
    ("l_ear", "l_inner_ear", "inner_ear", 1.0), ("r_ear", "r_inner_ear", "inner_ear", 1.0),
    ("hat", "hat_band", "hat_band", 1.0), ("cloth", "tie", "tie", 1.0),
)


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n, dtype=np.float32) + 0.5) / n
    return c[None, :], c[:, None]


def render_face(image_id: int, size: int = 256, seed: int = 0) -> SyntheticFace:
    """One face, its part masks and attributes; depends only on (image_id, size, seed)."""
    if size < 16 or size % 2:
        raise ValueError(f"size must be even and at least 16, got {size}")
    rng = np.random.default_rng([seed, image_id])
    a = _sample_attributes(rng)
    s = rng.uniform(0.92, 1.06)
    g = {"cx": 0.5 + rng.uniform(-0.03, 0.03), "cy": 0.46 + rng.uniform(-0.02, 0.02), "s": s,
         "rx": 0.2 * s * (1.12 if a["Chubby"] else 0.92 if a["Oval_Face"] else 1.0),
         "ry": 0.265 * s * (1.04 if a["Oval_Face"] else 1.0)}
    skin = np.array(PALE_SKIN if a["Pale_Skin"] else SKIN_TONES[rng.integers(len(SKIN_TONES))], float)
    skin = np.clip(skin + rng.uniform(-5, 5), 0, 255)
    hair = np.array(HAIR_COLOURS[next((h for h in _HAIR_DRAW[0] if h and a[h]), None)], float)
    brow = hair * 0.7 if not a["Bald"] else np.array([70.0, 50, 40])
    colours = {
        "skin": skin, "nose": skin * 0.94, "nostril": skin * 0.55, "l_ear": skin * 0.95, "r_ear": skin * 0.95,
        "inner_ear": skin * 0.8, "neck": skin * 0.85, "blush": np.array([235.0, 95, 110]),
        "eyeshadow": np.array([140.0, 70, 150]), "beard": 0.15 * hair + 0.85 * np.array([30.0, 24, 20]),
        "goatee": np.array([24.0, 18, 16]), "lens": np.array([40.0, 48, 70]), "frame": np.array(FRAME, float),
        "l_eye": np.array([245.0, 245, 242]), "r_eye": np.array([245.0, 245, 242]), "pupil": np.zeros(3),
        "iris": np.array(_IRIS[rng.integers(len(_IRIS))], float), "l_brow": brow, "r_brow": brow,
        "mouth": np.array(MOUTH, float), "hair": hair, "hat": np.array(HAT_COLOURS[rng.integers(3)], float),
        "ear_r": np.array(EARRING, float), "neck_l": np.array([240.0, 190, 40]),
        "cloth": rng.uniform(20, 230, 3), "tie": np.array([150.0, 20, 35]),
    }
    colours["hat_band"] = colours["hat"] * 0.5
    lips = np.array(LIPSTICK, float) if a["Wearing_Lipstick"] else skin * 0.72 + np.array([40.0, 0, 0])
    colours["u_lip"] = colours["l_lip"] = lips
    background = rng.uniform(40, 220, 3)

    # Image: paint on a 2x grid, box-filter down (anti-aliased edges), then soft light and faint sensor noise.
    X, Y = _grid(2 * size)
    sh = _shapes(a, g, X, Y)
    img = np.empty((2 * size, 2 * size, 3), np.float32)
    img[:] = background * (1.1 - 0.2 * Y)[..., None]
    for part in PART_NAMES:
        for host, shape, key, alpha in ((part, part, part, 1.0), *[d for d in _DECORATIONS if d[0] == part]):
            if key not in colours:
                continue  # eye_g: only its lens tint and frame decorations are painted
            m = sh[shape]
            img[m] = (1 - alpha) * img[m] + alpha * colours[key]
    img = img.reshape(size, 2, size, 2, 3).mean(axis=(1, 3))
    X, Y = _grid(size)
    img *= (1.05 - 0.25 * ((X - 0.42) ** 2 + (Y - 0.38) ** 2))[..., None]
    img += np.random.default_rng([seed, image_id, size]).normal(0, 2.0, img.shape)
    image = np.clip(np.rint(img), 0, 255).astype(np.uint8)

    # Masks: the same shapes sampled at the mask resolution's pixel centres.
    masks = _shapes(a, g, *_grid(size // 2))
    part_masks = {p: masks[p] for p in PART_NAMES if masks[p].any()}
    attributes = np.array([a[name] for name in ATTRIBUTE_NAMES], dtype=np.int8)
    return SyntheticFace(image=image, part_masks=part_masks, attributes=attributes)


# ------------------------------------------------------------------------------------------------ writer
def _write_one(job: tuple[Path, int, int, int]) -> np.ndarray:
    out, image_id, size, seed = job
    face = render_face(image_id, size, seed)
    Image.fromarray(face.image).save(image_path(out, image_id), format="JPEG", quality=95)
    for part, mask in face.part_masks.items():
        pixels = mask.astype(np.uint8) * 255
        if image_id % 2:  # the release has both 1- and 3-channel masks
            pixels = np.repeat(pixels[..., None], 3, axis=2)
        Image.fromarray(pixels).save(mask_path(out, image_id, part), format="PNG")
    return face.attributes


def _orig_idx(image_id: int) -> int:
    return (image_id * 100_003 + 4_321) % _CELEBA_SIZE  # 100003 is prime and does not divide 202599


def write_synthetic_celebamask(
    out: Path,
    n: int,
    size: int = 256,
    seed: int = 0,
    with_partition: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> None:
    """Write faces 0..n-1 under `out` in the official CelebAMask-HQ layout; output is independent of `workers`."""
    out = Path(out)
    if not 0 < n <= _CELEBA_SIZE:
        raise ValueError(f"--n {n}: the number of faces must be in 1..{_CELEBA_SIZE} (CelebA's size)")
    if size < 16 or size % 2:
        raise ValueError(f"--size {size}: the image side must be even and at least 16")
    # written beside `out` and swapped in whole: a smaller tree never leaves masks of a larger one behind
    owned = (IMAGE_DIR, MASK_DIR, ATTRIBUTE_FILE, MAPPING_FILE, PARTITION_FILE)
    with staged_output(out, owned, last=ATTRIBUTE_FILE) as staging:
        image_path(staging, 0).parent.mkdir(parents=True, exist_ok=True)
        for folder in range((n - 1) // MASKS_PER_FOLDER + 1):
            (staging / MASK_DIR / str(folder)).mkdir(parents=True, exist_ok=True)
        jobs = [(staging, i, size, seed) for i in range(n)]
        attributes = map_jobs(_write_one, jobs, workers, desc="synthetic faces", progress=progress)

        rows = [f"{i}.jpg  " + " ".join("1" if v else "-1" for v in row) for i, row in enumerate(attributes)]
        (staging / ATTRIBUTE_FILE).write_text("\n".join([str(n), " ".join(ATTRIBUTE_NAMES), *rows]) + "\n")
        files = [f"{_orig_idx(i) + 1:06d}.jpg" for i in range(n)]
        mapping = [f"{i:<7d} {_orig_idx(i):<9d} {files[i]}" for i in range(n)]
        (staging / MAPPING_FILE).write_text("\n".join(["idx     orig_idx  orig_file", *mapping]) + "\n")
        if with_partition:  # exactly ceil(n/10) test images, so tiny sets still have a test split
            part = [f"{files[i]} {2 if i % 10 == 0 else 1 if i % 10 == 5 else 0}"
                    for i in sorted(range(n), key=_orig_idx)]
            (staging / PARTITION_FILE).write_text("\n".join(part) + "\n")
