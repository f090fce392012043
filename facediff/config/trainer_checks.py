"""Checks of the `trainer` section that need tables: Ray's resource names and the DeepSpeed keys facediff sets.

Resource names. Ray schedules on names: a worker asking for a name no node has is never placed, and Ray waits
for it without a word. At load (no cluster to ask) a name that is a known Ray resource spelt another way
(`CPUS`, `cpu`, `Gpu`) is refused with the right spelling; any other unknown name may be a custom resource a
cluster declares (`ray start --resources='{"ssd": 1}'`), so it is checked against the running cluster when the
run starts (`facediff/train/placement.py`).

DeepSpeed keys. `trainer.deepspeed` is laid last over the DeepSpeed config facediff builds
(`facediff/train/engine.py`); a key facediff sets from its own config there would silently override it (and
disagree with what facediff computes from its own key: steps per kimg, the learning-rate schedule, the memory
estimate), or be silently ignored (DeepSpeed's `optimizer`/`scheduler` beside facediff's client optimizer).
"""

from __future__ import annotations

import difflib
from typing import Any

from facediff.config.types import ConflictingKeys

# Ray's predefined resources and the accelerators it detects (ray/_private/accelerators: get_resource_name)
RAY_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory", "TPU", "NPU", "HPU", "neuron_cores", "FURIOSA",
                 "MBLT", "RBLN", "TTNPU")
RAY_RESOURCE_PREFIXES = ("accelerator_type:", "node:", "TPU-")


def is_ray_resource(name: str) -> bool:
    return name in RAY_RESOURCES or name.startswith(RAY_RESOURCE_PREFIXES)


def misspelt_resource(name: str) -> str | None:
    """The Ray resource `name` is a misspelling of (other case, a plural, a typo), or None."""
    if is_ray_resource(name):
        return None
    for known in RAY_RESOURCES:
        if name.lower() == known.lower() or name.lower().rstrip("s") == known.lower():
            return known
    close = difflib.get_close_matches(name, ("CPU", "GPU", "memory", "object_store_memory"), n=1, cutoff=0.75)
    return close[0] if close else None


def refuse_misspelt_resources(resources: dict[str, float], section: str = "",
                              field: str = "resources_per_worker") -> None:
    """ConflictingKeys naming the first misspelt Ray resource of a resources mapping (the key `field` of the config
    section `section`, e.g. "trainer", in messages; its key paths are relative to that section)."""
    for name in resources:
        if known := misspelt_resource(name):
            key = f"{section}.{field}" if section else field
            raise ConflictingKeys(
                f"{key}.{name}: not a Ray resource; did you mean {known}? (names are case-sensitive; command "
                f"line: `~{key}.{name}` drops it, `{key}:={{{known}: ...}}` replaces the mapping)",
                keys=[(field, name)])


# DeepSpeed config key (a path into it) -> the facediff key that sets it
DEEPSPEED_OWNED: dict[tuple[str, ...], str] = {
    ("train_micro_batch_size_per_gpu",): "trainer.batch_size",
    ("train_batch_size",): "trainer.batch_size and trainer.grad_accum (x trainer.num_workers)",
    ("gradient_accumulation_steps",): "trainer.grad_accum",
    ("gradient_clipping",): "optimizer.grad_clip",
    ("zero_optimization", "stage"): "trainer.zero_stage",
    ("bf16", "enabled"): "trainer.precision",
    ("fp16", "enabled"): "trainer.precision",
    ("amp",): "trainer.precision",
    ("torch_autocast",): "trainer.gpu.autocast",
    ("optimizer",): "the optimizer section (facediff's AdamW is passed to DeepSpeed, which then ignores this)",
    ("scheduler",): "optimizer.schedule, optimizer.warmup_steps and optimizer.min_lr_ratio (facediff's schedule "
                    "is passed to DeepSpeed)",
}


def owned_deepspeed_keys(config: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """The keys of a `trainer.deepspeed` mapping that facediff sets itself, each with the facediff key to use."""
    found = []
    for path, instead in DEEPSPEED_OWNED.items():
        node: Any = config
        for key in path:
            node = node.get(key, KeyError) if isinstance(node, dict) else KeyError
        if node is not KeyError:
            found.append((path, instead))
    return found
