"""`ArtifactStore`: one interface over a local directory and an `s3://` prefix.

Every stage reads and writes through it, so the same code runs on a laptop (a directory) and in
a pod (S3). What it promises:

- **Atomic objects.** An object becomes visible whole: local files are written to a temporary
  sibling, fsynced and renamed into place; an S3 PUT (or a multipart upload's completion) is
  atomic. A directory (a checkpoint) counts as present only once its `_MANIFEST.json`, listing
  every file's size and sha256, is written, last.
- **Create-only writes.** `write_bytes(..., if_absent=True)` and `put_file(..., if_absent=True)`
  write only when the key does not exist and report whether they did: S3 conditional writes
  (`If-None-Match: *`), a hard link on a local disk. Two writers of one key cannot interleave. A
  store without conditional writes is refused in one line rather than trusted.
- **Compare-and-swap.** `read_versioned` returns an object with its version token (S3: its
  ETag) and `write_versioned(key, data, if_match=token)` replaces it only if it still has that
  version (S3 `If-Match`; on a local disk, under an exclusive `flock`), returning the new token: a
  writer whose view is stale (a lease taken over meanwhile) is told so instead of overwriting.
- **Streaming.** Files move to and from S3 through boto3's transfer manager (multipart, with its
  own retries of interrupted streams), never whole in memory.
- **Verified downloads.** `get_dir` refuses a manifest entry that would land outside the
  destination and checks each file's size and sha256, naming the file that differs.
- **Retries, then one line.** Transient S3 errors (throttling, 5xx, dropped connections) are
  retried with exponential backoff by botocore's standard retry mode; when the budget runs out
  the error is a `CaiError` naming the endpoint, not a traceback.

Endpoint and credentials come from the standard AWS variables (`AWS_ENDPOINT_URL_S3` /
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`);
`CAI_S3_MAX_ATTEMPTS` sets the attempts per request (default 8: about a minute of backoff).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from cai_lib.core.errors import CaiError
from cai_lib.core.names import MANIFEST
from cai_lib.core.settings import settings
from cai_lib.core.text import decode_text, decoded_lines
from cai_lib.core.uris import is_s3

T = TypeVar("T", bound=BaseModel)


def join_uri(base: str, *keys: str) -> str:
    """Join a root URI (directory or s3://) with relative keys using '/'."""
    head = str(base).rstrip("/")
    tail = [k.strip("/") for k in keys if k and k.strip("/")]
    return "/".join(([head] if head else []) + tail)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """A manifest entry: size in bytes and sha256 of a local file."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def confined(rel: str, where: str) -> str:
    """`rel` if it is a plain relative path that stays inside its directory; else `CaiError`.

    Manifests come from storage that others can write, so an entry such as `../x` or `/etc/x`
    must never decide where a download lands.
    """
    path = PurePosixPath(rel)
    if (
        not rel
        or "\\" in rel
        or path.is_absolute()
        or any(part in ("..", ".", "") for part in rel.split("/"))
    ):
        raise CaiError(f"{where}: manifest entry {rel!r} is not a relative path inside the directory")
    return rel


def verify_file(path: Path, entry: dict, where: str) -> None:
    """Refuse a file whose size or sha256 differs from its manifest entry, naming it."""
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CaiError(f"{where}: {size} bytes where the manifest says {entry['bytes']}; refusing it")
    if sha256_file(path) != entry["sha256"]:
        raise CaiError(f"{where}: sha256 differs from the manifest; refusing it")


def verify_dir(local_dir: Path, manifest: dict, where: str) -> None:
    """Check every file a manifest lists against `local_dir` (size and sha256)."""
    for rel, entry in manifest["files"].items():
        path = Path(local_dir) / confined(rel, where)
        if not path.is_file():
            raise CaiError(f"{join_uri(where, rel)}: missing, though the manifest lists it")
        verify_file(path, entry, join_uri(where, rel))


class ArtifactStore:
    """Objects under a root URI. Keys are '/'-separated and relative to the root."""

    def __init__(self, root: str):
        self.root = str(root).rstrip("/") if is_s3(str(root)) else str(Path(root).expanduser().resolve())

    @staticmethod
    def open(uri: str | Path) -> ArtifactStore:
        """A store rooted at `uri`: `s3://bucket/prefix` or a local directory."""
        return S3Store(str(uri)) if is_s3(str(uri)) else LocalStore(str(uri))

    @property
    def uri(self) -> str:
        return self.root

    def uri_of(self, key: str) -> str:
        return join_uri(self.root, key)

    def child(self, key: str) -> ArtifactStore:
        return ArtifactStore.open(self.uri_of(key))

    # -- primitives each backend implements -------------------------------------------------
    def write_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        """Write `data` at `key`; with `if_absent`, only if nothing is there. True if written."""
        raise NotImplementedError

    def write_versioned(self, key: str, data: bytes, if_match: str | None = None) -> str | None:
        """Write `data` at `key` only if nothing is there (`if_match` None) or the object there
        still has version token `if_match` (from `read_versioned` or an earlier write). Returns
        the new version token, or None when the condition failed."""
        raise NotImplementedError

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and its version token, for a later `write_versioned(..., if_match=)`."""
        raise NotImplementedError

    def file_sha256(self, key: str) -> str:
        """sha256 of one object, streamed (never whole in memory or on disk)."""
        raise NotImplementedError

    def put_file(self, local: str | Path, key: str, if_absent: bool = False) -> bool:
        """Upload a local file (streamed); with `if_absent`, only if nothing is there. True if written."""
        raise NotImplementedError

    def get_file(self, key: str, local: str | Path) -> Path:
        """Download `key` (streamed) to `local`, which appears whole or not at all."""
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Key (relative to the root) -> size in bytes, of every object under `prefix`."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) of every object under `prefix`, sorted."""
        return sorted(self.sizes(prefix))

    def delete(self, key: str) -> None:
        raise NotImplementedError

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        """A local file with the object's content for the duration of the block."""
        with tempfile.TemporaryDirectory(prefix="cai-get-") as tmp:
            yield self.get_file(key, Path(tmp) / "object")

    def copy_from(self, source: ArtifactStore, source_key: str, key: str) -> None:
        """Copy one object of `source` to `key` here. Backends override it where the bytes need not
        pass through this process (an S3 server-side copy, a hard link)."""
        with source.local_copy(source_key) as path:
            self.put_file(path, key)

    # -- built on the primitives -------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        """The whole object: for small ones (JSON, markers). Large ones go through `get_file`."""
        with self.local_copy(key) as path:
            return path.read_bytes()

    def write_text(self, key: str, text: str, if_absent: bool = False) -> bool:
        return self.write_bytes(key, text.encode("utf-8"), if_absent=if_absent)

    def read_text(self, key: str) -> str:
        return decode_text(self.read_bytes(key), self.uri_of(key))

    def write_json(self, key: str, obj: object, if_absent: bool = False) -> bool:
        return self.write_text(key, json.dumps(obj, indent=2, sort_keys=True) + "\n", if_absent=if_absent)

    def read_json(self, key: str) -> object:
        return json.loads(self.read_text(key))

    def iter_lines(self, key: str) -> Iterator[str]:
        """The text lines of an object, read as a stream from a local copy (split as `core.text` says)."""
        with self.local_copy(key) as path, open(path, "rb") as handle:
            yield from decoded_lines(handle, self.uri_of(key))

    def write_jsonl(self, key: str, records: Iterable[BaseModel], if_absent: bool = False) -> int:
        """Stream records into one JSONL object (spooled through a local temporary file, then
        published atomically); returns the row count (0 when `if_absent` found it written)."""
        count = 0
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", encoding="utf-8", delete=False) as handle:
            try:
                for record in records:
                    handle.write(record.model_dump_json() + "\n")
                    count += 1
                handle.close()
                written = self.put_file(handle.name, key, if_absent=if_absent)
            finally:
                os.unlink(handle.name)
        return count if written else 0

    def read_jsonl(self, key: str, model: type[T]) -> Iterator[T]:
        """Yield validated records as they stream in; a bad row raises `CaiError` naming the URI
        and line number."""
        yield from parse_jsonl_lines(self.iter_lines(key), model, self.uri_of(key))

    def put_dir(self, local_dir: str | Path, key: str) -> str:
        """Upload a directory (e.g. a checkpoint); its manifest of sizes and sha256s is written
        last. Returns its URI."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
        entries = {}
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            entries[rel] = file_entry(path)
            self.put_file(path, join_uri(key, rel))
        self.write_json(join_uri(key, MANIFEST), {"files": entries})
        return self.uri_of(key)

    def copy_dir(self, source: ArtifactStore, source_key: str, key: str) -> str:
        """Copy the finished directory `source_key` of `source` to `key` here, its manifest last
        (so the copy counts as present only once whole). Returns its URI."""
        manifest = source.read_manifest(source_key)
        for rel in manifest["files"]:
            self.copy_from(source, join_uri(source_key, rel), join_uri(key, rel))
        self.write_json(join_uri(key, MANIFEST), manifest)
        return self.uri_of(key)

    def dir_exists(self, key: str) -> bool:
        """True only for a directory whose upload finished (its manifest exists)."""
        return self.exists(join_uri(key, MANIFEST))

    def read_manifest(self, key: str) -> dict:
        """The manifest of a finished directory; `CaiError` when there is none."""
        if not self.dir_exists(key):
            raise CaiError(f"{self.uri_of(key)}: no finished directory there (no {MANIFEST})")
        manifest = self.read_json(join_uri(key, MANIFEST))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise CaiError(f"{self.uri_of(join_uri(key, MANIFEST))}: not a manifest (no 'files' mapping)")
        for rel in manifest["files"]:
            confined(rel, self.uri_of(join_uri(key, MANIFEST)))
        return manifest

    def verify_dir(self, key: str = "") -> dict:
        """Check every file the manifest of the finished directory `key` lists, where it lies: its
        size and its sha256, streamed. Returns the manifest; `CaiError` naming the first file that
        is missing or differs."""
        manifest = self.read_manifest(key)
        sizes = self.sizes(key)
        for rel, entry in manifest["files"].items():
            full = join_uri(key, rel)
            where = self.uri_of(full)
            if full not in sizes:
                raise CaiError(f"{where}: missing, though the manifest lists it")
            if sizes[full] != entry["bytes"]:
                raise CaiError(f"{where}: {sizes[full]} bytes where the manifest says {entry['bytes']}; refusing it")
            if self.file_sha256(full) != entry["sha256"]:
                raise CaiError(f"{where}: sha256 differs from the manifest; refusing it")
        return manifest

    def get_dir(self, key: str, local_dir: str | Path) -> Path:
        """Download a finished directory, checking each file against the manifest; refuses a
        directory without a manifest, a manifest path outside `local_dir`, and a file whose size
        or sha256 differs (naming it)."""
        manifest = self.read_manifest(key)
        local_dir = Path(local_dir)
        for rel, entry in manifest["files"].items():
            target = self.get_file(join_uri(key, rel), local_dir / rel)
            verify_file(target, entry, self.uri_of(join_uri(key, rel)))
        return local_dir


def checkpoint_location(out_uri: str) -> tuple[ArtifactStore, str]:
    """(store of the parent, name) where a checkpoint is written with `put_dir`.

    A location that holds anything is refused, a finished checkpoint (its manifest written) as
    well as other files, which may be someone's data: nothing is overwritten or deleted. (Pipeline
    steps write each attempt under a fresh prefix, so a killed upload never blocks a retry.)
    """
    if is_s3(out_uri):
        parent, _, name = str(out_uri).rstrip("/").rpartition("/")
        if not name or parent in ("s3:", "s3:/"):
            raise CaiError(f"{out_uri}: an s3:// output needs a bucket and a key, s3://BUCKET/KEY")
    else:
        local = Path(out_uri).expanduser().resolve()
        parent, name = str(local.parent), local.name
    store = ArtifactStore.open(parent)
    if store.dir_exists(name):
        raise CaiError(
            f"{out_uri}: already holds a finished checkpoint; choose another --out (nothing was overwritten)"
        )
    if store.list(name):
        raise CaiError(
            f"{out_uri}: holds files but no finished checkpoint (no {MANIFEST}: an interrupted upload, or other "
            "data); delete it or choose another --out (nothing was overwritten)"
        )
    return store, name


def parse_jsonl_lines(lines: Iterable[str], model: type[T], where: str) -> Iterator[T]:
    """Validate JSONL lines into `model`, naming `where` and the 1-based line of a bad row."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield model.model_validate_json(line)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "row"
            raise CaiError(f"{where}: line {number}: field '{field}': {first['msg']}") from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish_local(fill, path: Path, if_absent: bool) -> bool:
    """Write a temporary sibling of `path` with `fill(handle)`, fsync it and put it in place:
    a rename, or (with `if_absent`) a hard link that fails when `path` exists. True if written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            fill(handle)
            handle.flush()
            os.fsync(handle.fileno())
        if if_absent:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError as err:
                raise CaiError(
                    f"{path}: this file system cannot make hard links ({err.strerror}), which create-only writes "
                    "use; keep the artifact root on a local disk or in S3"
                ) from None
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        return True
    finally:
        Path(tmp).unlink(missing_ok=True)


class LocalStore(ArtifactStore):
    def _path(self, key: str) -> Path:
        return Path(self.root) / key

    def _existing(self, key: str) -> Path:
        path = self._path(key)
        if not path.is_file():
            raise CaiError(f"{path}: no such file")
        return path

    def write_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        return _publish_local(lambda handle: handle.write(data), self._path(key), if_absent)

    def write_versioned(self, key: str, data: bytes, if_match: str | None = None) -> str | None:
        # The version token of a local file is the sha256 of its bytes (records carry a counter,
        # so two versions never have the same bytes).
        with self._exclusive(key):
            path = self._path(key)
            if if_match is None:
                written = _publish_local(lambda handle: handle.write(data), path, if_absent=True)
            elif not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != if_match:
                written = False
            else:
                written = _publish_local(lambda handle: handle.write(data), path, if_absent=False)
        return hashlib.sha256(data).hexdigest() if written else None

    @contextmanager
    def _exclusive(self, key: str) -> Iterator[None]:
        """An exclusive `flock` on a sibling lock file: compare-and-swap writers of `key` take turns."""
        import fcntl

        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / f".{path.name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        with self._exclusive(key):
            data = self._existing(key).read_bytes()
        return data, hashlib.sha256(data).hexdigest()

    def file_sha256(self, key: str) -> str:
        return sha256_file(self._existing(key))

    def read_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        yield self._existing(key)  # published files are never modified in place

    def put_file(self, local: str | Path, key: str, if_absent: bool = False) -> bool:
        def fill(handle):
            with open(local, "rb") as source:
                shutil.copyfileobj(source, handle, 1 << 20)

        return _publish_local(fill, self._path(key), if_absent)

    def get_file(self, key: str, local: str | Path) -> Path:
        source = self._existing(key)
        local = Path(local)

        def fill(handle):
            with open(source, "rb") as stream:
                shutil.copyfileobj(stream, handle, 1 << 20)

        _publish_local(fill, local, if_absent=False)
        return local

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def copy_from(self, source: ArtifactStore, source_key: str, key: str) -> None:
        if not isinstance(source, LocalStore):
            return super().copy_from(source, source_key, key)
        # Published files never change in place, so a hard link is a copy that takes no space.
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(source._existing(source_key), target)
        except OSError:
            self.put_file(source._existing(source_key), key)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        base = Path(self.root)
        start = base / prefix if prefix else base
        if start.is_file():
            return {prefix: start.stat().st_size}
        if not start.is_dir():
            return {}
        return {
            p.relative_to(base).as_posix(): p.stat().st_size
            for p in start.rglob("*")
            if p.is_file() and not p.name.endswith((".tmp", ".lock"))
        }

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


# Answers to a conditional write that its caller interprets: the object exists (412), or another
# conditional write of the same key is in flight (409).
CONDITIONAL_ANSWERS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
CONFLICT_RETRIES = 5
# S3 error codes that mean "try again later": botocore retries them; when they outlast the
# retry budget the endpoint is down, which is said in one line.
TRANSIENT_CODES = {
    "500",
    "502",
    "503",
    "504",
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttling",
    "ThrottlingException",
    "RequestTimeTooSkewed",
}


class S3Store(ArtifactStore):
    def __init__(self, root: str):
        super().__init__(root)
        # The root names a bucket: `is_s3` refused one without when the store was opened.
        bucket, _, prefix = self.root[len("s3://") :].partition("/")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        from botocore.exceptions import PartialCredentialsError

        try:
            self._client = s3_client()
        except PartialCredentialsError as err:
            # Raised while the client is built, before any request: one key set without the other.
            raise CaiError(f"{root}: S3 credentials incomplete ({err})") from None

    def _key(self, key: str) -> str:
        return "/".join(p for p in (self.prefix, key.strip("/")) if p)

    def _call(self, what: str, key: str, fn, **kwargs):
        """Run one S3 operation, turning what a user can fix (credentials, bucket, endpoint) and an
        outage that outlasted the retries into one-line `CaiError`s."""
        from boto3.exceptions import RetriesExceededError, S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        uri = f"s3://{self.bucket}/{self._key(key)}"
        endpoint = self._client.meta.endpoint_url
        attempts = self._client.meta.config.retries.get("total_max_attempts")
        try:
            try:
                return fn(Bucket=self.bucket, **kwargs)
            except S3UploadFailedError as err:
                # boto3 wraps the ClientError (implicitly chained); unwrap it to name the cause.
                raise (err.__context__ or err) from None
        except NoCredentialsError:
            raise CaiError(
                f"{uri}: S3 credentials missing; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            conditional = "IfNoneMatch" in kwargs or "IfMatch" in kwargs
            if code in CONDITIONAL_ANSWERS or (conditional and code in ("NoSuchKey", "404")):
                raise  # the caller of a conditional write decides what they mean
            if code == "NotImplemented" and conditional:
                raise CaiError(
                    f"S3 endpoint {endpoint} does not support conditional writes (If-None-Match, If-Match), which cai needs "
                    "to keep concurrent writers of one output apart; use AWS S3, MinIO or another store that does"
                ) from None
            if code == "NoSuchBucket":
                raise CaiError(f"{uri}: bucket '{self.bucket}' does not exist") from None
            if code in ("NoSuchKey", "404"):
                # A HEAD (which downloads start with) answers a bare 404 for a missing bucket too.
                if self._bucket_missing():
                    raise CaiError(f"{uri}: bucket '{self.bucket}' does not exist") from None
                raise CaiError(f"{uri}: no such object") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise CaiError(f"{uri}: access denied while trying to {what} ({code})") from None
            if code in TRANSIENT_CODES or status.startswith("5"):
                raise CaiError(
                    f"S3 endpoint {endpoint} still failing after {attempts} attempts to {what} {uri} "
                    f"({code or status}); check the endpoint, or raise CAI_S3_MAX_ATTEMPTS"
                ) from None
            raise
        except (BotoCoreError, RetriesExceededError) as err:
            # RetriesExceededError: a streamed download that kept breaking off.
            raise CaiError(
                f"S3 endpoint {endpoint} unreachable after {attempts} attempts to {what} {uri} "
                f"({type(err).__name__}); check AWS_ENDPOINT_URL_S3"
            ) from None

    def _bucket_missing(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as err:
            return str(err.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket")
        except BotoCoreError:
            return False  # the object's own error is the one to report
        return False

    def write_bytes(self, key: str, data: bytes, if_absent: bool = False) -> bool:
        return self._put(key, io.BytesIO(data), if_absent) is not None

    def write_versioned(self, key: str, data: bytes, if_match: str | None = None) -> str | None:
        return self._put(key, io.BytesIO(data), if_absent=if_match is None, if_match=if_match)

    def read_versioned(self, key: str) -> tuple[bytes, str]:
        def get(Bucket, Key) -> tuple[bytes, str]:
            response = self._client.get_object(Bucket=Bucket, Key=Key)
            return response["Body"].read(), response["ETag"]

        return self._call("read", key, get, Key=self._key(key))

    def file_sha256(self, key: str) -> str:
        def stream(Bucket, Key) -> str:
            digest = hashlib.sha256()
            for block in self._client.get_object(Bucket=Bucket, Key=Key)["Body"].iter_chunks(1 << 20):
                digest.update(block)
            return digest.hexdigest()

        return self._call("read", key, stream, Key=self._key(key))

    def put_file(self, local: str | Path, key: str, if_absent: bool = False) -> bool:
        if if_absent:
            with open(local, "rb") as body:
                return self._put(key, body, if_absent=True) is not None
        # The transfer manager switches to multipart for big files; the object appears on completion.
        self._call(
            "write",
            key,
            lambda Bucket, Key: self._client.upload_file(str(local), Bucket, Key),
            Key=self._key(key),
        )
        return True

    def _put(self, key: str, body, if_absent: bool, if_match: str | None = None) -> str | None:
        """PUT `body` at `key`; with `if_absent`, a conditional write (`If-None-Match: *`), with
        `if_match` one on the object's ETag (`If-Match`). Returns the new ETag, or None when the
        condition fails (412, or 404 for an `If-Match` on an object that is gone). A 409 means
        another conditional write of the key is in flight, whose outcome is unknown yet, so it is
        retried until one stands."""
        from botocore.exceptions import ClientError

        extra = {"IfNoneMatch": "*"} if if_absent else {}
        if if_match is not None:
            extra["IfMatch"] = if_match
        for attempt in range(CONFLICT_RETRIES):
            body.seek(0)
            try:
                response = self._call("write", key, self._client.put_object, Key=self._key(key), Body=body, **extra)
                return response["ETag"]
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                if code in ("PreconditionFailed", "412") or (if_match and code in ("NoSuchKey", "404")):
                    return None
                if code not in ("ConditionalRequestConflict", "409") or attempt == CONFLICT_RETRIES - 1:
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    def get_file(self, key: str, local: str | Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self._call(
                "read",
                key,
                lambda Bucket, Key: self._client.download_file(Bucket, Key, tmp),
                Key=self._key(key),
            )
            os.replace(tmp, local)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return local

    def copy_from(self, source: ArtifactStore, source_key: str, key: str) -> None:
        if not isinstance(source, S3Store):
            return super().copy_from(source, source_key, key)
        # Server-side: the managed copy goes multipart for objects over 5 GB; no bytes pass here.
        self._call(
            "copy",
            key,
            lambda Bucket, Key: self._client.copy(
                {"Bucket": source.bucket, "Key": source._key(source_key)}, Bucket, Key
            ),
            Key=self._key(key),
        )

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        def head(Bucket, Key) -> bool:
            try:
                self._client.head_object(Bucket=Bucket, Key=Key)
            except ClientError as err:
                if str(err.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey"):
                    return False
                raise
            return True

        return self._call("read", key, head, Key=self._key(key))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        # A prefix names an object or a directory: "runs/a" must not match "runs/ab/...".
        full = self._key(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(
            "list", prefix, lambda Bucket, **kw: list(paginator.paginate(Bucket=Bucket, **kw)), Prefix=full
        )
        objects = (obj for page in pages for obj in page.get("Contents", []))
        strip = len(self.prefix) + 1 if self.prefix else 0
        return {
            obj["Key"][strip:]: obj["Size"]
            for obj in objects
            if not full or obj["Key"].startswith(full + "/") or (prefix and obj["Key"] == full)
        }

    def delete(self, key: str) -> None:
        for rel in self.list(key) or [key]:
            self._call("delete", rel, self._client.delete_object, Key=self._key(rel))


def s3_client():
    """A boto3 S3 client configured from the standard AWS environment variables.

    Uses botocore's `standard` retry mode (exponential backoff with jitter on throttling, 5xx
    and connection errors); `CAI_S3_MAX_ATTEMPTS` sets the attempt count (default 8). The
    endpoint and the attempt count come through `core.settings`, so a bad value is one line
    naming its variable. One client is kept per distinct configuration: building one costs
    about a second.
    """
    environment = settings()
    names = (
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_S3_ADDRESSING_STYLE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    )
    return _cached_client(
        environment.s3_endpoint,
        environment.s3_max_attempts,
        tuple(os.environ.get(name) for name in names),
    )


@functools.lru_cache(maxsize=8)
def _cached_client(endpoint: str | None, max_attempts: int, environment: tuple) -> object:
    # `environment` only keys the cache; the client reads the same variables itself.
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        s3={"addressing_style": os.environ.get("AWS_S3_ADDRESSING_STYLE", "path" if endpoint else "auto")},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        config=config,
    )
