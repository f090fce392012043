"""Simple people scenes written in the official COCO 2017 layout: the embedded stand-in for `prepare coco`.

`write_synthetic_coco(out, n)` writes `train2017/` and `val2017/` JPEGs named `{id:012d}.jpg` (640x480, 480x640
or 640x427 at the default size), `annotations/instances_{split}2017.json` (person id 1 plus `sports ball` and
`chair`) and `annotations/captions_{split}2017.json` (5 captions per image), so `prepare coco` reads it exactly as
it reads the real release. `render_scene(index, size, seed)` is the ground truth of one image; the writer also
saves all of it as `truth.json` beside the tree (ignored by `prepare coco`).

A person is a head ellipse, a torso, legs and two arms: one COCO annotation with four polygons (head, torso,
legs, arms). Faces come in two kinds, alternating per person, so that MTCNN finds most of them: a procedural
face of `synthetic.render_face` (only ids whose attributes MTCNN handles well: no beard, bangs or big lips),
clipped to the head ellipse, or one of the 100 LFW photo faces that ship with scikit-image
(`skimage.data.lfw_subset()`, 25x25 grey), tinted with a skin tone and blended into the head.

Scenes cycle through kinds by index (`index % 8`) so every small tree exercises selection and geometry:

| kind    | people                                                                                       |
|---------|----------------------------------------------------------------------------------------------|
| people  | 1-3 large people; person area >= 0.14 of the image                                           |
| edge    | landscape, 2 large people plus a small one entirely outside the centre square, first by id   |
| none    | no person; only chairs and balls                                                             |
| crowd   | 1-2 large people in front of a crowd band annotated once with iscrowd=1 (uncompressed RLE); |
|         | the first person's segmentation is written as compressed RLE instead of polygons            |
| small   | 1-3 small people; person area <= 0.06 (below the default `--min-person-area`)                |

Annotation and caption ids are random and written in shuffled order, so readers must sort by id themselves.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from facediff.data.celebamask import ATTRIBUTE_NAMES
from facediff.data.prepare.coco import PERSON_CATEGORY_ID, captions_path, image_path, instances_path
from facediff.data.staging import staged_output
from facediff.data.synthetic.parallel import map_jobs
from facediff.data.synthetic.celebamask import render_face

CATEGORIES = [
    {"id": PERSON_CATEGORY_ID, "name": "person", "supercategory": "person"},
    {"id": 37, "name": "sports ball", "supercategory": "sports"},
    {"id": 62, "name": "chair", "supercategory": "furniture"},
]
KINDS = ("people", "people", "edge", "none", "people", "crowd", "small", "people")  # by index % 8
PEOPLE_MIN_AREA, SMALL_MAX_AREA = 0.14, 0.06
COLOURS = {
    "blue": (52, 92, 190), "green": (60, 150, 70), "red": (180, 50, 45), "yellow": (225, 200, 60),
    "grey": (128, 128, 128), "purple": (120, 70, 160), "orange": (230, 130, 40), "white": (235, 235, 228),
}
BACKGROUNDS = ("wall", "field", "patterned wall", "textured wall")
SKIN = ((236, 198, 170), (214, 166, 128), (176, 122, 88), (128, 86, 60))
HAIR = ((28, 24, 24), (120, 72, 36), (200, 170, 100), (70, 50, 40))
_EASY_FACE = {"No_Beard": 1, "Bangs": 0, "Big_Lips": 0}  # attributes MTCNN finds most reliably (measured)
_COUNT_WORDS = {1: "a person", 2: "two people", 3: "three people"}


def image_id_of(index: int) -> int:
    return 1000 + 37 * index  # sparse, like COCO's ids


def split_of(index: int, val_fraction: float) -> str:
    """Every image whose index crosses a multiple of 1/val_fraction is val: an even spread, exact share."""
    return "val" if int((index + 1) * val_fraction + 1e-9) > int(index * val_fraction + 1e-9) else "train"


# ----------------------------------------------------------------------------------------------- shapes
def _ellipse(cx: float, cy: float, ax: float, ay: float, n: int = 24) -> list[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.round(np.stack([cx + ax * np.cos(t), cy + ay * np.sin(t)], 1), 2).ravel().tolist()


def _person_polygons(x: float, top: float, height: float, spread: float) -> tuple[list[list[float]], list[float]]:
    """Head, torso, legs and arms polygons (flat x, y lists) of a person `height` tall; plus the head box."""
    head_h = 0.2 * height
    ax, ay = 0.38 * head_h, 0.5 * head_h
    hy = top + ay
    shoulders, hips, feet = top + 0.95 * head_h, top + 0.55 * height, top + height
    sw, hw, arm, gap = 0.36 * height, 0.26 * height, 0.08 * height, 0.03 * height
    torso = [x - sw / 2, shoulders, x + sw / 2, shoulders, x + hw / 2, hips, x - hw / 2, hips]
    legs = [x - hw / 2, hips, x + hw / 2, hips, x + hw / 2, feet, x + gap, feet, x, hips + 0.12 * height,
            x - gap, feet, x - hw / 2, feet]
    arms = []
    for k in (-1, 1):
        inner, outer, low = x + k * sw / 2, x + k * (sw / 2 + arm), shoulders + 0.38 * height
        arms.append([inner, shoulders, outer, shoulders + 0.02 * height, outer + k * spread, low,
                     inner + k * spread, low])
    polygons = [_ellipse(x, hy, ax, ay), [round(v, 2) for v in torso], [round(v, 2) for v in legs]]
    polygons += [[round(v, 2) for v in a] for a in arms]
    return polygons, [x - ax, hy - ay, x + ax, hy + ay]


def person_width(height: float, spread: float) -> float:
    return (0.36 + 2 * 0.08) * height + 2 * spread


def _bbox(polygons: list[list[float]]) -> list[float]:
    xy = np.concatenate([np.reshape(p, (-1, 2)) for p in polygons])
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    return [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's iscrowd encoding: run lengths over the column-major pixels, starting with a (maybe empty) 0 run."""
    flat = mask.flatten(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"counts": ([0] if flat[0] else []) + runs, "size": list(mask.shape)}


# ------------------------------------------------------------------------------------------------ faces
@lru_cache(maxsize=1)
def _lfw_faces() -> np.ndarray:
    from skimage.data import lfw_subset

    return lfw_subset()[:100]  # the first 100 of the 200 are faces, the rest are not


def _procedural_face(rng: np.random.Generator, seed: int) -> np.ndarray:
    index = {name: i for i, name in enumerate(ATTRIBUTE_NAMES)}
    face_id = int(rng.integers(0, 100_000))
    while True:
        face = render_face(face_id, 128, seed)
        if all(face.attributes[index[name]] == value for name, value in _EASY_FACE.items()):
            return face.image[16:106, 26:102]  # the face and its hair, as render_face places them
        face_id += 1


def _paste_head(image: Image.Image, rng: np.random.Generator, head: list[float], photo: bool, seed: int) -> str:
    """Draw a face into the head box; returns which kind of face it is."""
    x0, y0, x1, y1 = (int(round(v)) for v in head)
    w, h = max(x1 - x0, 2), max(y1 - y0, 2)
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2
    if photo:
        grey = _lfw_faces()[rng.integers(100)]
        skin = np.array(SKIN[rng.integers(len(SKIN))], float)
        face = np.asarray(Image.fromarray((grey * 255).astype(np.uint8)).resize((w, int(h * 0.78)),
                                                                                 Image.Resampling.BICUBIC))
        patch = np.empty((h, w, 3), np.float32)
        patch[:] = HAIR[rng.integers(len(HAIR))]
        top = h - face.shape[0] - h // 20
        patch[top:top + face.shape[0]] = np.clip(face[..., None] / 160.0 * skin, 0, 255)
        alpha = np.clip((1.0 - inside) * 4, 0, 1)  # soft edge inside the ellipse
    else:
        face = _procedural_face(rng, seed)
        patch = np.asarray(Image.fromarray(face).resize((w, h), Image.Resampling.LANCZOS), np.float32)
        alpha = (inside <= 1).astype(np.float32)
    region = np.asarray(image.crop((x0, y0, x0 + w, y0 + h)), np.float32)
    blended = region * (1 - alpha[..., None]) + patch * alpha[..., None]
    image.paste(Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8)), (x0, y0))
    return "photo" if photo else "procedural"


# ------------------------------------------------------------------------------------------------ scene
def _background(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, str, str]:
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    base = np.array(COLOURS[colour], np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(base * (1.15 - 0.3 * y), (height, width, 3)).copy()
    if kind == "field":  # ground below a pale sky
        horizon = int(height * rng.uniform(0.45, 0.65))
        pixels[:horizon] = np.array([170, 200, 235], np.float32) * (0.9 + 0.2 * y[:horizon])
    if kind == "textured wall":
        coarse = rng.normal(0, 18, (height // 8 + 1, width // 8 + 1, 1)).astype(np.float32)
        pixels += np.kron(coarse, np.ones((8, 8, 1), np.float32))[:height, :width]
    image = Image.fromarray(np.clip(pixels + rng.normal(0, 3, pixels.shape), 0, 255).astype(np.uint8))
    if kind == "patterned wall":
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(4, 9))):
            cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.03, 0.12) * width
            fill = tuple(int(v) for v in rng.uniform(30, 230, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([cx - r, cy - r, cx + r, cy + r], fill=fill)
    return image, colour, kind


def _objects(rng: np.random.Generator, width: int, height: int) -> list[dict[str, Any]]:
    objects = []
    for _ in range(int(rng.integers(1, 3))):
        x, y = rng.uniform(0.1, 0.9) * width, rng.uniform(0.55, 0.9) * height
        r = rng.uniform(0.04, 0.08) * min(width, height)
        if rng.random() < 0.5:
            objects.append({"category_id": 37, "name": "ball", "polygon": _ellipse(x, y, r, r, 16)})
        else:
            objects.append({"category_id": 62, "name": "chair",
                            "polygon": [x - r, y - 2 * r, x + r, y - 2 * r, x + r, y + r, x - r, y + r]})
    return objects


def _layout(rng: np.random.Generator, kind: str, width: int, height: int) -> list[tuple[float, float, float, float]]:
    """(centre x, top, height, arm spread) of each person, left to right."""
    if kind == "none":
        return []
    count = int(rng.integers(1, 3 if kind in ("edge", "crowd") else 4))
    if kind == "edge":
        count = 2
    lo, hi = (0.18, 0.3) if kind == "small" else (0.62, 0.92)
    people = []
    for j in range(count):
        h = rng.uniform(lo, hi) * height
        spread = rng.uniform(0, 0.06) * h
        slot = (j + 0.5) / count if kind != "edge" else 0.38 + 0.24 * j
        x = np.clip((slot + rng.uniform(-0.06, 0.06)) * width, 0.3 * h, width - 0.3 * h)
        people.append((float(x), float(rng.uniform(0.02, 0.98) * (height - h)), float(h), float(spread)))
    if kind == "edge":  # narrow enough to fit in the margin the centre crop removes
        h = 0.25 * height
        margin = (width - height) / 2
        people.insert(0, (margin / 2, height - h - 2.0, h, 0.0))
    return people


def _crowd(rng: np.random.Generator, image: Image.Image) -> np.ndarray:
    width, height = image.size
    mask = Image.new("L", image.size, 0)
    draws = (ImageDraw.Draw(image), ImageDraw.Draw(mask))
    y = rng.uniform(0.3, 0.45) * height
    for x in np.arange(rng.uniform(0, 0.05) * width, width, 0.06 * width):
        r = 0.025 * height
        fill = tuple(int(v) for v in rng.uniform(40, 200, 3))
        for draw, value in zip(draws, (fill, 255)):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=value)
            draw.rectangle([x - 1.6 * r, y + r, x + 1.6 * r, y + 4 * r], fill=value)
    return np.asarray(mask) > 0


def render_scene(index: int, size: int = 640, seed: int = 0, val_fraction: float = 0.2) -> tuple[np.ndarray, dict]:
    """One scene's RGB pixels and its truth: id, split, size, captions, persons, crowd regions, objects."""
    rng = np.random.default_rng([seed, index])
    kind = KINDS[index % len(KINDS)]
    shape = (size, size * 3 // 4) if kind == "edge" else [(size, size * 3 // 4), (size * 3 // 4, size),
                                                          (size, size * 2 // 3)][rng.integers(3)]
    width, height = shape
    for _ in range(50):  # redraw until the person area is on its side of the selection threshold
        image, colour, background = _background(rng, width, height)
        objects = _objects(rng, width, height)
        draw = ImageDraw.Draw(image)
        for obj in objects:
            draw.polygon(obj["polygon"], fill=tuple(int(v) for v in rng.uniform(20, 240, 3)))
        crowd = _crowd(rng, image) if kind == "crowd" else None
        persons = []
        for j, (x, top, h, spread) in enumerate(_layout(rng, kind, width, height)):
            polygons, head = _person_polygons(x, top, h, spread)
            shirt, trousers = (tuple(int(v) for v in rng.uniform(20, 235, 3)) for _ in range(2))
            for polygon, fill in zip(polygons[1:], (shirt, trousers, shirt, shirt)):
                draw.polygon(polygon, fill=fill)
            face = _paste_head(image, rng, head, photo=(index + j) % 2 == 1, seed=seed)
            persons.append({"polygons": polygons, "bbox": _bbox(polygons), "head_box": head, "face": face})
        rles = [mask_utils.merge(mask_utils.frPyObjects(p["polygons"], height, width)) for p in persons]
        if crowd is not None:
            rles.append(mask_utils.encode(np.asfortranarray(crowd.astype(np.uint8))))
        area = float(mask_utils.area(mask_utils.merge(rles, intersect=0))) / (width * height) if rles else 0.0
        if kind == "none" or (area <= SMALL_MAX_AREA if kind == "small" else area >= PEOPLE_MIN_AREA):
            break
    else:
        raise RuntimeError(f"scene {index}: no layout with the person area its kind {kind!r} needs")

    ids = iter(rng.choice(np.arange(1, 10**6), size=len(persons) + len(objects) + 7, replace=False).tolist())
    person_ids = [int(next(ids)) for _ in persons]
    for p, i in zip(persons, sorted(person_ids) if kind == "edge" else person_ids):
        p["id"] = i  # the edge person comes first in id order, so the persons after it must be renumbered
    if kind == "crowd":  # one person as compressed RLE instead of polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(persons[0]["polygons"], height, width))
        persons[0]["rle"] = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    crowd_regions = [{"id": int(next(ids)), **uncompressed_rle(crowd)}] if crowd is not None else []
    for obj in objects:
        obj["id"] = int(next(ids))
    caption_ids = sorted(int(next(ids)) for _ in range(5))
    truth = {
        "index": index, "id": image_id_of(index), "split": split_of(index, val_fraction), "kind": kind,
        "file_name": f"{image_id_of(index):012d}.jpg", "width": width, "height": height, "person_area": area,
        "persons": sorted(persons, key=lambda p: p["id"]), "crowd": crowd_regions, "objects": objects,
        "captions": [{"id": i, "caption": c} for i, c in zip(caption_ids, _captions(rng, kind, len(persons),
                                                                                      colour, background, objects))],
    }
    return np.asarray(image), truth


def _captions(rng: np.random.Generator, kind: str, count: int, colour: str, background: str,
              objects: list[dict]) -> list[str]:
    scene = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {background}"
    thing = f"a {objects[0]['name']}" if objects else "nothing"
    if kind == "none":
        options = [f"{thing} in front of {scene}", f"an empty scene with {scene}", f"a photo of {scene}",
                   f"{scene} and {thing}, nobody around", f"no people, just {thing} by {scene}"]
    else:
        who = "small figures far away" if kind == "small" else _COUNT_WORDS.get(count, "several people")
        if kind == "crowd":
            who += " with a crowd behind"
        options = [f"{who} standing in front of {scene}", f"{who} posing in front of {scene}",
                   f"a photo of {who} against {scene}", f"{who} next to {thing}", f"{scene} behind {who}"]
    return [options[i] for i in rng.permutation(len(options))]


# ------------------------------------------------------------------------------------------------ writer
def _write_one(job: tuple[Path, int, int, int, float]) -> dict:
    out, index, size, seed, val_fraction = job
    pixels, truth = render_scene(index, size, seed, val_fraction)
    Image.fromarray(pixels).save(image_path(out, truth["split"], truth["id"]), format="JPEG", quality=92)
    return truth


def _annotation_files(scenes: list[dict], seed: int) -> tuple[dict, dict]:
    images, annotations, captions = [], [], []
    for s in scenes:
        images.append({"id": s["id"], "file_name": s["file_name"], "width": s["width"], "height": s["height"],
                       "license": 1, "coco_url": "", "date_captured": ""})
        size = (s["height"], s["width"])
        for p in s["persons"]:
            rle = mask_utils.merge(mask_utils.frPyObjects(p["polygons"], *size))
            annotations.append({"id": p["id"], "image_id": s["id"], "category_id": PERSON_CATEGORY_ID,
                                "segmentation": p.get("rle", p["polygons"]), "area": float(mask_utils.area(rle)),
                                "bbox": p["bbox"], "iscrowd": 0})
        for c in s["crowd"]:
            rle = mask_utils.frPyObjects({"counts": c["counts"], "size": c["size"]}, *size)
            annotations.append({"id": c["id"], "image_id": s["id"], "category_id": PERSON_CATEGORY_ID,
                                "segmentation": {"counts": c["counts"], "size": c["size"]},
                                "area": float(mask_utils.area(rle)),
                                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)], "iscrowd": 1})
        for o in s["objects"]:
            annotations.append({"id": o["id"], "image_id": s["id"], "category_id": o["category_id"],
                                "segmentation": [o["polygon"]], "area": 0.0, "bbox": _bbox([o["polygon"]]),
                                "iscrowd": 0})
        captions += [{"id": c["id"], "image_id": s["id"], "caption": c["caption"]} for c in s["captions"]]
    rng = np.random.default_rng([seed, 1])
    info = {"description": "facediff synthetic people scenes", "version": "1.0", "year": 2017}
    instances = {"info": info, "licenses": [{"id": 1, "name": "generated", "url": ""}], "images": images,
                 "annotations": [annotations[i] for i in rng.permutation(len(annotations))],
                 "categories": CATEGORIES}
    return instances, {"info": info, "licenses": instances["licenses"], "images": images,
                       "annotations": [captions[i] for i in rng.permutation(len(captions))]}


def write_synthetic_coco(
    out: str | Path,
    n: int,
    size: int = 640,
    seed: int = 0,
    val_fraction: float = 0.2,
    workers: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """Write scenes 0..n-1 under `out` in the COCO 2017 layout plus `truth.json`; returns the truth list."""
    out = Path(out)
    if n < 1:
        raise ValueError(f"--n {n}: the number of scenes must be at least 1")
    if size < 96:
        raise ValueError(f"--size {size}: the longer image side must be at least 96")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    # written beside `out` and swapped in whole, so a failed or smaller run leaves no stale scenes behind
    owned = ("train2017", "val2017", "annotations", "truth.json")
    with staged_output(out, owned, last="truth.json") as staging:
        for split in ("train", "val"):
            image_path(staging, split, 0).parent.mkdir(parents=True, exist_ok=True)
        instances_path(staging, "train").parent.mkdir(parents=True, exist_ok=True)
        jobs = [(staging, i, size, seed, val_fraction) for i in range(n)]
        scenes = map_jobs(_write_one, jobs, workers, desc="synthetic coco", progress=progress)
        for split in ("train", "val"):
            instances, captions = _annotation_files([s for s in scenes if s["split"] == split], seed)
            instances_path(staging, split).write_text(json.dumps(instances))
            captions_path(staging, split).write_text(json.dumps(captions))
        (staging / "truth.json").write_text(json.dumps(scenes))
    return scenes


def read_truth(root: str | Path) -> list[dict]:
    return json.loads((Path(root) / "truth.json").read_text())
