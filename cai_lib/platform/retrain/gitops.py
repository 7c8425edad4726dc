"""GitOps retraining: submit a pipeline run for every constitution whose newest version in git,
trained with the run config and images in force, has not been trained or submitted yet.

`retrain` reads the `constitutions/` folder of a git checkout (its own `constitutions.lock`
included) and, for each constitution name, takes the newest version by semver. A plain directory
(the Helm chart's ConfigMap of the constitutions it bundles) works too when the caller names its
revision (`--revision`, e.g. the chart version), which then stands where the commit would.

Every version the registry lacks is published to it (write once; same content is a no-op). For
each newest version `gather` collects the facts (the change, the registered champion, the
ledger, the states of the runs it names, and the runs found by name for expired claims), the
pure `cai_lib.platform.retrain.policy.decide` says what to do, and this module does it: for each
change that is not up to date one run is submitted, under a claim in the ledger
(`cai_lib.platform.retrain.ledger`: create-only, then fenced writes), whose `constitution`
parameter is the published document's URI, which a pod can read whatever constitutions its image
bundles. The submission itself is a callable the caller hands in
(`pipelines.submit.submit_run`), so the library never imports the pipeline built from it. A
version that is not in the lock, or whose content differs from its lock entry or from its
published copy, is refused by name before anything is written. So are a checkout with uncommitted
changes under `constitutions/` (the recorded commit would not describe what was trained) and an
unreachable registry, MLflow server or KFP host (the host is not needed for a dry run).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field

from cai_lib.core.constitution import (
    REGISTRY_ENV,
    Constitution,
    is_locked,
    list_constitutions,
    parse_constitution,
    publish_constitution,
)
from cai_lib.core.errors import CaiError
from cai_lib.core.names import CHAMPION, LOCK_FILE, RL_CAI, VERSION_CREATION_TAGS, model_name
from cai_lib.core.settings import settings
from cai_lib.core.store import ArtifactStore, is_s3
from cai_lib.platform.retrain.compare_hook import compare_against
from cai_lib.platform.retrain.identity import fingerprint, run_config_sha256, training_params
from cai_lib.platform.retrain.ledger import (
    LEASE_SECONDS,
    Submission,
    attempts_prefix,
    claim_attempt,
    legacy_submission_key,
    new_record,
    read_record,
    read_versioned_record,
    records_of,
    replace_record,
    stamp,
    submission_key,
    utc_now,
)
from cai_lib.platform.retrain.policy import ChampionFacts, Change, Decision, Facts, decide, reads_needed
from cai_lib.platform.run_config import RunConfig

# Where dry runs on a laptop keep published versions, beside `cai run`'s .cai/artifacts and
# mlflow.db, so that `cai retrain --repo . --dry-run` needs no configuration.
LOCAL_REGISTRY = ".cai/constitutions"


class SubmittedRun(Protocol):
    run_id: str
    url: str


class SubmitRun(Protocol):
    """How a run is submitted (`pipelines.submit.submit_run`: compile, upload, create the run),
    handed in by the caller so that the library never imports the pipeline built from it."""

    def __call__(
        self, host: str, config: RunConfig, experiment: str, *, run_name: str, namespace: str | None, client
    ) -> SubmittedRun: ...


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
    elif settings().constitution_registry:
        uri, source = settings().constitution_registry, f"${REGISTRY_ENV}"
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
    from cai_lib.platform.preflight import check_s3

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


def retrain(
    submit: SubmitRun,
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
    constitution whose newest version, with `config`'s training parameters and images, is neither
    the champion's nor already submitted (a failed run is resubmitted once).

    `registry_uri` is the constitution registry (default: see `registry_of`).
    `tracking_uri` is where champions are looked up (default: the rule of
    `cai_lib.platform.registry.lookup`: `$MLFLOW_TRACKING_URI`, else the store of the last `cai run` here). `names` limits
    the constitutions considered.
    `client` is the `kfp.Client` to submit with and read run states from (default: one connected
    to `host`; a dry run connects only when `host` is given, and reads no run state when it does
    not answer). `revision` names the source of a `repo` that is a plain directory rather than a
    git checkout. With `dry_run`, nothing is published, submitted or recorded. Unreachable
    endpoints, unlocked or changed published versions and uncommitted changes are `CaiError`s
    raised before any write.
    """
    from cai_lib.core.config import local_platform, make_local_store
    from cai_lib.core.tracking import connect
    from cai_lib.platform.kfp_client import connect_kfp, require_host
    from cai_lib.platform.registry.lookup import first_set

    root, revision, dirty = read_checkout(repo, revision)
    if dirty and not dry_run:
        raise CaiError(f"{root}: uncommitted changes; commit them first (runs record commit {revision[:12]})")
    store = check_registry(*registry_of(registry_uri, config, dry_run))
    # The registry rule of `cai models` (flag, environment, the last `cai run` here); where it names
    # none, there is no champion yet: a dry run leaves it at that (it writes nothing), a real one
    # starts the store `cai run` would make here.
    found = first_set(tracking_uri, Path.cwd())
    if found:
        tracking_uri = found.uri
    elif dry_run:
        tracking_uri = None
    else:
        tracking_uri = local_platform(Path.cwd()).tracking_uri
        make_local_store(tracking_uri)
    if tracking_uri:
        connect(tracking_uri)
    if not dry_run:
        host = require_host(host)
        client = client or connect_kfp(host, namespace)
    elif client is None and host:
        try:  # a dry run needs no host: one that does not answer only leaves run states unread
            client = connect_kfp(host, namespace)
        except CaiError:
            client = None
    versions, newest = newest_versions(root, names)
    missing = unpublished(store, versions)
    plan = RetrainPlan(
        repo=str(root.parent),
        revision=revision,
        registry_uri=store.uri,
        dry_run=dry_run,
        uncommitted_changes=dirty,
        publish=[c.ref for c in missing],
        decisions=[
            decide(gather(c, store, tracking_uri, config, client, host, namespace)) for c in newest
        ],
    )
    if dry_run:
        return plan
    for constitution in missing:
        publish_constitution(constitution, store.uri)
    by_ref = {c.ref: c for c in newest}
    for item in plan.decisions:
        constitution = by_ref[item.ref]
        if item.adopt_run_id:
            _adopt(item, constitution, store, config, host, revision)
        if item.resolve_run_id:
            _resolve(item, constitution, store, host)
        if item.action != "retrain":
            continue
        if item.abandon_attempt and not _abandon(item, constitution, store):
            key = submission_key(constitution, item.fingerprint, item.abandon_attempt)
            item.action = "in-progress"
            item.reason = f"the expired claim {store.uri_of(key)} was resolved by someone else meanwhile"
            continue
        item.submission = _submit(
            submit,
            item, constitution, store, host, config, experiment, namespace, revision, client,
            compare_against(tracking_uri, config, constitution),
        )
        if item.submission is None:
            key = submission_key(constitution, item.fingerprint, item.attempt)
            item.action = "in-progress"
            item.reason = f"another retrain claimed it first ({store.uri_of(key)}); it submits the run"
    return plan


def gather(
    constitution: Constitution,
    store: ArtifactStore,
    tracking_uri: str | None,
    config: RunConfig,
    client,
    host: str | None,
    namespace: str | None = None,
) -> Facts:
    """The facts `decide` needs about the newest version `constitution` with `config`: the
    change, the production RL-CAI champion, the ledger, and (with a KFP `client`) the states of
    the runs it names and the runs found by name for its expired claims."""
    from cai_lib.core.model_versions import version_by_alias

    change = Change(
        ref=constitution.ref,
        sha256=constitution.sha256,
        fingerprint=fingerprint(constitution, config),
        run_config_sha256=run_config_sha256(config.params),
        training_params=training_params(config.params),
        image_cpu=config.deploy.image_cpu,
        image_gpu=config.deploy.image_gpu,
        model=model_name(config.params.model_name_prefix, constitution.name, RL_CAI),
    )
    champion = version_by_alias(tracking_uri, change.model, CHAMPION) if tracking_uri else None
    records = records_of(store, constitution)
    legacy_key = legacy_submission_key(constitution)
    facts = Facts(
        change=change,
        champion=None
        if champion is None
        else ChampionFacts(
            version=champion.version,
            lineage=champion.lineage,
            platform=all(champion.tags.get(tag) for tag in VERSION_CREATION_TAGS),
        ),
        records=records,
        legacy=read_record(store, legacy_key) if not records and store.exists(legacy_key) else None,
        run_states=None if client is None else {},
        now=utc_now(),
        folder=store.uri_of(attempts_prefix(constitution, change.fingerprint)),
        host=host,
    )
    if client is not None:
        states, names = reads_needed(facts)
        facts.run_states = {run_id: run_state(client, run_id, host) for run_id in states}
        found = {name: run_named(client, name, host, namespace) for name in names}
        facts.found_runs = {name: run_id for name, run_id in found.items() if run_id}
    return facts


def run_state(client, run_id: str, host: str | None) -> str | None:
    """The KFP state of run `run_id` (e.g. RUNNING, FAILED), or None when the host has no such run."""
    import kfp_server_api

    try:
        run = _kfp_call(client.get_run, host, f"reading run {run_id}", run_id)
    except kfp_server_api.ApiException as err:
        if err.status == 404:
            return None
        raise CaiError(
            f"Kubeflow Pipelines host {host}: reading run {run_id} failed ({err.status} {err.reason})"
        ) from None
    return str(getattr(run.state, "value", run.state) or "RUNTIME_STATE_UNSPECIFIED")


def run_named(client, name: str, host: str | None, namespace: str | None) -> str | None:
    """The id of the run called `name` (the one a claim submits), or None when there is none."""
    import kfp_server_api

    predicate = {"key": "display_name", "operation": "EQUALS", "string_value": name}
    try:
        response = _kfp_call(
            client.list_runs, host, f"looking run {name!r} up", namespace=namespace,
            filter=json.dumps({"predicates": [predicate]}), page_size=2,
        )  # fmt: skip
    except kfp_server_api.ApiException as err:
        raise CaiError(
            f"Kubeflow Pipelines host {host}: looking run {name!r} up failed ({err.status} {err.reason})"
        ) from None
    runs = response.runs or []
    return runs[0].run_id if runs else None


def _kfp_call(call, host: str | None, what: str, *args, **kwargs):
    """`call(*args, **kwargs)`, an unreachable host said in one line."""
    import urllib3

    try:
        return call(*args, **kwargs)
    except (urllib3.exceptions.HTTPError, OSError) as err:
        raise CaiError(f"Kubeflow Pipelines host {host}: {what} failed ({err})") from None


def _adopt(
    item: Decision,
    constitution: Constitution,
    store: ArtifactStore,
    config: RunConfig,
    host: str,
    revision: str,
) -> None:
    """Record that run `item.adopt_run_id`, whose settings were never recorded, trained this change."""
    record = new_record(
        constitution,
        store,
        config,
        item.fingerprint,
        attempt=item.attempt,
        kind="adopt",
        state="adopted",
        run_id=item.adopt_run_id,
        host=host,
        revision=revision,
        submitted_at=stamp(utc_now()),
    )
    # Lost to another retrain: it recorded this attempt, which says the same or more.
    claim_attempt(store, submission_key(constitution, item.fingerprint, item.attempt), record)


def _resolve(item: Decision, constitution: Constitution, store: ArtifactStore, host: str | None) -> None:
    """Record run `item.resolve_run_id`, found by the name an expired claim submits under, as that
    claim's run (a fenced write: nothing if the claim changed meanwhile)."""
    key = submission_key(constitution, item.fingerprint, item.attempt)
    claim, version = read_versioned_record(store, key)
    if claim.state != "submitting":
        return
    replace_record(
        store,
        key,
        claim.model_copy(update={"state": "submitted", "lease_expires_at": "", "run_id": item.resolve_run_id, "host": host or claim.host}),
        version,
    )


def _abandon(item: Decision, constitution: Constitution, store: ArtifactStore) -> bool:
    """Fence the expired claim of attempt `item.abandon_attempt` as abandoned, so that its owner's
    late write fails; False when it changed since it was read (its owner recorded a run after all,
    or another retrain abandoned it first)."""
    key = submission_key(constitution, item.fingerprint, item.abandon_attempt)
    claim, version = read_versioned_record(store, key)
    if claim.state != "submitting":
        return False
    return replace_record(store, key, claim.model_copy(update={"state": "abandoned"}), version) is not None


def _submit(
    submit: SubmitRun,
    item: Decision,
    constitution: Constitution,
    store: ArtifactStore,
    host: str,
    config: RunConfig,
    experiment: str,
    namespace: str | None,
    revision: str,
    client,
    compare_with: str = "",
) -> Submission | None:
    """Claim the attempt, submit its run and record it (a fenced write); None when another retrain
    claimed it first. A submission that fails keeps the claim (see the ledger's docstring)."""

    now = utc_now()
    key = submission_key(constitution, item.fingerprint, item.attempt)
    token = uuid.uuid4().hex
    attempt = f" attempt {item.attempt}" if item.attempt > 1 else ""
    claim = new_record(
        constitution,
        store,
        config,
        item.fingerprint,
        attempt=item.attempt,
        kind=item.kind,
        state="submitting",
        owner=f"retrain on {socket.gethostname()} pid {os.getpid()} ({token[:8]})",
        token=token,
        run_name=f"retrain {constitution.ref} {item.fingerprint[:12]}{attempt} [{token[:8]}] ({revision[:40]})",
        lease_expires_at=stamp(now + timedelta(seconds=LEASE_SECONDS)),
        replaces=item.replaces,
        host=host,
        experiment=experiment,
        revision=revision,
        submitted_at=stamp(now),
    )
    version = claim_attempt(store, key, claim)
    if version is None:
        return None
    # The run explains itself: once evaluated, it is compared with the champion's run (`compare_hook`).
    params = config.params.model_copy(update={"constitution": claim.constitution_uri, "compare_against": compare_with})
    try:
        run = submit(
            host,
            config.model_copy(update={"params": params}),
            experiment,
            run_name=claim.run_name,
            namespace=namespace,
            client=client,
        )
    except Exception as err:
        # The run may exist (a lost answer): the claim stays, and whoever finds it after its lease
        # looks its run up by name before submitting again.
        raise CaiError(
            f"submitting the run for {constitution.ref} failed ({str(err).splitlines()[0] if str(err) else type(err).__name__}); "
            f"its claim {store.uri_of(key)} is kept: after its lease ({claim.lease_expires_at}) a retrain looks "
            f"the run {claim.run_name!r} up, records it if it exists and submits again if not"
        ) from None
    submission = claim.model_copy(
        update={
            "state": "submitted",
            "lease_expires_at": "",
            "run_id": run.run_id,
            "url": run.url,
            "submitted_at": stamp(utc_now()),
        }
    )
    recorded = replace_record(store, key, submission, version)
    if recorded is None:
        raise CaiError(
            f"{constitution.ref}: run {run.run_id} was submitted, but its claim {store.uri_of(key)} was taken over "
            "meanwhile (its lease ran out during the submission); check for a second run of this change"
        )
    return recorded[0]
