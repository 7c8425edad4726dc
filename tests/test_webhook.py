"""`cai serve webhook` as a live process facing malformed, forged and replayed deliveries.

Real parts: the `cai serve webhook` command in a process of its own, reached over a TCP socket
with requests written byte by byte (so that a missing or lying `Content-Length`, a non-ASCII
header or a body that stops arriving are what the receiver really sees). Its Kubernetes API is
the stand-in (tests/kubernetes_standin.py), through a kubeconfig; no delivery here reaches it.
Each malformed delivery must get a 4xx within a second, and the receiver must still answer.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, wait_for_port
from kubernetes_standin import KubernetesStandIn

from cai_lib.platform.webhook import MAX_BODY_BYTES, READ_TIMEOUT_S, signature

SECRET = "s3cret"
MODEL = "cai-harmless-rl-cai"
CAI = Path(sys.executable).parent / "cai"


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    """`cai serve webhook` on a free port of 127.0.0.1, its cluster the stand-in."""
    work = tmp_path_factory.mktemp("webhook")
    with KubernetesStandIn(work) as standin:
        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "standin", "cluster": {"server": standin.url}}],
                    "users": [{"name": "tester", "user": {}}],
                    "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "tester"}}],
                    "current-context": "standin",
                }
            )
        )
        port = free_port()
        log = open(work / "webhook.log", "w")  # noqa: SIM115 - open while the receiver runs
        proc = subprocess.Popen(
            [str(CAI), "serve", "webhook", MODEL, "--namespace", "ml-team", "--port", str(port),
             "--tracking-uri", f"sqlite:///{work / 'unused.db'}"],
            env={**os.environ, "KUBECONFIG": str(kubeconfig), "CAI_WEBHOOK_SECRET": SECRET},
            stdout=log,
            stderr=log,
        )  # fmt: skip
        try:
            wait_for_port(port, proc, f"cai serve webhook (log: {work / 'webhook.log'})", timeout=120)
            yield {"port": port, "proc": proc, "standin": standin}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()


def exchange(port: int, request: bytes, wait_s: float = 10.0) -> tuple[int, float]:
    """Send `request` as written; (the status the receiver answered, seconds it took)."""
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]), time.monotonic() - began


def post(body: bytes, headers: dict[str, str | bytes], length: str | None = "auto") -> bytes:
    """A POST with `headers` (bytes kept as they are) and `body`; `length` None leaves
    Content-Length out, a string puts it as written."""
    lines = [b"POST / HTTP/1.1", b"Host: receiver"]
    if length == "auto":
        length = str(len(body))
    if length is not None:
        lines.append(b"Content-Length: " + length.encode())
    for key, value in headers.items():
        lines.append(key.encode() + b": " + (value if isinstance(value, bytes) else value.encode()))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def signed(body: bytes, delivery: str, stamp: int | None = None, secret: str = SECRET) -> dict[str, str]:
    stamp = str(int(time.time()) if stamp is None else stamp)
    return {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature(secret, delivery, stamp, body),
    }


def still_serving(port: int) -> bool:
    status, elapsed = exchange(port, b"GET /healthz HTTP/1.1\r\nHost: receiver\r\n\r\n")
    return status == 200 and elapsed < 1.0


EVENT = json.dumps(
    {
        "entity": "model_version_alias",
        "action": "created",
        "data": {"name": "other-model", "alias": "champion"},
    }
).encode()
STAMP = "1700000000"


@pytest.mark.parametrize(
    ("make_request", "status"),
    [
        (lambda: post(EVENT, signed(EVENT, "d-no-length"), length=None), 411),
        (lambda: post(EVENT, signed(EVENT, "d-word-length"), length="ninety"), 400),
        (lambda: post(EVENT, signed(EVENT, "d-negative-length"), length="-5"), 400),
        (lambda: post(b"", signed(b"", "d-huge"), length=str(MAX_BODY_BYTES + 1)), 413),
        (lambda: post(EVENT, {}), 401),
        (lambda: post(EVENT, {"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": STAMP, "X-MLflow-Signature": "v1,!!!"}), 401),
        (lambda: post(EVENT, {"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": STAMP, "X-MLflow-Signature": "v1,é€".encode()}), 401),
        (lambda: post(EVENT, {"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": STAMP, "X-MLflow-Signature": b"v1,\xff\xfe\xfd"}), 401),
        (lambda: post(EVENT, {"X-MLflow-Delivery-Id": "d", "X-MLflow-Timestamp": STAMP, "X-MLflow-Signature": "v1,AAAA"}), 401),
        (lambda: post(EVENT, signed(EVENT, "d-other-secret", secret="not-the-secret")), 401),
        (lambda: post(EVENT, signed(EVENT, "d-old", stamp=int(time.time()) - 3600)), 401),
        (lambda: post(b"{not json", signed(b"{not json", "d-not-json")), 400),
        (lambda: post(b"[1, 2]", signed(b"[1, 2]", "d-a-list")), 400),
        (lambda: post(b'{"data": "x"}', signed(b'{"data": "x"}', "d-data-a-string")), 400),
    ],
    ids=[
        "no-content-length", "content-length-a-word", "content-length-negative", "body-over-the-cap",
        "unsigned", "signature-not-base64", "signature-non-ascii-utf8", "signature-non-ascii-bytes",
        "signature-too-short", "signature-of-another-secret", "timestamp-an-hour-old", "body-not-json",
        "body-a-json-list", "data-not-an-object",
    ],
)  # fmt: skip
def test_a_malformed_delivery_gets_a_4xx_within_a_second_and_the_receiver_keeps_serving(
    receiver, make_request, status
):
    # Made now, not at collection: a signed delivery is fresh for MAX_AGE_S only.
    answered, elapsed = exchange(receiver["port"], make_request())
    assert (answered, elapsed < 1.0) == (status, True)
    assert still_serving(receiver["port"])
    assert receiver["proc"].poll() is None


def test_a_body_that_stops_arriving_is_cut_off_after_the_read_timeout_while_others_are_served(receiver):
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", receiver["port"]), timeout=30) as stalled:
        stalled.sendall(post(EVENT, signed(EVENT, "d-stalled"))[:-10])  # the body's last 10 bytes never come
        assert still_serving(receiver["port"])
        answer = stalled.recv(4096)
    assert int(answer.split(b" ", 2)[1]) == 408
    assert READ_TIMEOUT_S <= time.monotonic() - began < READ_TIMEOUT_S + 2


def test_a_replayed_delivery_gets_409(receiver):
    delivery = post(EVENT, signed(EVENT, "d-replayed"))
    first, _ = exchange(receiver["port"], delivery)
    again, elapsed = exchange(receiver["port"], delivery)
    assert (first, again, elapsed < 1.0) == (202, 409, True)


def test_the_same_event_under_a_new_delivery_id_is_not_a_replay(receiver):
    first, _ = exchange(receiver["port"], post(EVENT, signed(EVENT, "d-once")))
    second, _ = exchange(receiver["port"], post(EVENT, signed(EVENT, "d-twice")))
    assert (first, second) == (202, 202)
