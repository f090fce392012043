"""`make gpu-wheels` pins the device's cp312 wheels to uv.lock, which locks Python 3.11-3.13 at once: where the
Pythons need different versions of a package, the one for 3.12 is downloaded."""

import importlib.util

from conftest import REPO


def _wheels():
    spec = importlib.util.spec_from_file_location("gpu_wheels", REPO / "tools" / "gpu_check" / "wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FORKED_LOCK = """
version = 1
requires-python = ">=3.11, <3.14"

[[package]]
name = "numpy"
version = "2.4.6"
resolution-markers = ["python_full_version >= '3.13' and sys_platform == 'linux'"]

[[package]]
name = "numpy"
version = "2.3.0"
resolution-markers = [
    "python_full_version == '3.12.*' and sys_platform == 'linux'",
    "python_full_version == '3.12.*' and sys_platform == 'win32'",
]

[[package]]
name = "numpy"
version = "1.26.4"
resolution-markers = ["python_full_version < '3.12'"]

[[package]]
name = "ray"
version = "2.60.0"
"""


def test_a_package_locked_at_several_versions_gives_the_one_for_python_3_12():
    assert _wheels().locked_versions(FORKED_LOCK) == {"numpy": "2.3.0", "ray": "2.60.0"}


def test_every_wheel_the_device_needs_is_in_the_committed_lock():
    wheels = _wheels()
    versions = wheels.locked_versions()
    assert [name for name in wheels.WHEELS if name not in versions] == []
    assert versions["ray"].startswith("2.")
