"""URIs and endpoints, checked where they enter: an `s3:` URI a user mistyped must not become a
local directory named `s3:`, and an S3 endpoint without a scheme must not reach botocore, whose
error is a traceback.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from cai_lib.core.errors import CaiError

S3_SCHEME = "s3://"
# botocore's own rule for a bucket name in a request (botocore/handlers.py, VALID_BUCKET): wider
# than today's naming rules, since older buckets may hold capitals and underscores.
_BUCKET = re.compile(r"^[a-zA-Z0-9.\-_]{1,255}$")


def is_s3(uri: str) -> bool:
    """Whether `uri` names S3 (`s3://BUCKET[/KEY]`). Anything else that starts with `s3:` (`s3:/x`,
    `S3://x`, `s3://`, a bucket with characters S3 refuses) is a `CaiError` naming it: every
    reference (an output, a model, a prompt source, a constitution) is told apart by this test, so
    it is where a malformed one is caught."""
    uri = str(uri)
    if not uri[:3].lower() == "s3:":
        return False
    if not uri.startswith(S3_SCHEME):
        raise CaiError(f"'{uri}': not an S3 URI; write s3://BUCKET/KEY")
    bucket = uri[len(S3_SCHEME) :].split("/", 1)[0]
    if not bucket:
        raise CaiError(f"'{uri}': names no bucket; write s3://BUCKET/KEY")
    if not _BUCKET.match(bucket):
        raise CaiError(
            f"'{uri}': '{bucket}' is not a valid S3 bucket name (letters, digits, '.', '-' and '_' only)"
        )
    return True


def check_endpoint(url: str, where: str = "") -> str:
    """`url` if it is an http(s) URL with a host; else a `CaiError` naming `where` (a variable or flag)."""
    named = f"{where}: " if where else ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        hint = f"; write http://{url} or https://{url}" if "://" not in url else ""
        raise CaiError(f"{named}'{url}' is not an http:// or https:// URL{hint}")
    try:
        parts.port  # urlsplit checks the port only when it is read
    except ValueError:
        raise CaiError(f"{named}'{url}' has a port that is not a number from 0 to 65535") from None
    return url
