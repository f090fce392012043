"""`make gpu-wheels`: the cp312 x86-64 wheels the GPU machine lacks, pinned to uv.lock, into `.gpu-wheels/`.

The GPU machine (device README, KINDS.md) runs Python 3.12 with torch, transformers, peft, accelerate,
torchmetrics, pyarrow, aiohttp, msgpack, psutil, py-cpuinfo, ninja, einops, ... but no ray, deepspeed, diffusers,
pydantic, facenet-pytorch or open_clip_torch, and nothing can be downloaded there. This downloads (here, where PyPI is reachable)
exactly the distributions in WHEELS at the versions uv.lock pins, with --no-deps, and

- slims ray's wheel: drops `ray/jars/ray_dist.jar` (Java workers only), the dashboard's `*.js.map` files and
  web UI, and ray.rllib/serve/llm, with their RECORD lines (75.6 -> ~39.5 MiB), so the wheels fit into one
  device call (64 MiB with the working tree);
- builds deepspeed's wheel from its sdist (PyPI has no wheel; the result is pure Python, ~2 MB).

    python3 tools/gpu_check/wheels.py [--out .gpu-wheels] [--max-mib 58]

Run with any Python that has pip (3.11 here): `pip download --python-version 3.12` resolves for the device.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Distributions the device lacks that `facediff train/sample` (ray.train/tune/data, deepspeed, diffusers, the
# pydantic config, facenet-pytorch's MTCNN ONet weights for `fd_mtcnn_onet`) import. Checked by importing the
# whole check under Python 3.12 with only the device's package list installed (see README in this folder).
WHEELS = [
    "ray",
    "deepspeed",
    "diffusers",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "facenet-pytorch",
    "hjson",  # deepspeed
    "jsonschema",  # ray (runtime_env validation, imported by ray.init) ...
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "tensorboardx",  # ray.train / ray.tune's TensorBoard logger
    "typing-extensions",  # pydantic 2.14 needs >= 4.16; the device's may be older (50 kB)
    # the SD presets' exact CLIP tokenizer under --random-weights reads the BPE file inside open_clip's package
    # (clip_tokenizer.py finds it without importing open_clip); ftfy and wcwidth make `import open_clip` work
    # too (its tokenizer imports ftfy at module import; timm, its other import, is on the device)
    "open-clip-torch",
    "ftfy",
    "wcwidth",
]
SOURCE_ONLY = {"deepspeed"}  # built here with `pip wheel --no-deps` from the sdist
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
RAY_DROP_SUFFIXES = (".js.map",)
RAY_DROP_FILES = ("ray/jars/ray_dist.jar",)
# libraries facediff does not use (each imported only on its own use) and the dashboard's web UI, which needs
# ray[default]'s packages that the device lacks anyway: ~4 MiB more
RAY_DROP_PREFIXES = ("ray/rllib/", "ray/serve/", "ray/llm/", "ray/dashboard/client/build/")
MIB = 2**20


# The device's interpreter and platform, for the markers of a lock that pins a package at several versions
DEVICE_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def _marker(text: str):
    try:
        from packaging.markers import Marker
    except ImportError:  # a bare Python: pip's own copy
        from pip._vendor.packaging.markers import Marker
    return Marker(text)


def locked_versions(lock_text: str | None = None) -> dict[str, str]:
    """name -> the version uv.lock pins for the device. uv locks all supported Pythons at once; where they need
    different versions of a package, each entry lists the `resolution-markers` it is for: keep the one for 3.12."""
    lock = tomllib.loads((ROOT / "uv.lock").read_text() if lock_text is None else lock_text)
    versions = {}
    for package in lock["package"]:
        markers = package.get("resolution-markers")
        if markers and not any(_marker(m).evaluate(DEVICE_MARKERS) for m in markers):
            continue
        versions[package["name"]] = package["version"]
    return versions


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def download(name: str, version: str, dest: Path) -> None:
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
        "--implementation", "cp", *plat, "-d", str(dest), f"{name}=={version}")


def build(name: str, version: str, dest: Path) -> None:
    pip("wheel", "--quiet", "--no-deps", "--no-binary", name, "-w", str(dest), f"{name}=={version}")


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _record_name(names) -> str:
    """The wheel's own RECORD (`NAME-VERSION.dist-info/RECORD`): ray vendors packages with dist-info folders too."""
    return next(n for n in names if n.count("/") == 1 and n.endswith(".dist-info/RECORD"))


def slim_ray(wheel: Path) -> tuple[int, int]:
    """Rewrite the wheel without the Java jar and the dashboard's source maps; returns (files dropped, bytes)."""
    tmp = wheel.with_suffix(".slim")
    dropped, dropped_bytes = 0, 0
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        def drop(name: str) -> bool:
            return name in RAY_DROP_FILES or name.endswith(RAY_DROP_SUFFIXES) or name.startswith(RAY_DROP_PREFIXES)

        record_name = _record_name(i.filename for i in src.infolist())
        for info in src.infolist():
            if drop(info.filename):
                dropped, dropped_bytes = dropped + 1, dropped_bytes + info.file_size
                continue
            if info.filename == record_name:
                continue
            dst.writestr(info, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
        lines = src.read(record_name).decode().splitlines()
        kept = [line for line in lines if line and not drop(line.split(",", 1)[0])]
        dst.writestr(src.getinfo(record_name), ("\n".join(kept) + "\n").encode(), compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(wheel)
    return dropped, dropped_bytes


def check_record(wheel: Path) -> None:
    """Every file in the wheel is in RECORD with its hash, and every RECORD line names a file in the wheel."""
    with zipfile.ZipFile(wheel) as z:
        names = {i.filename for i in z.infolist() if not i.is_dir()}
        record_name = _record_name(names)
        rows = {}
        for line in z.read(record_name).decode().splitlines():
            if line:
                path, digest, _size = line.rsplit(",", 2)
                rows[path] = digest
        missing, extra = names - set(rows), set(rows) - names
        bad = [p for p, d in rows.items() if d and p in names and _record_hash(z.read(p)) != d]
        if missing or extra or bad:
            raise SystemExit(f"{wheel.name}: RECORD mismatch: not listed {sorted(missing)[:3]}, "
                             f"listed but absent {sorted(extra)[:3]}, wrong hash {bad[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu-wheels")
    parser.add_argument("--max-mib", type=float, default=58.0)
    args = parser.parse_args()
    versions = locked_versions()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-wheels-") as tmp:
        tmp = Path(tmp)
        for name in WHEELS:
            if name not in versions:
                raise SystemExit(f"{name} is not in uv.lock")
            (build if name in SOURCE_ONLY else download)(name, versions[name], tmp)
        got = sorted(tmp.glob("*.whl"))
        if len(got) != len(WHEELS):
            raise SystemExit(f"expected {len(WHEELS)} wheels, got {[w.name for w in got]}")
        for old in args.out.glob("*.whl"):  # one version of each: two stop the whole install on the device
            old.unlink()
        for wheel in got:
            shutil.move(str(wheel), args.out / wheel.name)
    ray_wheel = next(args.out.glob("ray-*.whl"))
    before = ray_wheel.stat().st_size
    dropped, dropped_bytes = slim_ray(ray_wheel)
    print(f"slimmed {ray_wheel.name}: {before / MIB:.1f} -> {ray_wheel.stat().st_size / MIB:.1f} MiB "
          f"({dropped} files, {dropped_bytes / MIB:.1f} MiB uncompressed dropped)")
    total = 0
    print(f"\n{'wheel':<72} {'MiB':>7}")
    for wheel in sorted(args.out.glob("*.whl")):
        check_record(wheel)
        total += wheel.stat().st_size
        print(f"{wheel.name:<72} {wheel.stat().st_size / MIB:7.2f}")
    print(f"{'total':<72} {total / MIB:7.2f}")
    if total > args.max_mib * MIB:
        raise SystemExit(f"{args.out}: {total / MIB:.1f} MiB is over --max-mib {args.max_mib}")


if __name__ == "__main__":
    main()
