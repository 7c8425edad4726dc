"""The receiver of MLflow's webhooks: a `champion` alias moved, so serving follows it.

MLflow (>= 3.3, SQL backend) posts `model_version_alias.created` to a registered webhook's URL
whenever an alias is set, signed with the webhook's secret: header `X-MLflow-Signature` is
`v1,` + base64(HMAC-SHA256(secret, "<delivery id>.<timestamp>.<body>")), beside
`X-MLflow-Delivery-Id` and `X-MLflow-Timestamp`. The receiver refuses a request whose signature
does not verify or whose timestamp is more than `MAX_AGE_S` from now (a replay) with 401, and
runs `cai_lib.platform.serving.sync` for a `champion` alias of a model it serves. A promotion made outside
the pipeline (by `cai promote`, or in MLflow's UI by someone allowed to) then reaches serving
too. `register_webhook` creates (or updates) the webhook on the server.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cai_lib.core.errors import CaiError
from cai_lib.core.names import CHAMPION
from cai_lib.core.settings import variable
from cai_lib.core.tracking import connect

SECRET_ENV = variable("webhook_secret")
WEBHOOK_NAME = "cai-serve-sync"
SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
MAX_AGE_S = 300


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The `X-MLflow-Signature` value MLflow sends for `body`."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(secret.encode(), signed, hashlib.sha256).digest()).decode()


def verified(secret: str, headers, body: bytes, now: float | None = None) -> dict:
    """The event in `body` if its signature verifies and it is fresh; else `CaiError` saying why."""
    delivery, stamp, given = (headers.get(h) for h in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not (delivery and stamp and given):
        raise CaiError("unsigned request: no X-MLflow-Signature, -Timestamp or -Delivery-Id header")
    if not hmac.compare_digest(given, signature(secret, delivery, stamp, body)):
        raise CaiError(f"delivery {delivery}: the signature does not verify with this receiver's secret")
    if not stamp.isdigit() or abs((now or time.time()) - int(stamp)) > MAX_AGE_S:
        raise CaiError(f"delivery {delivery}: timestamp {stamp} is more than {MAX_AGE_S} s from now")
    return json.loads(body)


def handle(event: dict, served: list[str], on_champion) -> tuple[int, dict]:
    """(HTTP status, JSON body) for a verified event: `on_champion(model)` for a champion alias set
    on a served model (200, its result), anything else ignored (202)."""
    data = event.get("data") or {}
    kind = (event.get("entity"), event.get("action"))
    if kind != ("model_version_alias", "created") or data.get("alias") != CHAMPION:
        return 202, {"ignored": f"{kind[0]}.{kind[1]} {data.get('alias', '')}".strip()}
    if data.get("name") not in served:
        return 202, {"ignored": f"{data.get('name')} is not served here"}
    try:
        return 200, on_champion(data["name"])
    except CaiError as err:
        return 422, {"error": str(err)}


def receiver(
    port: int, secret: str, served: list[str], on_champion, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """An HTTP server (not started) that verifies and handles webhook deliveries on `port`."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # one line per request, on stderr
            super().log_message(fmt, *args)

        def reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self.reply(200, {"status": "ok"}) if self.path == "/healthz" else self.reply(
                404, {"error": self.path}
            )

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                event = verified(secret, self.headers, body)
            except (CaiError, ValueError) as err:
                self.reply(401, {"error": str(err)})
                return
            self.reply(*handle(event, served, on_champion))

    return ThreadingHTTPServer((host, port), Handler)


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
