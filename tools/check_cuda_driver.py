"""Set-up check of a node's NVIDIA driver against the CUDA the locked torch was built with (cluster.yaml runs it
after `uv sync`): a node whose driver is too old, or whose torch cannot see its GPUs, fails its set-up here with
one line, instead of the first training step failing on it.

    .venv/bin/python tools/check_cuda_driver.py [--expect-gpu]        # this node (nvidia-smi + torch)
    python tools/check_cuda_driver.py --driver 535.183.01 [--minimum 580.65.06]   # the decision alone

The torch wheels bundle their CUDA runtime (uv.lock: torch 2.15.0+cu132, CUDA 13.2); the only host part they
need is the driver. NVIDIA's "CUDA Minor Version Compatibility" table: an application built with any CUDA 13.x
runs on a driver >= 580 (12.x: >= 525); the versions below are the drivers the x.0 GA toolkits shipped with.
Minor version compatibility leaves out PTX JIT of newer PTX; the wheels carry native code for A100/H100
(sm_80/sm_90), which needs none.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys

MINIMUM_DRIVER = {13: "580.65.06", 12: "525.60.13"}  # CUDA major -> oldest Linux driver (minor version compat.)


def parse_version(text: str) -> tuple[int, ...]:
    """`580.65.06` -> (580, 65, 6): compared part by part as numbers (580.100 is newer than 580.65)."""
    try:
        return tuple(int(part) for part in text.strip().split("."))
    except ValueError:
        raise ValueError(f"not a driver version: {text.strip()!r} (expected numbers like 580.65.06)") from None


def driver_verdict(driver: str, minimum: str, needed_by: str) -> tuple[int, str]:
    """Exit code and the one line to print for `driver` against `minimum`."""
    if parse_version(driver) < parse_version(minimum):
        return 1, (f"error: NVIDIA driver {driver} is older than {minimum}, the oldest that runs {needed_by}; "
                   f"start this node from an image with driver >= {minimum} (cluster.yaml: ImageId)")
    return 0, f"NVIDIA driver {driver} >= {minimum} ({needed_by}): ok"


def installed_driver() -> str | None:
    """The driver version nvidia-smi reports (the first GPU's: one driver serves them all); None without it."""
    if shutil.which("nvidia-smi") is None:
        return None
    done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                          capture_output=True, text=True)
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode != 0 or not lines:
        raise RuntimeError(lines[0] if lines else f"exit code {done.returncode}, no output")
    return lines[0]


def _version_arg(text: str) -> str:
    try:
        parse_version(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", type=_version_arg,
                        help="decide for this driver version instead of this node's (no nvidia-smi, no torch check)")
    parser.add_argument("--minimum", type=_version_arg,
                        help="the oldest driver to accept (default: by the CUDA major of the installed torch)")
    parser.add_argument("--expect-gpu", action="store_true",
                        help="this node must have a GPU: no NVIDIA driver here is an error, not a CPU node")
    args = parser.parse_args(argv)

    driver = args.driver
    if driver is None:
        try:
            driver = installed_driver()
        except RuntimeError as err:
            print(f"error: nvidia-smi failed: {err}", file=sys.stderr)
            return 1
        if driver is None:
            if args.expect_gpu:
                print("error: no NVIDIA driver on this GPU node (nvidia-smi not found); start it from an image "
                      f"with driver >= {args.minimum or MINIMUM_DRIVER[13]}", file=sys.stderr)
                return 1
            print("no NVIDIA driver on this node (no nvidia-smi): a CPU node, nothing to check")
            return 0
    minimum, needed_by = args.minimum, "this node's work"
    torch = None
    if minimum is None or args.driver is None:
        import torch

        cuda = torch.version.cuda
        if cuda is None:
            print(f"error: torch {torch.__version__} is a CPU-only build, on a node with NVIDIA driver {driver}; "
                  "install the CUDA wheel that uv.lock pins (uv sync --frozen)", file=sys.stderr)
            return 1
        needed_by = f"torch {torch.__version__} (CUDA {cuda})"
        if minimum is None:
            major = int(cuda.split(".")[0])
            if major not in MINIMUM_DRIVER:
                print(f"error: no known minimum driver for CUDA {cuda}: pass --minimum", file=sys.stderr)
                return 1
            minimum = MINIMUM_DRIVER[major]
    try:
        code, line = driver_verdict(driver, minimum, needed_by)
    except ValueError as err:  # nvidia-smi printed something else than a version
        print(f"error: nvidia-smi: {err}", file=sys.stderr)
        return 1
    if code == 0 and args.driver is None and not torch.cuda.is_available():
        code, line = 1, (f"error: NVIDIA driver {driver} is new enough ({minimum}), but {needed_by} sees no GPU "
                         "(torch.cuda.is_available() is false); check `nvidia-smi` and CUDA_VISIBLE_DEVICES")
    elif code == 0 and args.driver is None:
        line += f", torch sees {torch.cuda.device_count()} GPU(s)"
    print(line, file=sys.stderr if code else sys.stdout)
    return code


if __name__ == "__main__":
    sys.exit(main())
