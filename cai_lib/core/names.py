"""Every name the platform writes for others to read, defined once: MLflow tag keys, registry
aliases, model roles, the files in the artifact store, and the one canonical hash.

A tag key or file name is a contract with what reads it later (a later run, `cai retrain`, the
serving pod, the MLflow UI), so each is spelled here and imported everywhere else; a test fails
if one of these literals appears anywhere else in `cai_lib`.
"""

from __future__ import annotations

import json
from hashlib import sha256
from typing import Literal

# -- the one canonical hash ---------------------------------------------------------------------------


def canonical_sha256(data: object) -> str:
    """Hex sha256 of sorted-key compact JSON, UTF-8: the canonical form every hash here uses
    (constitutions, stage-output keys, run configs, retrain fingerprints, pinned models).
    Values JSON cannot hold (a path, a datetime) hash as their `str`."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return sha256(canonical.encode("utf-8")).hexdigest()


# -- model roles and registered model names -----------------------------------------------------------

Role = Literal["pm", "sl-cai", "rl-cai"]
PM: Role = "pm"
SL_CAI: Role = "sl-cai"
RL_CAI: Role = "rl-cai"
ROLES: tuple[Role, ...] = (PM, SL_CAI, RL_CAI)
# The base model is evaluated beside the policies but never registered.
BASE = "base"
# The registered champion, when an evaluation compares the run's policy with it.
CHAMPION_POLICY = "champion"


def model_name(prefix: str, constitution_name: str, role: Role) -> str:
    """The registered model of `role` trained under `constitution_name`: `<prefix>-<name>-<role>`.

    This is the production model: its versions are copies the promoter made of candidates that
    passed the gate, and its `champion` alias is what serving follows."""
    return f"{prefix}-{constitution_name}-{role}"


CANDIDATES_SUFFIX = "-candidates"


def candidates_name(production_name: str) -> str:
    """The model the pipeline registers into (`<production name>-candidates`): whoever may add a
    version to a model may also move its aliases, so the pipeline's identity writes only here and
    the promoter's copies a candidate into the production model."""
    return f"{production_name}{CANDIDATES_SUFFIX}"


# -- registry aliases -----------------------------------------------------------------------------------

CHALLENGER = "challenger"
CHAMPION = "champion"

# -- MLflow tags: what the platform created -------------------------------------------------------------

# On every registered model and model version the platform creates, with the value `PLATFORM`.
# A model of a platform name without it (made by someone else first) is refused, and so is a
# version without every tag of `VERSION_CREATION_TAGS`.
CREATED_BY_TAG = "cai.created_by"
PLATFORM = "cai-platform"

# -- MLflow tags: lineage of a model version --------------------------------------------------------------

CONSTITUTION_NAME_TAG = "cai.constitution.name"
CONSTITUTION_VERSION_TAG = "cai.constitution.version"
CONSTITUTION_SHA_TAG = "cai.constitution.sha256"
PIPELINE_RUN_TAG = "cai.pipeline_run_id"
BASE_MODEL_TAG = "cai.base_model"
CODE_VERSION_TAG = "cai.code_version"
HUMAN_DATA_TAG = "cai.human_data"
RUN_CONFIG_SHA_TAG = "cai.run_config.sha256"
# Iterated CAI: the round that trained a version, and the version it continues (`NAME/VERSION`).
ROUND_TAG = "cai.round"
PARENT_VERSION_TAG = "cai.parent_version"
CHECKPOINT_SHA_TAG = "cai.checkpoint_sha256"
DATA_TAG_PREFIX = "cai.data."
# What a version must carry to be loaded, served or promoted: who created it, the sha256 of its
# checkpoint's manifest (which lists every file's sha256) and the pipeline run that made it.
VERSION_CREATION_TAGS = (CREATED_BY_TAG, CHECKPOINT_SHA_TAG, PIPELINE_RUN_TAG)

# -- MLflow tags: evaluation evidence on a challenger's version (read by the gate) ----------------------

EVAL_HARMLESS_TAG = "cai.eval.harmless_win_rate_vs_champion"
EVAL_HELPFUL_TAG = "cai.eval.helpful_win_rate_vs_champion"
EVAL_HARMLESS_LOW_TAG = "cai.eval.harmless_win_rate_ci_low"
EVAL_HELPFUL_LOW_TAG = "cai.eval.helpful_win_rate_ci_low"
EVAL_COMPARISONS_TAG = "cai.eval.comparisons"
# The champion version the rates were measured against, or a baseline policy's name.
EVAL_CHAMPION_TAG = "cai.eval.champion_version"
# On the evaluation's MLflow run: who judged, and the one-line warning when that is not independent.
EVAL_JUDGE_TAG = "cai.eval.judge"
EVAL_JUDGE_IS_LABELLER_TAG = "cai.eval.judge_is_feedback_model"
EVAL_WARNING_TAG = "cai.eval.warning"
# Why the run allowed a judge that is not independent (evaluate.dependent_judge_reason).
EVAL_DEPENDENT_JUDGE_TAG = "cai.eval.dependent_judge_reason"

# -- MLflow tags: the gate's decision ----------------------------------------------------------------------

GATE_DECISION_TAG = "cai.gate.decision"
GATE_REASON_TAG = "cai.gate.reason"
GATE_CHAMPION_BEFORE_TAG = "cai.gate.champion_before"
GATE_FORCED_TAG = "cai.gate.forced"
GATE_EVIDENCE_TAG = "cai.gate.evidence"
# On the production model, one per gate attempt and never overwritten: `cai.gate.attempt.000001`
# and on, each a JSON record of the candidate judged, the decision, its reason and evidence.
GATE_ATTEMPT_TAG_PREFIX = "cai.gate.attempt."
# On the production model while a promotion is under way: what it will have done when complete
# (JSON), so that the next promotion, or the run's exit handler, completes it.
PROMOTION_PENDING_TAG = "cai.promotion.pending"

# -- MLflow tags: the comparison of a run with the run that made the champion it challenges ---------------

COMPARE_REPORT_TAG = "cai.compare.report"
COMPARE_AGAINST_TAG = "cai.compare.against_run"

# -- the promotion lock (a registered model of its own) ---------------------------------------------------

LOCK_SUFFIX = ".cai-promotion-lock"
LOCK_FOR_TAG = "cai.lock.for"
LOCK_OWNER_TAG = "cai.lock.owner"
LOCK_EXPIRES_TAG = "cai.lock.expires_at"
LOCK_RUN_TAG = "cai.lock.pipeline_run_id"
LOCK_HOST_TAG = "cai.lock.host"
LOCK_PID_TAG = "cai.lock.pid"
LOCK_PIDNS_TAG = "cai.lock.pid_namespace"
LOCK_BOOT_TAG = "cai.lock.boot_id"
# A stale lock is broken by whoever first creates `<lock name>.break.<its owner token>`: one
# breaker per stale lock, so two waiters cannot both delete (the second one a fresh lock).
LOCK_BREAK_INFIX = ".break."

# -- MLflow tags: runs ------------------------------------------------------------------------------------------

RUN_KIND_TAG = "cai.run_kind"
STAGE_TAG = "cai.stage"
KFP_RUN_URL_TAG = "cai.kfp.run_url"
REUSE_TAG = "cai.reuse"
OUTPUT_KEY_TAG = "cai.output_key"
OUTPUT_URI_TAG = "cai.output_uri"
MADE_BY_RUN_TAG = "cai.made_by_run"
# On a stage run: `cai.source.<group>` names the data set behind a group of its metrics (e.g.
# `cai.source.xstest`); `cai.demo_data` says which of them are the project's demo sets.
METRIC_SOURCE_TAG_PREFIX = "cai.source."
DEMO_DATA_TAG = "cai.demo_data"

# -- files in the artifact store ---------------------------------------------------------------------------------

# A checkpoint's list of files with their sha256, written last.
MANIFEST = "_MANIFEST.json"
# A stage output's marker, written last: where the data lies, rows, sha256, who made it.
MARKER = "_COMPLETE.json"
# A dataset's record of its finished shards, and of the inputs it was made from.
SUCCESS = "_SUCCESS.json"
INPUTS = "_inputs.json"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
ANSWERS_FILE = "answers.jsonl"
JUDGEMENTS_FILE = "judgements.jsonl"
# The validate_labels stage's result: every labeller's agreement with held-out human comparisons.
LABEL_VALIDATION_FILE = "label_validation.json"
JOB_FILE = "job.json"
SFT_PROVENANCE_FILE = "cai_sft.json"
# Under the artifact root: content-addressed stage outputs, and one folder per pipeline run.
OUTPUTS_DIR = "outputs"
RUNS_DIR = "runs"
# A run's folder: its parameters, its pinned constitution, its stage records and its summary.
RUN_FILE = "run.json"
PINNED_CONSTITUTION_FILE = "constitution.yaml"
STAGES_DIR = "stages"
# Under STAGES_DIR: files of reused stages' MLflow runs, kept for the exit handler to upload.
DEFERRED_ARTIFACTS = "deferred-artifacts"
SUMMARY_FILE = "summary.json"
# Under a run's folder: its comparisons with earlier runs, one folder per run compared against.
COMPARISONS_DIR = "run-comparisons"
# A comparison (`cai compare`) and an impact preview (`cai impact`), as JSON beside their report.html.
COMPARISON_FILE = "comparison.json"
IMPACT_FILE = "impact.json"
# The constitutions folder's record of each published version's sha256.
LOCK_FILE = "constitutions.lock"
# A run's whole config, as an artifact of its MLflow run.
RUN_CONFIG_ARTIFACT = "config.json"
# Files of a Hugging Face checkpoint that the platform reads.
MODEL_CONFIG_FILE = "config.json"
TRAINING_ARGS_FILE = "training_args.bin"
