"""Run a function as `world` gloo ranks in forked processes (no Ray), collecting what each rank puts on a queue."""

import multiprocessing
import queue
import socket
import time


def run_forked_ranks(target, world: int, args: tuple = (), timeout: float = 60) -> list:
    """Call `target(rank, world, port, *args, out)` in `world` forked processes (no re-import of torch) and return
    the items they put on `out`, sorted. A rank that dies fails at once instead of after the timeout."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, world, port, *args, out), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        results, deadline = [], time.time() + timeout
        while len(results) < world and time.time() < deadline:
            try:
                results.append(out.get(timeout=2))
            except queue.Empty:
                assert all(p.is_alive() or p.exitcode == 0 for p in procs), "a rank failed (its traceback is above)"
        assert len(results) == world, f"{world - len(results)} rank(s) gave no result within {timeout} s"
        for p in procs:
            p.join(timeout=60)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return sorted(results)
