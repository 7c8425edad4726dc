"""The receiver of MLflow's webhooks: a `champion` alias moved, so serving follows it.

MLflow (>= 3.3, SQL backend) posts `model_version_alias.created` to a registered webhook's URL
whenever an alias is set, signed with the webhook's secret: header `X-MLflow-Signature` is
`v1,` + base64(HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")), beside
`X-MLflow-Delivery-Id` and `X-MLflow-Timestamp`. A promotion made outside the pipeline (by
`cai promote`, or in MLflow's UI by someone allowed to) then reaches serving too.
`register_webhook` creates (or updates) the webhook on the server.

The receiver faces whatever reaches its port, so it answers every request quickly and keeps
serving:

- a body is read only with a valid `Content-Length` of at most `MAX_BODY_BYTES` (411 without
  one, 400 for one that is not a number, 413 for one too large), and every read of the
  connection times out after `READ_TIMEOUT_S` (408 for a body that stops arriving);
- a delivery whose headers are missing, whose signature is malformed (not `v1,` + base64 of 32
  bytes, non-ASCII included) or does not verify, or whose timestamp is more than `MAX_AGE_S` from
  now, gets 401; a signed body that is not a JSON object gets 400;
- each delivery id is remembered for the signature's validity window (twice `MAX_AGE_S`: a
  timestamp can be that far from the receiver's clock in either direction), and a delivery id
  seen before gets 409 (MLflow's own retry of an answered delivery, or a replay);
- a `champion` alias set on a model this receiver serves is queued (202) and synced by one worker
  thread, in order (`cai_lib.platform.serving.sync`, which verifies every byte first): a sync
  outlasts MLflow's delivery timeout, and two at once would race on one InferenceService.
  Anything else is ignored (202).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cai_lib.core.errors import CaiError
from cai_lib.core.names import CHAMPION
from cai_lib.core.settings import variable
from cai_lib.core.tracking import connect

log = logging.getLogger(__name__)

SECRET_ENV = variable("webhook_secret")
WEBHOOK_NAME = "cai-serve-sync"
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
MAX_AGE_S = 300
# An alias event is a few hundred bytes; 64 KiB leaves room and no more.
MAX_BODY_BYTES = 64 * 1024
READ_TIMEOUT_S = 5.0
SIGNATURE_BYTES = 32


class Refused(Exception):
    """A delivery answered with `status` (a 4xx) and `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for `body`."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def _digest_of(given: str) -> bytes:
    """The HMAC a `v1,<base64>` signature carries; `Refused` (401) for any other shape."""
    scheme, _, encoded = given.partition(",")
    try:
        digest = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        digest = b""
    if scheme != "v1" or len(digest) != SIGNATURE_BYTES:
        raise Refused(401, f"malformed {SIGNATURE_HEADER}: expected v1,<base64 of a 32-byte HMAC-SHA256>")
    return digest


class Deliveries:
    """Delivery ids seen within the signature's validity window (a replay is one seen again)."""

    def __init__(self, window_s: float = 2 * MAX_AGE_S):
        self.window_s = window_s
        self.seen: dict[str, float] = {}
        self.lock = threading.Lock()

    def first_time(self, delivery: str, now: float) -> bool:
        """Remember `delivery`; False when it was seen within the window."""
        with self.lock:
            self.seen = {d: at for d, at in self.seen.items() if now - at <= self.window_s}
            if delivery in self.seen:
                return False
            self.seen[delivery] = now
            return True


def verified(secret: str, headers, body: bytes, deliveries: Deliveries, now: float | None = None) -> dict:
    """The event in `body` if its signature verifies, it is fresh and its delivery id is new;
    else `Refused` with the status to answer and why."""
    now = time.time() if now is None else now
    delivery, stamp, given = (headers.get(h) for h in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not (delivery and stamp and given):
        raise Refused(401, "unsigned request: no X-MLflow-Signature, -Timestamp or -Delivery-Id header")
    digest = _digest_of(given)
    signed = f"{delivery}.{stamp}.".encode() + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    if not hmac.compare_digest(digest, expected):
        raise Refused(401, "the signature does not verify with this receiver's secret")
    if not stamp.isdigit() or abs(now - int(stamp)) > MAX_AGE_S:
        raise Refused(401, f"timestamp {stamp!r} is more than {MAX_AGE_S} s from now")
    try:
        event = json.loads(body)
    except ValueError:
        raise Refused(400, "the body is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("data", {}), dict):
        raise Refused(400, "the body is not an MLflow webhook event (a JSON object with a data object)")
    if not deliveries.first_time(delivery, now):
        raise Refused(409, f"delivery {delivery} was received before")
    return event


def champion_of(event: dict, served: list[str]) -> tuple[str | None, str]:
    """(the served model whose `champion` alias the event sets, or None; what was ignored, if so)."""
    data = event.get("data") or {}
    kind = (event.get("entity"), event.get("action"))
    if kind != ("model_version_alias", "created") or data.get("alias") != CHAMPION:
        return None, f"{kind[0]}.{kind[1]} {data.get('alias', '')}".strip()
    if data.get("name") not in served:
        return None, f"{data.get('name')} is not served here"
    return str(data["name"]), ""


class Syncer:
    """One worker thread that runs `on_champion(model)` for each queued model, in order."""

    def __init__(self, on_champion):
        self.on_champion = on_champion
        self.queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="serve sync").start()

    def _work(self) -> None:
        while True:
            model = self.queue.get()
            try:
                log.info("synced %s: %s", model, self.on_champion(model))
            except CaiError as err:
                log.error("not synced %s: %s", model, err)
            except Exception:  # noqa: BLE001 - the worker outlives a bug in one sync; it is logged
                log.exception("not synced %s", model)
            finally:
                self.queue.task_done()


def receiver(
    port: int, secret: str, served: list[str], on_champion, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """An HTTP server (not started) that verifies and handles webhook deliveries on `port`."""
    deliveries = Deliveries()
    syncer = Syncer(on_champion)

    class Handler(BaseHTTPRequestHandler):
        # Applied to the connection's socket before anything is read (StreamRequestHandler.setup).
        timeout = READ_TIMEOUT_S

        def reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True

        def do_GET(self):
            self.reply(200, {"status": "ok"}) if self.path == "/healthz" else self.reply(
                404, {"error": self.path}
            )

        def body(self) -> bytes:
            length = self.headers.get("Content-Length")
            if length is None:
                raise Refused(411, "a delivery needs a Content-Length")
            if not length.strip().isdigit():
                raise Refused(400, f"Content-Length {length!r} is not a number of bytes")
            if int(length) > MAX_BODY_BYTES:
                raise Refused(413, f"a body of {int(length)} bytes is over the limit of {MAX_BODY_BYTES}")
            try:
                data = self.rfile.read(int(length))
            except TimeoutError:
                raise Refused(408, f"the body did not arrive within {READ_TIMEOUT_S} s") from None
            if len(data) != int(length):
                raise Refused(400, f"the body ended after {len(data)} of {int(length)} bytes")
            return data

        def do_POST(self):
            try:
                event = verified(secret, self.headers, self.body(), deliveries)
            except Refused as refused:
                self.reply(refused.status, {"error": str(refused)})
                return
            model, ignored = champion_of(event, served)
            if model is None:
                self.reply(202, {"ignored": ignored})
                return
            syncer.queue.put(model)
            self.reply(202, {"queued": model})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    server.syncer = syncer
    return server


def register_webhook(tracking_uri: str | None, url: str, secret: str) -> str:
    """Create the `model_version_alias.created` webhook to `url` on the MLflow server, or update
    the one this function made before; returns its id."""
    from mlflow.entities.webhook import WebhookEvent

    client = connect(tracking_uri)
    events = [WebhookEvent("model_version_alias", "created")]
    existing = [w for w in client.list_webhooks() if w.name == WEBHOOK_NAME]
    if existing:
        return client.update_webhook(existing[0].webhook_id, url=url, events=events, secret=secret).webhook_id
    return client.create_webhook(WEBHOOK_NAME, url, events, secret=secret,
                                 description="cai serve sync: serving follows the champion alias").webhook_id  # fmt: skip
