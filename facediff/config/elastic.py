"""Elastic runs (`trainer.num_workers: [min, max]`): the global batch is the configured one at every worker count.

The global batch G is `trainer.batch_size x trainer.grad_accum x max` (what the run trains with at full size). With
w workers alive each worker takes G / w images a step, as `accum` micro-batches of `micro` images: the fewest
micro-batches whose size is at most `trainer.batch_size` (the memory the config was sized for) and divides G / w
exactly. A count w that does not divide G has no exact split: the config is refused at load (`check_elastic`), so
a run's results never depend on how many nodes were alive. No imports from the rest of facediff (the schema and the
training loop both use it)."""

from __future__ import annotations


class NoExactSplit(ValueError):
    pass


def split_global_batch(global_batch: int, world: int, max_micro: int) -> tuple[int, int]:
    """(micro-batch per worker, accumulation steps) with micro x accum x world == global_batch, micro <= max_micro,
    accum as small as possible; NoExactSplit where w does not divide the global batch."""
    if global_batch % world:
        raise NoExactSplit(f"the global batch of {global_batch} images does not divide among {world} workers")
    share = global_batch // world
    accum = next(a for a in range(1, share + 1) if share % a == 0 and share // a <= max_micro)
    return share // accum, accum


def check_elastic(min_workers: int, max_workers: int, batch_size: int, grad_accum: int) -> None:
    """NoExactSplit naming the keys, where a worker count in [min, max] cannot keep the global batch."""
    global_batch = batch_size * grad_accum * max_workers
    bad = [w for w in range(min_workers, max_workers + 1) if global_batch % w]
    if bad:
        raise NoExactSplit(
            f"trainer.num_workers [{min_workers}, {max_workers}]: the global batch of {global_batch} images "
            f"(trainer.batch_size {batch_size} x trainer.grad_accum {grad_accum} x {max_workers} workers) has no "
            f"exact split over {', '.join(map(str, bad))} worker(s); choose trainer.batch_size/grad_accum so the "
            f"global batch is a multiple of every worker count from {min_workers} to {max_workers}, or narrow "
            "trainer.num_workers")
