"""GitOps retraining: submit a pipeline run for every constitution whose newest version in git
has not been trained yet.

`retrain` reads the `constitutions/` folder of a git checkout (its own `constitutions.lock`
included) and, for each constitution name, takes the newest version by semver. A plain directory
(the Helm chart's ConfigMap of the constitutions it bundles) works too when the caller names its
revision (`--revision`, e.g. the chart version), which then stands where the commit would. That
version is up to date when either

- the registered RL-CAI champion (`<model_name_prefix>-<name>-rl-cai@champion` in MLflow) carries
  its sha256 in its lineage tags, or
- a run for that exact content was already submitted: each submission is recorded in the
  constitution registry as `_submissions/<name>/<version>-<sha256[:12]>.json` (run id, host,
  time, source revision), so a second call submits nothing even while the first run is still going.

Every version the registry lacks is published to it (write once; same content is a no-op), and
for each constitution that is not up to date one run is submitted whose `constitution` parameter
is the published document's URI, which a pod can read whatever constitutions its image bundles. A version that
is not in the lock, or whose content differs from its lock entry or from its published copy, is
refused by name before anything is written. So are a checkout with uncommitted changes under
`constitutions/` (the recorded commit would not describe what was trained) and an unreachable
registry, MLflow server or KFP host (the host is not needed for a dry run).

A record means "submitted", not "succeeded": a run that failed is not resubmitted until its
record is deleted or a new version is written. The record is written right after the run is
created, so a crash in between can, at worst, lead the next call to submit that version once more.
"""

from __future__ import annotations

import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, BaseModel, Field

from cai_lib.config import RunConfig
from cai_lib.constitution import (
    LOCK_FILE,
    REGISTRY_ENV,
    Constitution,
    is_locked,
    list_constitutions,
    parse_constitution,
    publish_constitution,
)
from cai_lib.errors import CaiError
from cai_lib.store import ArtifactStore, is_s3

SUBMISSIONS = "_submissions"
# Where dry runs on a laptop keep published versions, beside `cai run`'s .cai/artifacts and
# .cai/mlflow.db, so that `cai retrain --repo . --dry-run` needs no configuration.
LOCAL_REGISTRY = ".cai/constitutions"


class Submission(BaseModel):
    """A pipeline run submitted for one constitution version, as recorded in the registry."""

    constitution_ref: str = Field(description="name@version trained by the run.")
    constitution_sha256: str = Field(description="Content hash of that version.")
    constitution_uri: str = Field(description="The published document the run was given as its constitution.")
    run_id: str = Field(description="KFP run id.")
    url: str = Field(description="The run's page in the Kubeflow Pipelines UI.")
    host: str = Field(description="The Kubeflow Pipelines host it was submitted to.")
    experiment: str = Field(description="KFP experiment of the run.")
    revision: str = Field(
        # Records written before plain directories were accepted call it git_sha.
        validation_alias=AliasChoices("revision", "git_sha"),
        description="Git commit of the checkout the constitution was read from, or the revision named for a plain directory.",
    )
    submitted_at: str = Field(description="UTC time of the submission (ISO 8601).")


class Decision(BaseModel):
    """What `retrain` does with the newest version of one constitution, and why."""

    ref: str = Field(description="name@version of the newest version in git.")
    sha256: str = Field(description="Its content hash.")
    action: Literal["retrain", "up-to-date"] = Field(description="Submit a run, or nothing to do.")
    reason: str = Field(description="Why, for people: the champion's lineage or an earlier submission.")
    submission: Submission | None = Field(default=None, description="The run submitted (after a real run).")


class RetrainPlan(BaseModel):
    """The outcome of `retrain`: what was (or, in a dry run, would be) published and submitted."""

    repo: str = Field(description="The git checkout (or plain directory) read.")
    revision: str = Field(description="Its HEAD commit, or the revision named for a plain directory.")
    registry_uri: str = Field(description="The constitution registry.")
    dry_run: bool = Field(description="True when nothing was written or submitted.")
    uncommitted_changes: bool = Field(description="Whether constitutions/ differs from the commit.")
    publish: list[str] = Field(default_factory=list, description="Versions not yet in the registry.")
    decisions: list[Decision] = Field(default_factory=list, description="One per constitution name.")

    @property
    def to_retrain(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "retrain"]


def _run_git(repo: Path, *args: str) -> subprocess.CompletedProcess | None:
    """git's result in `repo`, or None where git is not installed (a plain directory needs none)."""
    try:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None


def _git(repo: Path, problem: str, *args: str) -> str:
    result = _run_git(repo, *args)
    if result is None:
        raise CaiError("cai retrain needs the git command, which is not installed")
    if result.returncode != 0:
        detail = (result.stderr.strip().splitlines() or [f"git exited with status {result.returncode}"])[-1]
        raise CaiError(f"{repo}: {problem} ({detail})")
    return result.stdout.strip()


def _is_git_work_tree(repo: Path) -> bool:
    result = _run_git(repo, "rev-parse", "--is-inside-work-tree")
    return result is not None and result.returncode == 0 and result.stdout.strip() == "true"


def read_checkout(repo: Path, revision: str | None = None) -> tuple[Path, str, bool]:
    """(constitutions dir, revision, whether constitutions/ has uncommitted changes) of `repo`.

    A git work tree's revision is its HEAD commit; a plain directory has no history, so it is
    accepted only with a `revision` naming where its files came from (and is never "dirty")."""
    repo = Path(repo).expanduser().resolve()
    if not repo.is_dir():
        raise CaiError(f"{repo}: no such directory (--repo)")
    root = repo / "constitutions"
    git_tree = _is_git_work_tree(repo)
    if git_tree and revision:
        raise CaiError(
            f"{repo}: --revision is for plain directories; a git checkout is named by its HEAD commit"
        )
    if not git_tree and not revision:
        raise CaiError(
            f"{repo}: not a git work tree; give --revision to name the source of a plain directory "
            "(runs record it where they would record the commit)"
        )
    if not root.is_dir():
        raise CaiError(f"{repo}: no constitutions/ directory")
    if not git_tree:
        return root, revision, False
    head = _git(repo, "the checkout has no commit", "rev-parse", "HEAD")
    dirty = bool(_git(repo, "git status failed", "status", "--porcelain", "--", "constitutions"))
    return root, head, dirty


def registry_of(registry_uri: str | None, config: RunConfig, dry_run: bool) -> tuple[str, str]:
    """(registry URI, where it was configured): --registry, else `$CAI_CONSTITUTION_REGISTRY`,
    else the run config's deploy.constitution_registry, else the local `LOCAL_REGISTRY` beside
    `cai run`'s artifacts.

    A real submission needs an S3 registry: the run on the cluster reads its constitution from it."""
    if registry_uri:
        uri, source = registry_uri, "--registry"
    elif os.environ.get(REGISTRY_ENV):
        uri, source = os.environ[REGISTRY_ENV], f"${REGISTRY_ENV}"
    elif config.deploy.constitution_registry:
        uri, source = config.deploy.constitution_registry, "deploy.constitution_registry of the run config"
    else:
        uri, source = LOCAL_REGISTRY, f"the local default {LOCAL_REGISTRY}"
    if not dry_run and not is_s3(uri):
        raise CaiError(
            f"constitution registry {uri} ({source}) is not an s3:// URI: the submitted run could not read "
            "its constitution from it; give --registry s3://BUCKET/PREFIX or use --dry-run"
        )
    return uri, source


def check_registry(registry_uri: str, source: str) -> ArtifactStore:
    """The registry store, its bucket checked to exist and answer (an S3 registry)."""
    from cai_lib.preflight import check_s3

    if is_s3(registry_uri):
        check_s3(registry_uri, f"constitution registry ({source})")
    return ArtifactStore.open(registry_uri)


def newest_versions(root: Path, names: list[str] | None) -> tuple[list[Constitution], list[Constitution]]:
    """(every version of the chosen constitutions, the newest of each), all checked against the lock."""
    versions = list_constitutions(root)
    known = sorted({c.name for c in versions})
    unknown = [name for name in names or [] if name not in known]
    if unknown:
        raise CaiError(
            f"{root}: no constitution named {', '.join(unknown)} (known: {', '.join(known) or 'none'})"
        )
    chosen = [c for c in versions if not names or c.name in names]
    for constitution in chosen:
        if not is_locked(constitution, root):
            raise CaiError(
                f"{root / constitution.name / constitution.version}.yaml: {constitution.ref} is not in "
                f"{root / LOCK_FILE}; run `cai constitution lock --dir {root}` and commit the lock"
            )
    newest = {c.name: c for c in chosen}  # list_constitutions orders by name, then semver
    return chosen, list(newest.values())


def unpublished(store: ArtifactStore, versions: list[Constitution]) -> list[Constitution]:
    """The versions not yet in the registry; a published one with other content is a `CaiError`."""
    missing = []
    for constitution in versions:
        key = f"{constitution.name}/{constitution.version}.yaml"
        if not store.exists(key):
            missing.append(constitution)
            continue
        stored = parse_constitution(store.read_text(key), store.uri_of(key))
        if stored.sha256 != constitution.sha256:
            raise CaiError(
                f"{store.uri_of(key)}: {constitution.ref} is already published with other content (sha256 "
                f"{stored.sha256[:12]}, git has {constitution.sha256[:12]}); publish the change as a new version"
            )
    return missing


def submission_key(constitution: Constitution) -> str:
    return f"{SUBMISSIONS}/{constitution.name}/{constitution.version}-{constitution.sha256[:12]}.json"


def decide(
    constitution: Constitution, store: ArtifactStore, tracking_uri: str | None, config: RunConfig
) -> Decision:
    """Whether the newest version needs a run: not if the champion or an earlier submission has it."""
    from cai_lib.registry import CHAMPION, version_by_alias
    from cai_lib.steps import model_name

    def decision(action: str, reason: str) -> Decision:
        return Decision(ref=constitution.ref, sha256=constitution.sha256, action=action, reason=reason)

    name = model_name(config.params, constitution, "rl-cai")
    champion = version_by_alias(tracking_uri, name, CHAMPION)
    lineage = champion.lineage if champion else None
    if lineage and lineage.constitution_sha256 == constitution.sha256:
        return decision("up-to-date", f"champion {name} version {champion.version} was trained on it")
    key = submission_key(constitution)
    if store.exists(key):
        earlier = Submission.model_validate(store.read_json(key))
        return decision("up-to-date", f"run {earlier.run_id} was submitted for it at {earlier.submitted_at}")
    if champion is None:
        return decision("retrain", f"no {CHAMPION} registered for {name}")
    if lineage is None:
        return decision("retrain", f"champion {name} version {champion.version} has no constitution lineage")
    trained = f"{lineage.constitution_name}@{lineage.constitution_version}"
    return decision(
        "retrain",
        f"champion {name} version {champion.version} was trained on {trained} "
        f"(sha256 {lineage.constitution_sha256[:12]}, this one {constitution.sha256[:12]})",
    )


def retrain(
    repo: Path,
    registry_uri: str | None,
    host: str | None,
    tracking_uri: str | None,
    config: RunConfig,
    dry_run: bool,
    names: list[str] | None = None,
    experiment: str = "constitutional-ai",
    namespace: str | None = None,
    client=None,
    revision: str | None = None,
) -> RetrainPlan:
    """Publish new constitution versions from the checkout at `repo` and submit a run for each
    constitution whose newest version is neither the champion's nor already submitted.

    `registry_uri` is the constitution registry (default: see `registry_of`).
    `tracking_uri` is where champions are looked up (default: `$MLFLOW_TRACKING_URI`, else the
    SQLite store `cai run` keeps in the working directory, .cai/mlflow.db). `names` limits
    the constitutions considered.
    `client` is the `kfp.Client` to submit with (default: one connected to `host`). `revision`
    names the source of a `repo` that is a plain directory rather than a git checkout. With
    `dry_run`, nothing is published, submitted or recorded. Unreachable endpoints, unlocked or
    changed published versions and uncommitted changes are `CaiError`s raised before any write.
    """
    from cai_lib.tracking import connect
    from pipelines.local import local_platform
    from pipelines.submit import connect_kfp, require_host

    root, revision, dirty = read_checkout(repo, revision)
    if dirty and not dry_run:
        raise CaiError(f"{root}: uncommitted changes; commit them first (runs record commit {revision[:12]})")
    store = check_registry(*registry_of(registry_uri, config, dry_run))
    # The argument, else $MLFLOW_TRACKING_URI, else the store `cai run` uses in this directory.
    tracking_uri = local_platform(Path.cwd(), tracking_uri=tracking_uri).tracking_uri
    connect(tracking_uri)
    if not dry_run:
        host = require_host(host)
        client = client or connect_kfp(host, namespace)
    versions, newest = newest_versions(root, names)
    missing = unpublished(store, versions)
    plan = RetrainPlan(
        repo=str(root.parent),
        revision=revision,
        registry_uri=store.uri,
        dry_run=dry_run,
        uncommitted_changes=dirty,
        publish=[c.ref for c in missing],
        decisions=[decide(c, store, tracking_uri, config) for c in newest],
    )
    if dry_run:
        return plan
    for constitution in missing:
        publish_constitution(constitution, store.uri)
    by_ref = {c.ref: c for c in newest}
    for item in plan.to_retrain:
        item.submission = _submit(
            by_ref[item.ref], store, host, config, experiment, namespace, revision, client
        )
    return plan


def _submit(
    constitution: Constitution,
    store: ArtifactStore,
    host: str,
    config: RunConfig,
    experiment: str,
    namespace: str | None,
    revision: str,
    client,
) -> Submission:
    from pipelines.submit import submit_run

    uri = store.uri_of(f"{constitution.name}/{constitution.version}.yaml")
    params = config.params.model_copy(update={"constitution": uri})
    run = submit_run(
        host,
        config.model_copy(update={"params": params}),
        experiment,
        run_name=f"retrain {constitution.ref} {constitution.sha256[:12]} ({revision[:40]})",
        namespace=namespace,
        client=client,
    )
    submission = Submission(
        constitution_ref=constitution.ref,
        constitution_sha256=constitution.sha256,
        constitution_uri=uri,
        run_id=run.run_id,
        url=run.url,
        host=host,
        experiment=experiment,
        revision=revision,
        submitted_at=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
    store.write_json(submission_key(constitution), submission.model_dump())
    return submission
