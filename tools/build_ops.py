"""Build, at set-up, the DeepSpeed op the CPU workers would otherwise compile at their first run (see
facediff/__init__.py): the shared-memory all-reduce of `deepspeed.comm` on the CPU accelerator. A no-op where
DeepSpeed does not use it (a GPU accelerator, or an op it reports incompatible here)."""

import importlib
import time

importlib.import_module("facediff")  # first: it points torch's extension cache at this environment


def main() -> None:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        print("deepspeed: no shared-memory CPU op to build here")
        return
    start = time.perf_counter()
    try:
        builder.load(verbose=False)
    except Exception as err:  # no compiler here: set-up goes on, and DeepSpeed tries again in its first run
        print(f"deepspeed: could not build {builder.absolute_name()} ({type(err).__name__}: {err}); "
              "CPU training runs will try at their start")
        return
    print(f"deepspeed: {builder.absolute_name()} ready in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
