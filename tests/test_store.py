"""ArtifactStore over a local directory and over a real S3 endpoint (moto's server on loopback).

Every behaviour test runs against both backends, so the two stay interchangeable.
"""

from __future__ import annotations

import http.server
import os
import threading

import pytest

from cai_lib.core.errors import CaiError
from cai_lib.core.names import MANIFEST
from cai_lib.core.records import PromptRecord
from cai_lib.core.store import ArtifactStore, checkpoint_location, s3_client, sha256_file

# Every variable through which botocore could find credentials, so a test can take them all away.
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


# The s3 variant starts moto's server through getfixturevalue, which the tier hook cannot see.
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.server)])
def store(request, tmp_path) -> ArtifactStore:
    """A store rooted in a temporary directory, or under a prefix of a fresh moto bucket."""
    if request.param == "local":
        return ArtifactStore.open(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return ArtifactStore.open(f"s3://{bucket}/runs/r1")


@pytest.fixture
def no_credentials(s3_env, monkeypatch, tmp_path):
    """The S3 endpoint stays, but no credentials can be found in env, files or instance metadata."""
    for name in CREDENTIAL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def prompt(text: str) -> PromptRecord:
    return PromptRecord(id=text[:8], prompt=text, kind="helpful", source="test")


def make_checkpoint(root) -> dict[str, bytes]:
    files = {
        "config.json": b'{"hidden_size": 8}',
        "model.safetensors": bytes(range(256)) * 64,
        "tokenizer/vocab.txt": b"a\nb\nc\n",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_bytes_round_trip(store):
    data = bytes(range(256))
    store.write_bytes("blobs/all-bytes.bin", data)
    assert store.read_bytes("blobs/all-bytes.bin") == data


def test_text_round_trip_keeps_unicode(store):
    store.write_text("notes.txt", "naïve café — ünïcode\n")
    assert store.read_text("notes.txt") == "naïve café — ünïcode\n"


def test_json_round_trip(store):
    obj = {"rows": 3, "sha256": "ab" * 32, "nested": {"list": [1, 2.5, None]}}
    store.write_json("meta/info.json", obj)
    assert store.read_json("meta/info.json") == obj


def test_write_replaces_an_object_whole(store):
    store.write_text("state.txt", "first version, longer than the second")
    store.write_text("state.txt", "second")
    assert store.read_text("state.txt") == "second"


def test_jsonl_round_trip_of_records(store):
    records = [prompt("How do I bake bread?"), prompt("Explain tides.\nIn two lines.")]
    assert store.write_jsonl("prompts/train.jsonl", records) == 2
    assert list(store.read_jsonl("prompts/train.jsonl", PromptRecord)) == records


def test_read_jsonl_names_uri_and_line_of_a_bad_row(store):
    good = prompt("A fine prompt").model_dump_json()
    store.write_text("prompts/bad.jsonl", f"{good}\n\n{good}\n" + '{"id": "x", "kind": "helpful"}\n')
    with pytest.raises(CaiError) as err:
        list(store.read_jsonl("prompts/bad.jsonl", PromptRecord))
    message = str(err.value)
    assert message.startswith(store.uri_of("prompts/bad.jsonl") + ": line 4: field 'prompt'")


def test_read_of_a_missing_key_is_a_cai_error_naming_it(store):
    with pytest.raises(CaiError, match="nothing/here.json"):
        store.read_json("nothing/here.json")


def test_put_dir_then_get_dir_restores_every_file(store, tmp_path):
    source = tmp_path / "ckpt"
    files = make_checkpoint(source)
    uri = store.put_dir(source, "checkpoints/sft")
    assert uri == store.uri_of("checkpoints/sft")

    restored = store.get_dir("checkpoints/sft", tmp_path / "restored")
    assert {
        p.relative_to(restored).as_posix(): p.read_bytes() for p in restored.rglob("*") if p.is_file()
    } == files


def test_put_dir_writes_a_manifest_of_sizes_and_hashes(store, tmp_path):
    source = tmp_path / "ckpt"
    files = make_checkpoint(source)
    store.put_dir(source, "checkpoints/sft")
    manifest = store.read_json(f"checkpoints/sft/{MANIFEST}")
    assert manifest == {
        "files": {
            rel: {"bytes": len(data), "sha256": sha256_file(source / rel)} for rel, data in files.items()
        }
    }


def test_dir_exists_only_once_its_manifest_is_written(store, tmp_path):
    source = tmp_path / "ckpt"
    make_checkpoint(source)
    # An interrupted upload: the files are there but the manifest, written last, is not.
    store.put_file(source / "config.json", "checkpoints/half/config.json")
    assert not store.dir_exists("checkpoints/half")
    with pytest.raises(CaiError, match="no finished directory"):
        store.get_dir("checkpoints/half", tmp_path / "out")

    store.put_dir(source, "checkpoints/half")
    assert store.dir_exists("checkpoints/half")


def test_put_file_and_get_file(store, tmp_path):
    local = tmp_path / "weights.bin"
    local.write_bytes(b"\x00\x01" * 1000)
    store.put_file(local, "files/weights.bin")
    fetched = store.get_file("files/weights.bin", tmp_path / "down" / "w.bin")
    assert fetched.read_bytes() == local.read_bytes()


def test_exists_is_true_only_for_written_objects(store):
    store.write_text("a/present.txt", "x")
    assert store.exists("a/present.txt")
    assert not store.exists("a/absent.txt")


def test_list_returns_sorted_keys_under_a_prefix(store):
    for key in ("data/b.jsonl", "data/a.jsonl", "data/sub/c.jsonl", "other/d.jsonl"):
        store.write_text(key, "{}\n")
    assert store.list("data") == ["data/a.jsonl", "data/b.jsonl", "data/sub/c.jsonl"]
    assert store.list() == ["data/a.jsonl", "data/b.jsonl", "data/sub/c.jsonl", "other/d.jsonl"]
    assert store.list("missing") == []


def test_list_of_a_prefix_excludes_siblings_sharing_its_leading_characters(store):
    store.write_text("ckpt/model.bin", "new")
    store.write_text("ckpt-old/model.bin", "old")
    assert store.list("ckpt") == ["ckpt/model.bin"]


def test_list_of_an_object_key_returns_that_key(store):
    store.write_text("data/x.jsonl", "1")
    assert store.list("data/x.jsonl") == ["data/x.jsonl"]


def test_delete_removes_one_object(store):
    store.write_text("keep.txt", "k")
    store.write_text("drop.txt", "d")
    store.delete("drop.txt")
    assert not store.exists("drop.txt")
    assert store.read_text("keep.txt") == "k"


def test_delete_of_a_directory_removes_everything_under_it(store, tmp_path):
    make_checkpoint(tmp_path / "ckpt")
    store.put_dir(tmp_path / "ckpt", "checkpoints/old")
    store.write_text("checkpoints/new/config.json", "{}")
    store.delete("checkpoints/old")
    assert not store.dir_exists("checkpoints/old")
    assert store.list("checkpoints") == ["checkpoints/new/config.json"]


def test_delete_leaves_keys_that_only_share_a_name_prefix(store):
    store.write_text("data/x.jsonl", "1")
    store.write_text("data/x.jsonl.bak", "2")
    store.delete("data/x.jsonl")
    assert store.list("data") == ["data/x.jsonl.bak"]


def test_child_store_sees_the_parents_keys(store):
    store.write_text("runs/7/metrics.json", "{}")
    child = store.child("runs/7")
    assert child.uri == store.uri_of("runs/7")
    assert child.list() == ["metrics.json"]


def test_s3_keys_live_under_the_root_prefix(s3_bucket):
    ArtifactStore.open(f"s3://{s3_bucket}/team/run-1").write_text("out.txt", "x")
    keys = [obj["Key"] for obj in s3_client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["team/run-1/out.txt"]


def test_missing_credentials_are_a_cai_error(s3_bucket, no_credentials):
    with pytest.raises(CaiError, match="S3 credentials missing"):
        ArtifactStore.open(f"s3://{s3_bucket}/p").read_text("k.txt")


def test_a_key_without_its_secret_is_a_cai_error(s3_bucket, no_credentials, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    with pytest.raises(CaiError, match=f"s3://{s3_bucket}/p.*credentials"):
        ArtifactStore.open(f"s3://{s3_bucket}/p").read_text("k.txt")


@pytest.mark.parametrize(
    "operation",
    [
        pytest.param(lambda store, tmp: store.read_bytes("k.bin"), id="read"),
        pytest.param(lambda store, tmp: store.write_text("k.txt", "x"), id="write"),
        pytest.param(lambda store, tmp: store.list(), id="list"),
        pytest.param(lambda store, tmp: store.put_file(tmp / "f.txt", "f.txt"), id="put_file"),
        pytest.param(lambda store, tmp: store.put_dir(tmp, "ckpt"), id="put_dir"),
    ],
)
def test_a_missing_bucket_is_a_cai_error_naming_it(s3_env, tmp_path, operation):
    (tmp_path / "f.txt").write_text("x")
    store = ArtifactStore.open("s3://no-such-bucket-3f9a/prefix")
    with pytest.raises(CaiError, match="bucket 'no-such-bucket-3f9a' does not exist"):
        operation(store, tmp_path)


def test_an_s3_uri_without_a_bucket_is_a_cai_error(s3_env):
    with pytest.raises(CaiError, match="'s3://': names no bucket; write s3://BUCKET/KEY"):
        ArtifactStore.open("s3://")


def test_s3_client_uses_standard_retries_with_the_configured_attempts(s3_env, monkeypatch):
    monkeypatch.setenv("CAI_S3_MAX_ATTEMPTS", "5")
    retries = s3_client().meta.config.retries
    # botocore counts `total_max_attempts` including the first request; `max_attempts` counts retries.
    assert (retries["mode"], retries["total_max_attempts"]) == ("standard", 5)


def test_s3_client_defaults_to_eight_attempts(s3_env, monkeypatch):
    monkeypatch.delenv("CAI_S3_MAX_ATTEMPTS")
    assert s3_client().meta.config.retries["total_max_attempts"] == 8


class AlwaysUnavailable(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that answers every request with a transient 503 and counts them."""

    requests = 0
    body = b"<Error><Code>SlowDown</Code><Message>try again</Message></Error>"

    def do_HEAD(self):
        type(self).requests += 1
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()

    def do_GET(self):
        self.do_HEAD()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture
def unavailable_s3(s3_env, monkeypatch):
    """Points the store at an endpoint that always answers 503, with 3 attempts per request."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), AlwaysUnavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("CAI_S3_MAX_ATTEMPTS", "3")
    AlwaysUnavailable.requests = 0
    yield
    server.shutdown()
    server.server_close()


def test_a_transient_error_is_retried_up_to_the_configured_attempts(unavailable_s3):
    store = ArtifactStore.open("s3://flaky/p")
    with pytest.raises(CaiError):
        store.read_bytes("k")
    assert AlwaysUnavailable.requests == 3


def test_an_outage_that_outlasts_the_retries_is_one_line_naming_the_endpoint(unavailable_s3):
    store = ArtifactStore.open("s3://flaky/p")
    with pytest.raises(CaiError) as err:
        store.write_text("k", "x")
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    assert str(err.value).startswith(
        f"S3 endpoint {endpoint} still failing after 3 attempts to write s3://flaky/p/k"
    )
    assert "\n" not in str(err.value)


def test_exists_does_not_report_absence_when_the_endpoint_keeps_failing(unavailable_s3):
    # A write-once registry checks exists() before writing; a false "absent" would let it overwrite.
    store = ArtifactStore.open("s3://flaky/p")
    with pytest.raises(CaiError, match="still failing"):
        store.exists("k")


# -- create-only writes ---------------------------------------------------------------------------------


def test_a_create_only_write_writes_when_nothing_is_there(store):
    assert store.write_text("marker.json", "first", if_absent=True) is True
    assert store.read_text("marker.json") == "first"


def test_a_create_only_write_leaves_an_existing_object_alone(store):
    store.write_text("marker.json", "first", if_absent=True)
    assert store.write_text("marker.json", "second", if_absent=True) is False
    assert store.read_text("marker.json") == "first"


def test_a_create_only_file_upload_leaves_an_existing_object_alone(store, tmp_path):
    (tmp_path / "a.jsonl").write_text("a\n")
    (tmp_path / "b.jsonl").write_text("b\n")
    store.put_file(tmp_path / "a.jsonl", "part-00000.jsonl", if_absent=True)
    assert store.put_file(tmp_path / "b.jsonl", "part-00000.jsonl", if_absent=True) is False
    assert store.read_text("part-00000.jsonl") == "a\n"


# -- compare-and-swap writes ------------------------------------------------------------------------------


def test_a_versioned_create_writes_once_and_returns_the_version_a_read_sees(store):
    version = store.write_versioned("claim.json", b"first")
    assert store.write_versioned("claim.json", b"second") is None
    assert store.read_versioned("claim.json") == (b"first", version)


def test_a_write_on_the_version_read_replaces_the_object(store):
    store.write_versioned("claim.json", b"first")
    _, version = store.read_versioned("claim.json")
    assert store.write_versioned("claim.json", b"second", if_match=version) is not None
    assert store.read_bytes("claim.json") == b"second"


def test_a_write_on_a_version_someone_replaced_meanwhile_is_refused(store):
    """The fence: the second writer read the first version, which another write has replaced."""
    first = store.write_versioned("claim.json", b"first")
    store.write_versioned("claim.json", b"taken over", if_match=first)
    assert store.write_versioned("claim.json", b"late owner", if_match=first) is None
    assert store.read_bytes("claim.json") == b"taken over"


def test_a_write_on_a_version_of_an_object_that_is_gone_is_refused(store):
    version = store.write_versioned("claim.json", b"first")
    store.delete("claim.json")
    assert store.write_versioned("claim.json", b"late owner", if_match=version) is None
    assert not store.exists("claim.json")


# -- verified downloads -----------------------------------------------------------------------------------


def uploaded_checkpoint(store, tmp_path) -> str:
    source = tmp_path / "ckpt"
    make_checkpoint(source)
    store.put_dir(source, "ckpt")
    return "ckpt"


def test_a_file_one_byte_longer_than_its_manifest_says_is_refused_naming_it(store, tmp_path):
    key = uploaded_checkpoint(store, tmp_path)
    store.write_bytes(f"{key}/model.safetensors", store.read_bytes(f"{key}/model.safetensors") + b"\0")
    with pytest.raises(CaiError, match=r"ckpt/model\.safetensors: 16385 bytes where the manifest says 16384"):
        store.get_dir(key, tmp_path / "out")


def test_a_file_whose_content_changed_is_refused_naming_it(store, tmp_path):
    key = uploaded_checkpoint(store, tmp_path)
    store.write_bytes(f"{key}/config.json", b'{"hidden_size": 9}')
    with pytest.raises(CaiError, match=r"ckpt/config\.json: sha256 differs from the manifest"):
        store.get_dir(key, tmp_path / "out")


def test_a_file_of_the_same_size_with_other_bytes_is_refused_where_it_lies(store, tmp_path):
    key = uploaded_checkpoint(store, tmp_path)
    weights = store.read_bytes(f"{key}/model.safetensors")
    store.write_bytes(f"{key}/model.safetensors", bytes([weights[0] ^ 1]) + weights[1:])
    with pytest.raises(CaiError, match=r"ckpt/model\.safetensors: sha256 differs from the manifest"):
        store.verify_dir(key)


def test_a_verified_directory_returns_its_manifest(store, tmp_path):
    key = uploaded_checkpoint(store, tmp_path)
    assert set(store.verify_dir(key)["files"]) == {"config.json", "model.safetensors", "tokenizer/vocab.txt"}


@pytest.mark.parametrize("entry", ["../x", "/etc/x", "a/../../x", "a\\..\\x", "./x"])
def test_a_manifest_entry_outside_the_directory_is_refused_before_any_download(store, tmp_path, entry):
    store.write_json("ckpt/_MANIFEST.json", {"files": {entry: {"bytes": 1, "sha256": "0" * 64}}})
    with pytest.raises(CaiError, match="is not a relative path inside the directory"):
        store.get_dir("ckpt", tmp_path / "out" / "in")
    assert not (tmp_path / "out").exists()


def test_a_file_over_the_multipart_threshold_round_trips(store, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(9 * 1024 * 1024))  # boto3 switches to multipart at 8 MiB
    store.put_file(big, "big.bin")
    assert sha256_file(store.get_file("big.bin", tmp_path / "back.bin")) == sha256_file(big)


# -- where a checkpoint may be written --------------------------------------------------------------------


def test_a_finished_checkpoint_location_is_refused(store, tmp_path):
    uploaded_checkpoint(store, tmp_path)
    with pytest.raises(CaiError, match="already holds a finished checkpoint"):
        checkpoint_location(store.uri_of("ckpt"))


def test_a_location_with_other_files_is_refused_and_left_alone(store):
    store.write_bytes("ckpt/notes.txt", b"someone's data")
    with pytest.raises(CaiError, match="holds files but no finished checkpoint"):
        checkpoint_location(store.uri_of("ckpt"))
    assert store.read_bytes("ckpt/notes.txt") == b"someone's data"


# -- an outage behind a real proxy ------------------------------------------------------------------------


@pytest.fixture
def proxied_s3(s3_bucket, s3_env, monkeypatch):
    """The moto bucket reached through a fault-injecting proxy, 6 attempts per request."""
    from fault_proxy import FaultProxy

    proxy = FaultProxy(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    monkeypatch.setenv("CAI_S3_MAX_ATTEMPTS", "6")
    yield proxy, ArtifactStore.open(f"s3://{s3_bucket}/data")
    proxy.close()


def test_an_outage_that_ends_within_the_retries_loses_no_row(proxied_s3):
    from cai_lib.core.shards import ShardedOutput, read_dataset

    proxy, store = proxied_s3
    rows = [prompt(f"prompt number {i}") for i in range(10)]

    def process(chunk):
        proxy.fail_next(4)  # every shard meets an outage of four requests
        return list(chunk)

    written = ShardedOutput(store.uri, {"rows": [r.id for r in rows]}).run(rows, 2, process)

    assert written == 10 and proxy.failed == 20
    assert list(read_dataset(store.uri, PromptRecord)) == rows
