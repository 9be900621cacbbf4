"""The run's Ray storage as a pyarrow filesystem that waits out an S3 outage.

Ray Train's controller writes its checkpoint bookkeeping (``checkpoint_manager_snapshot.json``)
to the run's storage after every report, and Ray treats an error there as fatal: no
``FailureConfig`` retries it. With a plain ``S3FileSystem`` (the AWS SDK's three quick
tries) an S3 gateway that restarts, or answers 500/503 for a minute, ends a multi-day run.
:func:`storage_filesystem` therefore hands Ray a :class:`PatientS3` filesystem: the same
S3 client, with each operation retried with backoff (1 s doubling to 30 s) for up to
``retry_s`` while the error is one that passes by itself (no connection, 5xx, throttling).
Anything else (access denied, no such bucket, a missing key) is raised at once.

The AWS SDK's own retry settings do not survive pickling (pyarrow rebuilds the filesystem
in the controller's process without them), which is why the waiting lives here, in a
picklable handler. Writes are buffered (in memory, on local disk past 64 MiB) and sent
whole when the stream closes, so a failed send can be sent again.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Callable, TypeVar

from pyarrow import PythonFile
from pyarrow import fs as pafs

from cvaa.backoff import call_with_backoff

T = TypeVar("T")

# What an S3 outage looks like through pyarrow: the AWS SDK's error kinds for an
# unreachable, failing or throttling server, and bare HTTP 5xx statuses.
_TRANSIENT = re.compile(
    r"AWS Error (NETWORK_CONNECTION|INTERNAL_FAILURE|SERVICE_UNAVAILABLE|SLOW_DOWN|"
    r"THROTTLING|REQUEST_TIMEOUT|REQUEST_TIME_TOO_SKEWED)|HTTP status 5\d\d|curlCode")
_SPILL_BYTES = 64 << 20


def is_transient(exc: BaseException) -> bool:
    """Whether an S3 error from pyarrow is one an outage causes (and waiting cures)."""
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) \
        and bool(_TRANSIENT.search(str(exc)))


def retry_transient(call: Callable[[], T], what: str, deadline_s: float,
                    log: Callable[[str], None] | None = print) -> T:
    """``call()``, again after 1, 2, 4 … 30 s while it fails with a transient S3 error, for
    up to ``deadline_s`` (:func:`cvaa.backoff.call_with_backoff`); the last error is raised
    with ``what`` in front."""
    def say(line: str) -> None:
        if log is not None:
            log(f"storage: {what} {line}")

    return call_with_backoff(
        call, deadline_s=deadline_s, retry_if=is_transient,
        on_retry=lambda exc, attempt, wait: say(
            f"failed ({_first_line(exc)}); retrying in {wait:.3g} s"),
        on_recovered=lambda attempt, waited: say(
            f"succeeded on attempt {attempt} after {waited:.0f} s"),
        give_up=lambda exc, attempts, waited: OSError(
            f"{what}: storage still unreachable after {attempts} attempts in {waited:.0f} s: "
            f"{exc}"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class PatientS3(pafs.FileSystemHandler):
    """A ``pafs.PyFileSystem`` handler: an ``S3FileSystem(**options)`` whose operations are
    retried through :func:`retry_transient` for up to ``retry_s``. Picklable (it travels
    to Ray's controller and workers as its options)."""

    def __init__(self, options: dict[str, Any], retry_s: float):
        self.options, self.retry_s = dict(options), float(retry_s)
        self.inner = pafs.S3FileSystem(**self.options)

    def __reduce__(self):
        return PatientS3, (self.options, self.retry_s)

    def _do(self, what: str, call: Callable[[], T]) -> T:
        return retry_transient(call, what, self.retry_s, log=_log)

    # --- pafs.FileSystemHandler

    def get_type_name(self) -> str:
        return "cvaa-patient-s3"

    def equals(self, other) -> bool:
        handler = getattr(other, "handler", other)
        return isinstance(handler, PatientS3) and handler.options == self.options

    def normalize_path(self, path: str) -> str:
        return self.inner.normalize_path(path)

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self._do(f"stat {paths[0] if len(paths) == 1 else f'{len(paths)} paths'}",
                        lambda: self.inner.get_file_info(paths))

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        return self._do(f"list {selector.base_dir}", lambda: self.inner.get_file_info(selector))

    def create_dir(self, path: str, recursive: bool) -> None:
        self._do(f"mkdir {path}", lambda: self.inner.create_dir(path, recursive=recursive))

    def delete_dir(self, path: str) -> None:
        self._do(f"delete {path}", lambda: self.inner.delete_dir(path))

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self._do(f"delete {path}/*", lambda: self.inner.delete_dir_contents(
            path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self) -> None:
        raise OSError("refusing to delete the contents of every bucket")

    def delete_file(self, path: str) -> None:
        self._do(f"delete {path}", lambda: self.inner.delete_file(path))

    def move(self, src: str, dest: str) -> None:
        self._do(f"move {src}", lambda: self.inner.move(src, dest))

    def copy_file(self, src: str, dest: str) -> None:
        self._do(f"copy {src}", lambda: self.inner.copy_file(src, dest))

    def open_input_stream(self, path: str):
        return self._do(f"read {path}", lambda: self.inner.open_input_stream(path))

    def open_input_file(self, path: str):
        return self._do(f"read {path}", lambda: self.inner.open_input_file(path))

    def open_output_stream(self, path: str, metadata) -> PythonFile:
        return PythonFile(_WholeUpload(self, path, metadata), mode="w")

    def open_append_stream(self, path: str, metadata):
        raise OSError(f"{path}: S3 has no appends")


class _WholeUpload:
    """A write stream that sends everything at ``close()``, through the handler's retries
    (a stream half sent to a server that went away cannot be resumed)."""

    def __init__(self, handler: PatientS3, path: str, metadata):
        self.handler, self.path, self.metadata = handler, path, metadata
        self.buffer = tempfile.SpooledTemporaryFile(max_size=_SPILL_BYTES)
        self.closed = False

    def write(self, data) -> int:
        return self.buffer.write(data)

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.buffer.tell()

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.handler._do(f"write {self.path}", self._send)
        finally:
            self.buffer.close()

    def _send(self) -> None:
        self.buffer.seek(0)
        with self.handler.inner.open_output_stream(self.path, metadata=self.metadata) as out:
            while chunk := self.buffer.read(8 << 20):
                out.write(chunk)


def _log(line: str) -> None:
    print(line, flush=True)


def s3_options(storage: str) -> dict[str, Any] | None:
    """``S3FileSystem`` keyword arguments for an ``s3://`` storage, else ``None``: the
    endpoint of ``AWS_ENDPOINT_URL(_S3)`` (an S3-compatible server; Ray's default filesystem
    ignores it) or AWS itself, in ``AWS_REGION``/``AWS_DEFAULT_REGION`` or the bucket's own
    region. The driver's credentials, when it has them, go with the options: Ray's Train
    controller runs in a process that did not inherit the driver's environment."""
    if not storage.startswith("s3://"):
        return None
    options: dict[str, Any] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=host.rstrip("/"), scheme=scheme,
                       region=region or "us-east-1")
    else:
        bucket = storage[len("s3://"):].split("/", 1)[0]
        try:
            options["region"] = region or pafs.resolve_s3_region(bucket)
        except OSError as exc:
            raise OSError(f"{storage}: cannot find the region of bucket {bucket!r} ({exc}); "
                          "set AWS_DEFAULT_REGION") from exc
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        options.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                       secret_key=os.environ["AWS_SECRET_ACCESS_KEY"],
                       session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return options


def storage_filesystem(storage: str, retry_s: float = 600.0):
    """The filesystem for Ray's ``RunConfig(storage_filesystem=...)``: a :class:`PatientS3`
    for ``s3://`` storage, else ``None`` (Ray's default for local and shared paths)."""
    options = s3_options(storage)
    return None if options is None else pafs.PyFileSystem(PatientS3(options, retry_s))


def ray_storage(storage: str, retry_s: float = 600.0) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray's ``RunConfig``: with an explicit
    filesystem Ray takes a path *in* it (``bucket/prefix``, no ``s3://``)."""
    fs = storage_filesystem(storage, retry_s)
    return (storage[len("s3://"):] if fs is not None else storage), fs


def unwrap(filesystem):
    """The plain S3 filesystem under a :class:`PatientS3` one (for callers that run their
    own retry loop and report each attempt), else ``filesystem`` itself."""
    handler = getattr(filesystem, "handler", None)
    return handler.inner if isinstance(handler, PatientS3) else filesystem
