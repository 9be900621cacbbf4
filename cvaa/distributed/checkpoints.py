"""Checkpoints that a crash, a storage outage or a full disk cannot corrupt into "latest".

- Every checkpoint directory carries ``COMPLETE.json``: the size and SHA-256 of each of its
  files, written before the upload. A checkpoint is used only when every file matches, so a
  truncated or corrupted file is found before ``torch.load`` sees it.
- Rank 0 uploads through :func:`upload_with_retry` (Ray Train's ``checkpoint_upload_fn``):
  a storage that is unreachable is retried with backoff for up to ``deadline_s``; Ray
  registers the checkpoint only when the upload returned, so a torn upload never becomes
  the run's latest checkpoint. A full storage is not retried: :class:`StorageFullError`
  names the storage and the epoch, and the previous checkpoint stays as it was.
- A resumed worker group loads the newest checkpoint that verifies
  (:func:`load_resume_state`), warning about each one it skips.
- Every process reads a remote checkpoint from its own private download
  (:func:`local_checkpoint`), never from the temporary directory Ray shares among a node's
  processes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from cvaa.backoff import call_with_backoff
from cvaa.loop import CHECKPOINT_FILE  # the state file in each checkpoint dir
from cvaa.models import generator_from_state

MARKER = "COMPLETE.json"
# epoch_0012, or epoch_0012_r1: the same epoch trained again after a resume skipped a bad
# checkpoint (a new name, because Ray still tracks, and may delete, the skipped one).
_EPOCH_DIR = re.compile(r"^epoch_(\d{4,})(?:_r(\d+))?$")


def checkpoint_name(epoch: int, fallbacks: int = 0) -> str:
    """The directory of the checkpoint after ``epoch`` (1-based)."""
    return f"epoch_{epoch:04d}" + (f"_r{fallbacks}" if fallbacks else "")


class CorruptCheckpointError(RuntimeError):
    """A checkpoint whose files do not match its ``COMPLETE.json`` (or lack one)."""


class StorageFullError(OSError):
    """The checkpoint storage has no space left."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_marker(directory: str | Path) -> dict[str, Any]:
    """Write ``COMPLETE.json`` listing every file of ``directory`` (recursively)."""
    root = Path(directory)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MARKER):
        data = path.read_bytes()
        files[path.relative_to(root).as_posix()] = {"bytes": len(data), "sha256": _sha256(data)}
    marker = {"files": files}
    (root / MARKER).write_text(json.dumps(marker, indent=1))
    return marker


def verify_directory(directory: str | Path) -> None:
    """Raise :class:`CorruptCheckpointError` unless every listed file matches."""
    root = Path(directory)
    marker_path = root / MARKER
    if not marker_path.is_file():
        raise CorruptCheckpointError(f"no {MARKER} (an upload that did not finish, or a "
                                     "checkpoint from before integrity checks)")
    try:
        listed = json.loads(marker_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        raise CorruptCheckpointError(f"{MARKER} is unreadable ({exc})") from exc
    for name, want in listed.items():
        path = root / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{name} is missing")
        data = path.read_bytes()
        if len(data) != want["bytes"]:
            raise CorruptCheckpointError(f"{name} has {len(data)} bytes, {want['bytes']} "
                                         "were written (truncated?)")
        if _sha256(data) != want["sha256"]:
            raise CorruptCheckpointError(f"{name} does not match its SHA-256 (corrupted)")


def sibling_checkpoints(checkpoint) -> list:
    """The other ``epoch_NNNN`` checkpoints beside ``checkpoint`` in its storage, newest
    first (what a resume falls back to)."""
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    parent = checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent, recursive=False))
    found = []
    for info in infos:
        match = _EPOCH_DIR.match(info.base_name)
        if match and info.type == pafs.FileType.Directory \
                and info.path.rstrip("/") != checkpoint.path.rstrip("/"):
            key = (int(match.group(1)), int(match.group(2) or 0))
            found.append((key, Checkpoint(info.path, checkpoint.filesystem)))
    return [c for _, c in sorted(found, key=lambda t: t[0], reverse=True)]


@contextlib.contextmanager
def local_checkpoint(checkpoint) -> Iterator[Path]:
    """The files of a ``ray.train.Checkpoint`` in a local directory for the duration of the
    context: its own directory when it is local, else a download private to this call,
    deleted afterwards.

    Not Ray's ``Checkpoint.as_directory()``: that shares one temporary directory per
    checkpoint among all processes of a node, and a process that arrives after another
    finished downloading downloads again into it, rewriting files the first one is still
    reading (seen as a torn ``checkpoint.pt`` when two evaluation actors on a node loaded
    the model from S3 at the same moment). A node with 8 workers holds 8 copies while they
    load; each is gone when its loader is done.
    """
    from pyarrow import fs as pafs

    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="cvaa-checkpoint-") as tmp:
        # a path of our own: Ray's download lock on it is never contended
        yield Path(checkpoint.to_directory(tmp))


def load_resume_state(checkpoint, filename: str, *, map_location=None,
                      use: Callable[[Path], None] | None = None
                      ) -> tuple[dict[str, Any], list[str]]:
    """The state of the newest checkpoint that verifies, starting at ``checkpoint`` (Ray's
    latest) and falling back to older ones beside it; ``use(local_dir)`` is called on the
    chosen one while its files are at hand. Returns ``(state, warnings)``: one warning per
    skipped checkpoint, naming it and what is wrong.

    Raises:
        CorruptCheckpointError: no checkpoint verifies (every reason listed).
    """
    warnings: list[str] = []
    for candidate in [checkpoint, *sibling_checkpoints(checkpoint)]:
        try:
            with local_checkpoint(candidate) as local:
                verify_directory(local)
                state = torch.load(io.BytesIO((local / filename).read_bytes()),
                                   map_location=map_location, weights_only=True)
                if use is not None:
                    use(local)
            return state, warnings
        except (CorruptCheckpointError, OSError, RuntimeError, EOFError) as exc:
            warnings.append(f"checkpoint {candidate.path} skipped: {exc}")
    raise CorruptCheckpointError("no usable checkpoint to resume from: "
                                 + "; ".join(warnings))


def persist_checkpoint(local_dir: str | Path, name: str, deadline_s: float, epoch: int,
                       log: Callable[[str], None] = print):
    """Upload a rank's local checkpoint directory as ``name`` in the run's Ray storage
    (:func:`upload_with_retry`); returns the ``ray.train.Checkpoint`` to report with
    ``CheckpointUploadMode.NO_UPLOAD``."""
    import ray.train

    from cvaa.distributed.storage import unwrap

    # get_storage() is a Ray Train DeveloperAPI: where the run's checkpoints go. This loop
    # reports each failed attempt, so it writes through the plain S3 filesystem.
    # Ray accepts the checkpoint only on the storage's own filesystem object.
    storage = ray.train.get_context().get_storage()
    uploaded = upload_with_retry(ray.train.Checkpoint.from_directory(str(local_dir)),
                                 f"{storage.experiment_fs_path}/{name}",
                                 unwrap(storage.storage_filesystem), deadline_s=deadline_s,
                                 log=log, epoch=epoch)
    return ray.train.Checkpoint(uploaded.path, storage.storage_filesystem)


def upload_with_retry(checkpoint, destination: str, filesystem, *, deadline_s: float,
                      log: Callable[[str], None] = print, epoch: int | None = None):
    """Copy a local checkpoint directory to ``destination`` on ``filesystem`` (both as Ray
    Train's storage gives them), retrying an unreachable storage with backoff (1 s doubling
    to 30 s) until ``deadline_s`` has passed. Returns the persisted ``ray.train.Checkpoint``.

    Raises:
        StorageFullError: no space left (not retried: it would not pass by itself).
        OSError: still failing when the deadline passed.
    """
    from pyarrow import fs as pafs
    from ray.train import Checkpoint

    def attempt():
        try:
            filesystem.create_dir(destination)
            pafs.copy_files(checkpoint.path, destination,
                            source_filesystem=checkpoint.filesystem,
                            destination_filesystem=filesystem)
        except OSError as exc:
            if _is_full(exc):
                raise StorageFullError(
                    errno.ENOSPC, f"checkpoint storage full: the checkpoint of epoch "
                    f"{epoch if epoch is not None else '?'} could not be written to "
                    f"{destination} ({exc}); the previous checkpoint is intact: free space "
                    "and run again with the same --run-name to resume") from exc
            raise
        return Checkpoint(destination, filesystem)

    return call_with_backoff(
        attempt, deadline_s=deadline_s,
        retry_if=lambda exc: isinstance(exc, OSError) and not isinstance(exc, StorageFullError),
        on_retry=lambda exc, n, wait: log(
            f"checkpoint upload to {destination} failed ({exc}); retrying in {wait:.3g} s"),
        on_recovered=lambda n, waited: log(
            f"checkpoint upload to {destination} succeeded on attempt {n} after "
            f"{waited:.0f} s"),
        give_up=lambda exc, n, waited: OSError(
            f"checkpoint upload to {destination} still failing after {n} attempts in "
            f"{waited:.0f} s: {exc}"))


def _is_full(exc: BaseException) -> bool:
    while exc is not None:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left" in text or "Disk quota exceeded" in text or "EntityTooLarge" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def load_checkpoint_state(checkpoint) -> dict[str, Any]:
    """The content of a Ray Train checkpoint (``weights_only``: tensors and builtins),
    verified against its checksums when it has them (checkpoints written before integrity
    checks have none and load as they are)."""
    with local_checkpoint(checkpoint) as ckpt_dir:
        if (ckpt_dir / MARKER).exists():
            verify_directory(ckpt_dir)
        return torch.load(ckpt_dir / CHECKPOINT_FILE, map_location="cpu",
                          weights_only=True)


def load_checkpoint_generator(checkpoint, cfg=None):
    """The generator (eval mode, CPU) and the raw state of a Ray Train checkpoint; ``cfg``
    (a :class:`cvaa.config.Config`) overrides the one saved in it."""
    state = load_checkpoint_state(checkpoint)
    return generator_from_state(state, cfg), state
