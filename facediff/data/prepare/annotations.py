"""Strict parsers for CelebAMask-HQ's text files. A malformed file stops the job with its path and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from facediff.data.celebamask import ATTRIBUTE_NAMES, NUM_ATTRIBUTES


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and the line."""


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise AnnotationError(f"{path}: required file not found")
    try:
        return path.read_text().splitlines()
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not a text file ({err})") from None


def _image_id(token: str, path: Path, line_no: int) -> int:
    stem, dot, ext = token.partition(".")
    if not stem.isdigit() or ext.lower() not in ("jpg", "png"):
        raise AnnotationError(f"{path}:{line_no}: expected an image name like '123.jpg', got {token!r}")
    return int(stem)


def read_attributes(path: Path) -> dict[int, np.ndarray]:
    """`CelebAMask-HQ-attribute-anno.txt` -> {id: (40,) int8 in {0,1}} in ATTRIBUTE_NAMES order."""
    lines = _lines(path)
    if len(lines) < 2:
        raise AnnotationError(f"{path}: expected a count line and a header line, file has {len(lines)} lines")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise AnnotationError(f"{path}:1: expected the number of images, got {lines[0].strip()!r}") from None
    header = lines[1].split()
    if sorted(header) != sorted(ATTRIBUTE_NAMES) or len(header) != NUM_ATTRIBUTES:
        unknown = sorted(set(header) - set(ATTRIBUTE_NAMES))
        missing = sorted(set(ATTRIBUTE_NAMES) - set(header))
        raise AnnotationError(
            f"{path}:2: expected the {NUM_ATTRIBUTES} CelebA attribute names, got {len(header)} "
            f"(unknown {unknown}, missing {missing})"
        )
    to_canonical = [header.index(name) for name in ATTRIBUTE_NAMES]
    table: dict[int, np.ndarray] = {}
    for line_no, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != NUM_ATTRIBUTES + 1:
            raise AnnotationError(
                f"{path}:{line_no}: expected an image name and {NUM_ATTRIBUTES} values, got {len(fields)} fields"
            )
        image_id = _image_id(fields[0], path, line_no)
        if image_id in table:
            raise AnnotationError(f"{path}:{line_no}: image {fields[0]} listed twice")
        bad = [v for v in fields[1:] if v not in ("1", "-1")]
        if bad:
            raise AnnotationError(f"{path}:{line_no}: attribute values must be 1 or -1, got {bad[:3]}")
        values = np.array([int(v) for v in fields[1:]], dtype=np.int8)[to_canonical]
        table[image_id] = (values > 0).astype(np.int8)
    if len(table) != count:
        raise AnnotationError(f"{path}:1: announces {count} images but lists {len(table)}")
    return table


def read_mapping(path: Path) -> dict[int, str]:
    """`CelebA-HQ-to-CelebA-mapping.txt` -> {CelebA-HQ id: original CelebA file name}."""
    lines = _lines(path)
    mapping: dict[int, str] = {}
    for line_no, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields or (line_no == 1 and fields[0] == "idx"):
            continue
        if len(fields) != 3 or not fields[0].isdigit() or not fields[1].isdigit():
            raise AnnotationError(f"{path}:{line_no}: expected 'idx orig_idx orig_file', got {line.strip()!r}")
        mapping[int(fields[0])] = fields[2]
    return mapping


def read_partition(path: Path) -> dict[str, int]:
    """CelebA's `list_eval_partition.txt` -> {original file name: 0 train | 1 val | 2 test}."""
    partition: dict[str, int] = {}
    for line_no, line in enumerate(_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise AnnotationError(f"{path}:{line_no}: expected '<file> 0|1|2', got {line.strip()!r}")
        partition[fields[0]] = int(fields[1])
    return partition
