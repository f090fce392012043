"""Where a run's files live: a local folder, or a prefix of a remote store (`s3://bucket/prefix`, `gs://...`).

Ray Train writes checkpoints through pyarrow's filesystems itself; facediff's own files of a run (`config.yaml`,
`metrics.jsonl`, TensorBoard events, the workers' logs, `export/`) are written into a local folder first (the run
folder itself when storage is local, else a new temporary folder) and copied to the remote store through the same
pyarrow filesystem. Credentials and the endpoint come from the driver's environment, as for any AWS client
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for an S3-compatible server); nothing here
names them. They travel inside the pickled filesystem to Ray's processes, as Ray's own storage options do.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(path: str | Path) -> bool:
    """A URI with a scheme other than file:// (s3://, gs://, ...)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def _s3_from_environment() -> pafs.S3FileSystem | None:
    """S3 with the driver's AWS variables written into the filesystem object itself, so that Ray's processes
    (started by a raylet, with the raylet's environment) reach the same endpoint with the same credentials when
    it is pickled to them. None when the environment names no credentials (the SDK's own chain then applies in
    each process: an instance profile on a cloud node)."""
    env = os.environ
    if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
        return None
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    scheme, _, host = endpoint.rpartition("://") if endpoint else ("", "", None)
    return pafs.S3FileSystem(access_key=env["AWS_ACCESS_KEY_ID"], secret_key=env["AWS_SECRET_ACCESS_KEY"],
                             session_token=env.get("AWS_SESSION_TOKEN"),
                             region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                             endpoint_override=host, scheme=scheme or "https")


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a storage URI and the path inside it (bucket/prefix)."""
    try:
        if uri.startswith("s3://") and (s3 := _s3_from_environment()) is not None:
            return s3, uri[len("s3://"):]
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{uri}: cannot open this storage location ({err})") from None


class StoredFile:
    """A file that grows while it is read (a run's `metrics.jsonl`), local or remote."""

    def __init__(self, fs: pafs.FileSystem, path: str):
        self.fs, self.path = fs, path

    @classmethod
    def local(cls, path: str | Path) -> StoredFile:
        return cls(pafs.LocalFileSystem(), str(Path(path).resolve()))

    def size(self) -> int | None:
        info = self.fs.get_file_info(self.path)
        return info.size if info.type == pafs.FileType.File else None

    def read_from(self, offset: int) -> bytes:
        with self.fs.open_input_file(self.path) as f:
            f.seek(offset)
            return f.read()


class RunStorage:
    """One run's folder in its storage, with a local folder beside it that the run's own files are written into.

    `local` is the run folder itself for local storage (every sync is then a no-op) and, for remote storage, a
    new folder under the temporary directory (pickled with the object: Ray's processes on this node share it,
    those on other nodes create it); `push`/`pull` copy between the two."""

    def __init__(self, storage_path: str, name: str, filesystem: pafs.FileSystem | None = None):
        """`filesystem`: the remote filesystem to reuse (one already resolved in the driver, e.g. a Tune
        experiment's for its trials' runs), instead of resolving `storage_path` again in this process."""
        self.name, self.remote = name, is_remote(storage_path)
        if self.remote:
            self.fs, base = _filesystem(storage_path.rstrip("/")) if filesystem is None else (
                filesystem, storage_path.rstrip("/").split("://", 1)[1])
            self.root = posixpath.join(base, name)
            self.uri = storage_path.rstrip("/") + "/" + name
            # a new folder for each command: nothing from an earlier run of the same name can be pushed again
            self.local = Path(tempfile.mkdtemp(prefix=f"facediff-{name}-"))
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(storage_path).resolve() / name)
            self.uri = self.root
            self.local = Path(self.root)

    def path(self, relative: str = "") -> str:
        return posixpath.join(self.root, relative) if relative else self.root

    def file(self, relative: str) -> StoredFile:
        return StoredFile(self.fs, self.path(relative))

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open_input_stream(self.path(relative)) as f:
            return f.read()

    def listing(self, relative: str = "") -> dict[str, bool]:
        """The entries of a folder of the run: name -> whether it is a folder (empty if the folder is absent)."""
        if not self.exists(relative):
            return {}
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(relative), recursive=False))
        return {posixpath.basename(i.path): i.type == pafs.FileType.Directory for i in infos}

    def push(self, relative: str) -> None:
        """Copy a file or folder of the local mirror to the same place in the store (no-op for local storage)."""
        if not self.remote:
            return
        source = self.local / relative
        if source.is_dir():
            pafs.copy_files(str(source), self.path(relative), source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs)
        elif source.is_file():
            self.fs.create_dir(posixpath.dirname(self.path(relative)), recursive=True)
            with source.open("rb") as src, self.fs.open_output_stream(self.path(relative)) as dst:
                dst.write(src.read())

    def pull(self, relative: str) -> bool:
        """Copy a file or folder of the store into the local mirror (no-op for local storage); False if absent."""
        if not self.remote:
            return (self.local / relative).exists()
        info = self.fs.get_file_info(self.path(relative))
        target = self.local / relative
        if info.type == pafs.FileType.Directory:
            target.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(self.path(relative), str(target), source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        elif info.type == pafs.FileType.File:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(self.read_bytes(relative))
        else:
            return False
        return True
