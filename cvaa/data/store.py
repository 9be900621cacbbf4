"""Small byte-level storage helpers over local paths and ``s3://`` URIs.

The prepared dataset, manifests and caches are written through these, so every job takes a
local directory or an S3 prefix alike.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from cvaa.data.io import is_s3, list_s3, s3_client, split_s3


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    base = str(base)
    if is_s3(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def absolute_uri(uri: str | os.PathLike) -> str:
    """A local path or ``sqlite:///relative.db`` made absolute; other URIs unchanged.

    Other processes (Ray workers, Tune trials) do not share the caller's working directory.

    Example:
        >>> absolute_uri("s3://bucket/prefix"), absolute_uri("/data/x")
        ('s3://bucket/prefix', '/data/x')
    """
    uri = str(uri)
    if uri.startswith("sqlite:///"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" in uri:
        return uri
    return str(Path(uri).resolve())


def exists(uri: str | os.PathLike) -> bool:
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).exists()
    from botocore.exceptions import ClientError

    bucket, key = split_s3(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if _missing(exc):
            return False
        raise


def _missing(exc) -> bool:
    """A botocore ClientError that means "no such key"."""
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")


class StorageUnavailableError(ConnectionError):
    """The storage did not answer (after the S3 client's own retries): an outage, which
    a caller may wait out, unlike a missing or damaged file."""


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The bytes of a local file or S3 object.

    Raises:
        FileNotFoundError: no such file or key.
        StorageUnavailableError: the S3 endpoint did not answer, or answered with a
            server error (5xx), through the client's retries.
    """
    uri = str(uri)
    if not is_s3(uri):
        return Path(uri).read_bytes()
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    bucket, key = split_s3(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if _missing(exc):
            raise FileNotFoundError(f"{uri}: no such S3 key") from exc
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500:
            raise StorageUnavailableError(f"{uri}: S3 server error ({exc})") from exc
        raise
    except (ConnectionError, HTTPClientError) as exc:
        raise StorageUnavailableError(f"{uri}: S3 endpoint unreachable ({exc})") from exc


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Write atomically: a local file appears whole (temp file + rename); an S3 object is
    written in one PUT, which S3 makes visible whole."""
    uri = str(uri)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    path = Path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_text(uri: str | os.PathLike) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | os.PathLike, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(prefix: str | os.PathLike) -> list[str]:
    """Every file under a local directory or S3 prefix (recursive), as sorted URIs."""
    prefix = str(prefix)
    if is_s3(prefix):
        return sorted(list_s3(prefix.rstrip("/") + "/"))
    base = Path(prefix)
    if not base.is_dir():
        return []
    return sorted(str(p) for p in base.rglob("*") if p.is_file())
