"""Checks made before any work starts: the run's endpoints answer and its inputs resolve.

A pipeline that fails in its eighth step because MLflow was never reachable wastes an hour of
GPU time; these checks fail in a second, saying which endpoint and how it was configured.
"""

from __future__ import annotations

import os

from cai_lib.config import PipelineParams
from cai_lib.errors import CaiError
from cai_lib.store import is_s3


def s3_endpoint_source() -> str:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return f"{os.environ[name]} (from {name})"
    return "AWS's default endpoint (no AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL set)"


def check_s3(uri: str, what: str) -> None:
    """The bucket of `uri` exists and our credentials reach it."""
    from botocore.exceptions import BotoCoreError, ClientError

    from cai_lib.store import s3_client

    bucket = uri[len("s3://") :].split("/", 1)[0]
    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        reason = "does not exist" if code in ("404", "NoSuchBucket") else f"refused access ({code})"
        raise CaiError(f"{what} {uri}: bucket '{bucket}' {reason} at {s3_endpoint_source()}") from None
    except BotoCoreError as err:
        raise CaiError(f"{what} {uri}: S3 endpoint {s3_endpoint_source()} failed: {err}") from None


def check_endpoints(params: PipelineParams) -> None:
    """Fail fast if the artifact store, MLflow or the constitution ref cannot be reached."""
    from cai_lib.constitution import load_constitution
    from cai_lib.tracking import connect

    if is_s3(params.artifact_root):
        check_s3(params.artifact_root, "artifact_root")
    connect(params.mlflow_tracking_uri)
    load_constitution(params.constitution)
