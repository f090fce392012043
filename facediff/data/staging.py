"""Write a dataset (or a generated source tree) beside OUT and swap it in only when it is complete.

Every `prepare` writer uses `staged_output`: the body writes into a fresh hidden sibling folder
(`.OUT.partial-PID`, same disk, so the swap is renames); when the body returns, the entries the writer owns
are moved into OUT, replacing ours there and nothing else; when it raises, the sibling is removed and OUT is
exactly as it was. So a failed `--overwrite` never costs the dataset that was there before.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from facediff.data.shards import MANIFEST


class EmptyDatasetError(ValueError):
    """The run would write a dataset (or a split that was asked for) without a record; nothing is written."""


def check_at_least(*checks: tuple[str, int | None, int]) -> None:
    """(option, value, least) for each numeric option; None means unset. Run before OUT is touched."""
    for option, value, least in checks:
        if value is not None and value < least:
            raise ValueError(f"{option} {value}: must be at least {least}")


def refuse_file_on_path(out: Path) -> None:
    """OUT (or a folder it would be made in) must not be a file: found before any work, named in one line
    (also a run folder: `facediff train`)."""
    out = Path(out).absolute()
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                where = "exists and is not a folder" if folder == out else f"cannot be made: {folder} is a file"
                raise FileExistsError(f"{out}: {where}; give a folder to write into")
            return


def refuse_existing(out: Path, overwrite: bool) -> None:
    refuse_file_on_path(out)
    if (Path(out) / MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{Path(out) / MANIFEST}: a prepared dataset is already there "
                              "(pass --overwrite to replace)")


def require_records(counts: dict[str, int], where: str, hint: str) -> None:
    """Every split must hold a record: an empty one is an error, not a dataset reported as written."""
    empty = [split for split, n in counts.items() if n == 0]
    if empty:
        raise EmptyDatasetError(f"{where}: split {'/'.join(empty)} would hold no record ({counts}); {hint}; "
                                "nothing was written")


@contextmanager
def staged_output(out: str | Path, owned: Iterable[str], last: str | None = MANIFEST) -> Iterator[Path]:
    """Yield the staging folder to write into; on success swap its entries named in `owned` into `out`.

    `owned`: the top-level names the writer replaces (split folders, the manifest); one of them absent from the
    staging folder is removed from `out` (e.g. a split no longer asked for). `last` is taken out of `out` first
    and put in last, so a folder caught half-swapped never looks complete."""
    refuse_file_on_path(out)  # found now, not after the whole run at the swap
    out = Path(out).resolve()
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # `out` is untouched until the swap
        raise
    owned = sorted(set(owned), key=lambda name: name == last)  # `last` at the end
    out.mkdir(parents=True, exist_ok=True)
    old = staging / ".old"  # replaced entries wait here until the new ones are all in place
    old.mkdir()
    if last is not None and (out / last).exists():
        os.replace(out / last, old / last)
    for name in owned:
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, old / name)
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    shutil.rmtree(staging)
