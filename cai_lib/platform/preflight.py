"""Checks made before any work starts: the run's endpoints answer and its inputs add up.

A pipeline that fails in its eighth step because MLflow was never reachable, or because the
held-out split is empty, wastes an hour of GPU time; these checks fail in the first step, before
any model loads, with one line that names the field to change.
"""

from __future__ import annotations

import os

from cai_lib.core.constitution import Constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.names import canonical_sha256
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
    (`XSTestPrompt` rows, none when `evaluate.xstest.prompts` is ''). A kind with an evaluation
    source of its own (`*_eval_prompts`) trains on all its prompts and is evaluated on that
    source's; every held-out prompt that is also trained on (`training_prompt_keys`) is then left
    out, so evaluation is disjoint from training."""
    splits = raw_prompt_splits(params)
    trained = training_prompt_keys(params, splits)
    for kind in ("red_team", "helpful"):
        splits[f"{kind}_eval"] = [p for p in splits[f"{kind}_eval"] if prompt_key(p.prompt) not in trained]
    return splits


def raw_prompt_splits(params: PipelineParams) -> dict[str, list[PromptRecord]]:
    """The splits before held-out prompts that are also trained on are left out."""
    from cai_lib.core.prompts import deduplicate, read_prompts, split_prompts
    from cai_lib.method.evaluation.xstest import read_xstest

    splits = {}
    for kind, source, eval_source, limit in (
        ("red_team", params.red_team_prompts, params.red_team_eval_prompts, params.num_red_team),
        ("helpful", params.helpful_prompts, params.helpful_eval_prompts, params.num_helpful),
    ):
        records = deduplicate(read_prompts(source, kind=kind, limit=limit))
        if eval_source:
            held = max(1, round(limit * params.eval_fraction))
            splits[f"{kind}_train"] = records
            splits[f"{kind}_eval"] = deduplicate(read_prompts(eval_source, kind=kind, limit=held))
        else:
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


def prompt_key(text: str) -> str:
    """The content hash a prompt is compared by: of its text, case and spacing ignored."""
    from cai_lib.core.prompts import normalise

    return canonical_sha256(normalise(text))


def training_prompt_keys(params: PipelineParams, splits: dict[str, list[PromptRecord]]) -> set[str]:
    """The content hashes of every prompt the run trains on: the training prompts (SL-CAI, pairs,
    RL), and the first human turn of every human pair its PMs learn from (human_preferences and
    the references' pairs)."""
    from cai_lib.core.prompts import prompt_of_row
    from cai_lib.method.human_preferences import read_human_preferences
    from cai_lib.method.references import reference_pairs

    prompts = [p.prompt for kind in ("red_team", "helpful") for p in splits[f"{kind}_train"]]
    pairs = read_human_preferences(params.human_preferences, params.num_human) if params.human_preferences else []
    for kind in params.references.policies:
        pairs += reference_pairs(kind, params.references)
    prompts += [prompt_of_row({"prompt": pair.prompt}) for pair in pairs]
    return {prompt_key(text) for text in prompts}


def check_run(params: PipelineParams, constitution: Constitution) -> dict[str, list[PromptRecord]]:
    """Refuse a run that cannot finish, naming the field; returns the prompt splits it checked.

    Refused: a judge that is not independent of what it judges, without the allowance that says
    why it may be; human pairs asked for with `num_human` 0; a constitution without the comparison
    principles that labelling and evaluation use; fewer red-team training prompts than shards;
    an empty held-out split; fewer training prompts of a kind than `generate_prompts.few_shot`
    when that kind generates; a held-out set for generation that cannot be read; labels by the
    policy (`iteration.feedback_follows_policy`, with more than one round) judged by base_model.
    """
    from cai_lib.core.prompts import read_prompts
    from cai_lib.method.evaluation.config import judging_principles
    from cai_lib.method.feedback import check_constitution
    from cai_lib.method.generate_prompts import check_seeds

    params.check_independent_judge()
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
                f"params.eval_fraction: leaves no held-out {kind.replace('_', '-')} prompts to evaluate on that "
                f"are not also trained on ({len(splits[f'{kind}_train'])} training prompts); raise params.{field} "
                f"or eval_fraction, or give params.{kind}_eval_prompts another source"
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
