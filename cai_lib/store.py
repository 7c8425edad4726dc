"""`ArtifactStore`: one interface over a local directory and an `s3://` prefix.

Every stage reads and writes through it, so the same code runs on a laptop (a directory) and in
a pod (S3). Writes are atomic: a single object becomes visible whole (local files are renamed
into place; an S3 PUT is atomic), and a directory (a checkpoint) counts as present only once its
`_MANIFEST.json` is written, last. Transient S3 errors are retried with exponential backoff by
botocore's standard retry mode. Endpoint and credentials come from the standard AWS variables
(`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from cai_lib.errors import CaiError

MANIFEST = "_MANIFEST.json"
T = TypeVar("T", bound=BaseModel)


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


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
    def write_bytes(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        raise NotImplementedError

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys (relative to the root) of every object under `prefix`, sorted."""
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def put_file(self, local: str | Path, key: str) -> None:
        self.write_bytes(key, Path(local).read_bytes())

    def get_file(self, key: str, local: str | Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        _atomic_local_write(local, self.read_bytes(key))
        return local

    # -- built on the primitives -------------------------------------------------------------
    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_json(self, key: str, obj: object) -> None:
        self.write_text(key, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, key: str) -> object:
        return json.loads(self.read_text(key))

    def iter_lines(self, key: str) -> Iterator[str]:
        """The text lines of an object, read as a stream."""
        yield from self.read_text(key).splitlines()

    def write_jsonl(self, key: str, records: Iterable[BaseModel]) -> int:
        """Stream records into one JSONL object (spooled through a local temporary file, then
        published atomically); returns the row count."""
        count = 0
        with tempfile.NamedTemporaryFile("w", suffix=".jsonl", encoding="utf-8", delete=False) as handle:
            try:
                for record in records:
                    handle.write(record.model_dump_json() + "\n")
                    count += 1
                handle.close()
                self.put_file(handle.name, key)
            finally:
                os.unlink(handle.name)
        return count

    def read_jsonl(self, key: str, model: type[T]) -> Iterator[T]:
        """Yield validated records as they stream in; a bad row raises `CaiError` naming the URI
        and line number."""
        yield from parse_jsonl_lines(self.iter_lines(key), model, self.uri_of(key))

    def put_dir(self, local_dir: str | Path, key: str) -> str:
        """Upload a directory (e.g. a checkpoint); its manifest is written last. Returns its URI."""
        local_dir = Path(local_dir)
        files = sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name != MANIFEST)
        entries = {}
        for path in files:
            rel = path.relative_to(local_dir).as_posix()
            self.put_file(path, join_uri(key, rel))
            entries[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        self.write_json(join_uri(key, MANIFEST), {"files": entries})
        return self.uri_of(key)

    def dir_exists(self, key: str) -> bool:
        """True only for a directory whose upload finished (its manifest exists)."""
        return self.exists(join_uri(key, MANIFEST))

    def get_dir(self, key: str, local_dir: str | Path) -> Path:
        """Download a finished directory; refuses one whose manifest is missing."""
        if not self.dir_exists(key):
            raise CaiError(f"{self.uri_of(key)}: no finished directory there (no {MANIFEST})")
        manifest = self.read_json(join_uri(key, MANIFEST))
        local_dir = Path(local_dir)
        for rel in manifest["files"]:
            self.get_file(join_uri(key, rel), local_dir / rel)
        return local_dir


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


def _atomic_local_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStore(ArtifactStore):
    def _path(self, key: str) -> Path:
        return Path(self.root) / key

    def write_bytes(self, key: str, data: bytes) -> None:
        _atomic_local_write(self._path(key), data)

    def read_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise CaiError(f"{path}: no such file")
        return path.read_bytes()

    def iter_lines(self, key: str) -> Iterator[str]:
        path = self._path(key)
        if not path.is_file():
            raise CaiError(f"{path}: no such file")
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                yield line.rstrip("\n")

    def put_file(self, local: str | Path, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        shutil.copyfile(local, tmp)
        os.replace(tmp, target)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = Path(self.root)
        start = base / prefix if prefix else base
        if start.is_file():
            return [prefix]
        if not start.is_dir():
            return []
        return sorted(
            p.relative_to(base).as_posix()
            for p in start.rglob("*")
            if p.is_file() and not p.name.endswith(".tmp")
        )

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


class S3Store(ArtifactStore):
    def __init__(self, root: str):
        super().__init__(root)
        bucket, _, prefix = self.root[len("s3://") :].partition("/")
        if not bucket:
            raise CaiError(f"{root}: an s3:// URI needs a bucket name")
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
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        uri = f"s3://{self.bucket}/{self._key(key)}"
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except NoCredentialsError:
            raise CaiError(
                f"{uri}: S3 credentials missing; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ) from None
        except EndpointConnectionError as err:
            raise CaiError(f"{uri}: S3 endpoint unreachable ({err}); check AWS_ENDPOINT_URL_S3") from None
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code == "NoSuchBucket":
                raise CaiError(f"{uri}: bucket '{self.bucket}' does not exist") from None
            if code in ("NoSuchKey", "404"):
                raise CaiError(f"{uri}: no such object") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise CaiError(f"{uri}: access denied while trying to {what} ({code})") from None
            raise

    def write_bytes(self, key: str, data: bytes) -> None:
        self._call("write", key, self._client.put_object, Key=self._key(key), Body=data)

    def read_bytes(self, key: str) -> bytes:
        response = self._call("read", key, self._client.get_object, Key=self._key(key))
        return response["Body"].read()

    def iter_lines(self, key: str) -> Iterator[str]:
        response = self._call("read", key, self._client.get_object, Key=self._key(key))
        for line in response["Body"].iter_lines():
            yield line.decode("utf-8")

    def put_file(self, local: str | Path, key: str) -> None:
        # upload_file switches to multipart for big files; the object appears only on completion.
        from boto3.exceptions import S3UploadFailedError

        def upload(Bucket, Key):
            try:
                self._client.upload_file(str(local), Bucket, Key)
            except S3UploadFailedError as err:
                # boto3 wraps the ClientError (implicitly chained); unwrap it so _call can name a
                # missing bucket or denied access.
                raise (err.__context__ or err) from None

        self._call("write", key, upload, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._call("read", key, self._client.head_object, Key=self._key(key))
            return True
        except CaiError as err:
            if "no such object" in str(err):
                return False
            raise

    def list(self, prefix: str = "") -> list[str]:
        # A prefix names an object or a directory: "runs/a" must not match "runs/ab/...".
        full = self._key(prefix)
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(
            "list", prefix, lambda Bucket, **kw: list(paginator.paginate(Bucket=Bucket, **kw)), Prefix=full
        )
        keys = (obj["Key"] for page in pages for obj in page.get("Contents", []))
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(
            k[strip:] for k in keys if not full or k.startswith(full + "/") or (prefix and k == full)
        )

    def delete(self, key: str) -> None:
        for rel in self.list(key) or [key]:
            self._call("delete", rel, self._client.delete_object, Key=self._key(rel))


def s3_client():
    """A boto3 S3 client configured from the standard AWS environment variables.

    Uses botocore's `standard` retry mode (exponential backoff with jitter on throttling, 5xx
    and connection errors); `CAI_S3_MAX_ATTEMPTS` sets the attempt count (default 8). One client
    is kept per distinct configuration: building one costs about a second.
    """
    names = (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "CAI_S3_MAX_ATTEMPTS",
        "AWS_S3_ADDRESSING_STYLE",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    )
    return _cached_client(tuple(os.environ.get(name) for name in names))


@functools.lru_cache(maxsize=8)
def _cached_client(environment: tuple) -> object:
    # `environment` only keys the cache; the client reads the same variables itself.
    import boto3
    from botocore.config import Config

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    config = Config(
        retries={"mode": "standard", "total_max_attempts": int(os.environ.get("CAI_S3_MAX_ATTEMPTS", "8"))},
        s3={"addressing_style": os.environ.get("AWS_S3_ADDRESSING_STYLE", "path" if endpoint else "auto")},
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        config=config,
    )
