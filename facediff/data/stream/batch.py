"""Decoded rows -> the tensors a task reads, made on the device that consumes them.

Ray Data ships rows in their compact form (`stream.decode_batch`): images and label maps as uint8, a quarter of
float32's bytes through the object store and the host-to-device copy, and part masks not at all (G float
channels a row, ten times the label map with the default groups). `finish_batch` turns them into what the tasks
read, after the batch reached the worker's device:

    "image" uint8 (B,3,S,S)  ->  float32 in [-1, 1]
    "parts" uint8 (B,S,S)    ->  also "part_masks" float32 (B,G,S,S), one {0,1} channel per part group
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from facediff.data.celebamask import NUM_PART_CLASSES, PART_LABELS

PartGroups = Mapping[str, tuple[str, ...]]
# Columns read on the host, left on the CPU so reading them never waits for the GPU: the loop's bookkeeping
# (consumed ids, epochs, traces), what prompts are made from (attributes for sd_lora, COCO captions) and the
# face boxes a task selects from (the ControlNet's face crops). A task that needs one on the device copies it
# there itself (`non_blocking`: the batch is pinned on a GPU worker).
HOST_COLUMNS = ("id", "epoch", "flipped", "attributes", "caption", "face_boxes", "face_valid")


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1] (the inverse of `sampling.to_uint8`)."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def part_group_table(groups: PartGroups, device: torch.device | str | None = None) -> torch.Tensor:
    """(NUM_PART_CLASSES, G) float32: row k is the one-hot group membership of label k (background in none)."""
    unknown = sorted({p for parts in groups.values() for p in parts} - set(PART_LABELS))
    if unknown or not groups:
        raise ValueError(f"part_groups: empty or unknown part names {unknown} (known: {sorted(PART_LABELS)})")
    table = torch.zeros(NUM_PART_CLASSES, len(groups))
    for column, parts in enumerate(groups.values()):
        table[[PART_LABELS[p] for p in parts], column] = 1.0
    return table.to(device)


def part_masks(parts: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """(B, S, S) label maps -> (B, G, S, S) float32 group masks (`table`: `part_group_table`), on the label
    maps' device: one table lookup."""
    return table.to(parts.device)[parts.long()].permute(0, 3, 1, 2).contiguous()


def finish_batch(batch: dict[str, torch.Tensor], part_groups: PartGroups | None = None,
                 device: torch.device | str | None = None, part_table: torch.Tensor | None = None,
                 ) -> dict[str, torch.Tensor]:
    """The batch a task reads, from the compact one the loader yields (see the module docstring). With `device`,
    every column but HOST_COLUMNS is copied there first (asynchronously from pinned memory), still compact.
    `part_table` is `part_group_table(part_groups)` built once by a caller that finishes many batches (kept on
    their device, it costs no copy per batch). Images that are already float (a batch built by hand) are left as
    they are."""
    out = dict(batch)
    if device is not None:
        out = {k: v if k in HOST_COLUMNS else v.to(device, non_blocking=True) for k, v in out.items()}
    if out.get("image") is not None and out["image"].dtype == torch.uint8:
        out["image"] = images_to_float(out["image"])
    if part_groups is not None:
        if "parts" not in out:
            raise ValueError("part groups were asked for, but the batch has no 'parts' label maps (COCO shards have "
                             "none): set data.part_groups to none")
        table = part_table if part_table is not None else part_group_table(part_groups)
        out["part_masks"] = part_masks(out["parts"], table)
    return out
