"""The strict parsers of CelebAMask-HQ's text files: good files parse, malformed ones name file and line."""

from pathlib import Path

import numpy as np
import pytest

from facediff.data.prepare.annotations import AnnotationError, read_attributes, read_mapping, read_partition
from facediff.data.celebamask import ATTRIBUTE_NAMES


def attribute_file(path: Path, rows: list[str], count: int | None = None, header=ATTRIBUTE_NAMES) -> Path:
    lines = [str(len(rows) if count is None else count), " ".join(header), *rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def row(image_id: int, values) -> str:
    return f"{image_id}.jpg  " + " ".join(str(v) for v in values)  # real file: double space after the name


def test_attributes_parse_to_multi_hot(tmp_path):
    values = [1 if k % 3 == 0 else -1 for k in range(40)]
    table = read_attributes(attribute_file(tmp_path / "a.txt", [row(0, values), row(7, [-1] * 40)]))
    assert sorted(table) == [0, 7]
    assert table[0].dtype == np.int8 and table[0].tolist() == [1 if k % 3 == 0 else 0 for k in range(40)]
    assert table[7].sum() == 0


def test_attributes_reordered_header_is_mapped_to_canonical_order(tmp_path):
    header = list(reversed(ATTRIBUTE_NAMES))
    values = [-1] * 40
    values[0] = 1  # "Young" in the reversed header
    table = read_attributes(attribute_file(tmp_path / "a.txt", [row(3, values)], header=header))
    assert table[3][ATTRIBUTE_NAMES.index("Young")] == 1 and table[3].sum() == 1


@pytest.mark.parametrize(
    "rows, count, header, message",
    [
        ([row(0, [1] * 39)], None, ATTRIBUTE_NAMES, r"a.txt:3: expected an image name and 40 values, got 40 fields"),
        ([row(0, [1] * 39 + [0])], None, ATTRIBUTE_NAMES, r"a.txt:3: attribute values must be 1 or -1, got \['0'\]"),
        (["zero.jpg " + "1 " * 40], None, ATTRIBUTE_NAMES, r"a.txt:3: expected an image name like '123.jpg'"),
        ([row(0, [1] * 40), row(0, [1] * 40)], None, ATTRIBUTE_NAMES, r"a.txt:4: image 0.jpg listed twice"),
        ([row(0, [1] * 40)], 5, ATTRIBUTE_NAMES, r"a.txt:1: announces 5 images but lists 1"),
        ([row(0, [1] * 40)], None, ATTRIBUTE_NAMES[:-1] + ("Old",), r"a.txt:2: expected the 40 CelebA attribute"),
    ],
)
def test_malformed_attribute_file_names_line(tmp_path, rows, count, header, message):
    with pytest.raises(AnnotationError, match=message):
        read_attributes(attribute_file(tmp_path / "a.txt", rows, count=count, header=header))


def test_attribute_count_line_must_be_a_number(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("thirty\n" + " ".join(ATTRIBUTE_NAMES) + "\n")
    with pytest.raises(AnnotationError, match=r"a.txt:1: expected the number of images, got 'thirty'"):
        read_attributes(path)
    with pytest.raises(AnnotationError, match="required file not found"):
        read_attributes(tmp_path / "missing.txt")


def test_mapping_and_partition(tmp_path):
    mapping = tmp_path / "m.txt"
    mapping.write_text("idx         orig_idx        orig_file\n0  119613  119614.jpg\n1  99094  099095.jpg\n")
    assert read_mapping(mapping) == {0: "119614.jpg", 1: "099095.jpg"}
    partition = tmp_path / "p.txt"
    partition.write_text("119614.jpg 2\n099095.jpg 0\n")
    assert read_partition(partition) == {"119614.jpg": 2, "099095.jpg": 0}
    mapping.write_text("idx orig_idx orig_file\n0 119613\n")
    with pytest.raises(AnnotationError, match=r"m.txt:2: expected 'idx orig_idx orig_file'"):
        read_mapping(mapping)
    partition.write_text("119614.jpg 2\n099095.jpg test\n")
    with pytest.raises(AnnotationError, match=r"p.txt:2: expected '<file> 0\|1\|2'"):
        read_partition(partition)
