"""Checks made before any work starts: the run's endpoints answer and its inputs add up.

A pipeline that fails in its eighth step because MLflow was never reachable, or because the
held-out split is empty, wastes an hour of GPU time; these checks fail in the first step, before
any model loads, with one line that names the field to change.
"""

from __future__ import annotations

import os

from cai_lib.core.constitution import Constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.records import PromptRecord
from cai_lib.core.store import is_s3
from cai_lib.platform.run_config import PipelineParams


def s3_endpoint_source() -> str:
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return f"{os.environ[name]} (from {name})"
    return "AWS's default endpoint (no AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL set)"


def check_s3(uri: str, what: str) -> None:
    """The bucket of `uri` exists and our credentials reach it."""
    from botocore.exceptions import BotoCoreError, ClientError

    from cai_lib.core.store import s3_client

    bucket = uri[len("s3://") :].split("/", 1)[0]
    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code", "")
        reason = "does not exist" if code in ("404", "NoSuchBucket") else f"refused access ({code})"
        raise CaiError(f"{what} {uri}: bucket '{bucket}' {reason} at {s3_endpoint_source()}") from None
    except BotoCoreError as err:
        raise CaiError(f"{what} {uri}: S3 endpoint {s3_endpoint_source()} failed: {err}") from None


def check_endpoints(artifact_root: str, tracking_uri: str, constitution_ref: str) -> None:
    """Fail fast if the artifact store, MLflow or the constitution ref cannot be reached."""
    from cai_lib.core.constitution import load_constitution
    from cai_lib.core.tracking import connect

    if is_s3(artifact_root):
        check_s3(artifact_root, "artifact root")
    connect(tracking_uri)
    load_constitution(constitution_ref)


def prompt_splits(params: PipelineParams) -> dict[str, list[PromptRecord]]:
    """The run's prompts, deduplicated and split with its seed: `red_team_train`, `red_team_eval`,
    `helpful_train`, `helpful_eval`; and `xstest`, the XSTest prompts every evaluation answers
    (`XSTestPrompt` rows, none when `evaluate.xstest.prompts` is '')."""
    from cai_lib.core.prompts import deduplicate, read_prompts, split_prompts
    from cai_lib.method.evaluation.xstest import read_xstest

    splits = {}
    for kind, source, limit in (
        ("red_team", params.red_team_prompts, params.num_red_team),
        ("helpful", params.helpful_prompts, params.num_helpful),
    ):
        records = deduplicate(read_prompts(source, kind=kind, limit=limit))
        splits[f"{kind}_train"], splits[f"{kind}_eval"] = split_prompts(
            records, params.eval_fraction, params.seed
        )
    xstest = params.evaluate.xstest
    try:
        splits["xstest"] = read_xstest(xstest.prompts, xstest.limit, params.evaluate.seed) if xstest.prompts else []
    except CaiError as err:
        raise CaiError(
            f"params.evaluate.xstest.prompts: {err}; give a local copy of xstest_prompts.csv where the hub "
            "cannot be reached, or '' to leave XSTest out"
        ) from None
    return splits


def check_run(params: PipelineParams, constitution: Constitution) -> dict[str, list[PromptRecord]]:
    """Refuse a run that cannot finish, naming the field; returns the prompt splits it checked.

    Refused: human pairs asked for with `num_human` 0; a constitution without the comparison
    principles that labelling and evaluation use; fewer red-team training prompts than shards;
    an empty held-out split; fewer training prompts of a kind than `generate_prompts.few_shot`
    when that kind generates; a held-out set for generation that cannot be read; labels by the
    policy (`iteration.feedback_follows_policy`, with more than one round) judged by base_model.
    """
    from cai_lib.core.prompts import read_prompts
    from cai_lib.method.evaluation.config import judging_principles
    from cai_lib.method.feedback import check_constitution
    from cai_lib.method.generate_prompts import check_seeds

    if params.human_preferences and params.num_human == 0:
        raise CaiError(
            f"params.num_human: is 0 while params.human_preferences names {params.human_preferences!r}; "
            "set num_human to at least 1, or human_preferences to '' for no human pairs"
        )
    try:
        judging_principles(constitution, params.evaluate)
        check_constitution(constitution, params.labelling_settings(constitution))
    except CaiError as err:
        raise CaiError(f"params.constitution {constitution.ref}: {err}") from None
    splits = prompt_splits(params)
    train = len(splits["red_team_train"])
    if train < params.num_shards:
        raise CaiError(
            f"params.num_shards: {params.num_shards} shards but only {train} red-team training prompts "
            f"(num_red_team {params.num_red_team}, eval_fraction {params.eval_fraction}); lower num_shards or "
            "raise num_red_team"
        )
    for kind, field in (("red_team", "num_red_team"), ("helpful", "num_helpful")):
        if not splits[f"{kind}_eval"]:
            raise CaiError(
                f"params.eval_fraction: leaves no held-out {kind.replace('_', '-')} prompts to evaluate on "
                f"({len(splits[f'{kind}_train'])} unique prompts in all); raise params.{field} or eval_fraction"
            )
    try:
        check_seeds({kind: splits[f"{kind}_train"] for kind in ("red_team", "helpful")}, params.generate_prompts)
    except CaiError as err:
        raise CaiError(f"params.{err} (the seeds are the training split)") from None
    for source in params.generate_prompts.held_out:
        try:
            read_prompts(source)
        except CaiError as err:
            raise CaiError(f"params.generate_prompts.held_out: {err}") from None
    if params.rounds > 1 and params.iteration.feedback_follows_policy and params.judge_model == params.base_model:
        raise CaiError(
            "params.iteration.feedback_follows_policy: later rounds are labelled by the run's own policies, which "
            f"descend from base_model {params.base_model!r}, and judge_model is that model too; give a judge_model "
            "independent of base_model"
        )
    return splits
