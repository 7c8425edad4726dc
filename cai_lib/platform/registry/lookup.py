"""Where `cai models list`, `cai models fetch`, `cai promote` and `cai retrain` find the model
registry: one rule.

The first of these that is set wins:

1. `--tracking-uri` (the flag);
2. `$MLFLOW_TRACKING_URI` (the environment);
3. the last `cai run` in this directory: `cai run` records its tracking URI and artifact root in
   `.cai/last-run.json` once its pipeline has run (succeeded or failed), so the store it used is
   found again even when it was given with `--tracking-uri`, `$MLFLOW_TRACKING_URI` or the default;
4. `cai run`'s default store in this directory, `mlflow.db` (MLflow's own default), if it exists (a run made
   before `cai run` wrote `.cai/last-run.json`). Where none of these is set, `cai retrain` starts
   that store empty (no champion yet); the other commands say what they tried.

The run config (`--config`) is not part of the rule: it names what to train, not where MLflow
lives. A local SQLite store that does not exist is refused rather than created empty, so a wrong
directory or a moved store is one line naming what was tried instead of an empty table; an HTTP
tracking server must answer one quick request.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from cai_lib.core.errors import CaiError

LAST_RUN = Path(".cai") / "last-run.json"
DEFAULT_STORE = Path("mlflow.db")
FLAG = "--tracking-uri"
ENV = "$MLFLOW_TRACKING_URI"
_SQLITE = "sqlite:///"


class Registry(NamedTuple):
    """A tracking/registry URI and, for people, where it was found."""

    uri: str
    source: str

    @property
    def from_flag(self) -> bool:
        return self.source == FLAG


def record_last_run(workdir: Path, tracking_uri: str, artifact_root: str, run_id: str | None = None) -> Path:
    """Write `.cai/last-run.json` under `workdir`: where the run that just ran keeps MLflow and its
    artifacts (absolute, as `local_platform` makes them). Returns the file written."""
    path = workdir / LAST_RUN
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "tracking_uri": tracking_uri,
        "artifact_root": artifact_root,
        "run_id": run_id,
        "recorded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
    return path


def read_last_run(workdir: Path) -> dict | None:
    """The record `cai run` left in `workdir`, or None where there is none."""
    path = workdir / LAST_RUN
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CaiError(
            f"{path}: not a record of `cai run` ({err}); delete it or run `cai run` again"
        ) from None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("tracking_uri"), str)
        or not record["tracking_uri"]
    ):
        raise CaiError(f"{path}: has no tracking_uri; delete it or run `cai run` again")
    return record


def find_registry(tracking_uri: str | None, workdir: Path | None = None, check: bool = True) -> Registry:
    """The registry to use by the rule in this module's docstring, and where it was found.

    `workdir` is where a `cai run` is looked for (default: the current directory). A `sqlite:///`
    store that does not exist, or (with `check`) an HTTP server that does not answer, is a
    `CaiError` naming the URI and its source; finding nothing is a `CaiError` naming each place tried.
    """
    workdir = Path.cwd() if workdir is None else workdir
    found = first_set(tracking_uri, workdir)
    if found is None:
        raise CaiError(
            f"no model registry found: {FLAG} not given, {ENV} not set, no {LAST_RUN} or {DEFAULT_STORE} "
            f"in {workdir} (`cai run` writes them); pass {FLAG}, set MLFLOW_TRACKING_URI, or run this "
            "where `cai run` ran"
        )
    _check_store(found, check)
    return found


def first_set(tracking_uri: str | None, workdir: Path) -> Registry | None:
    """The first registry the rule names, unchecked; None when it names none (`cai retrain` then
    starts an empty store: no champion yet)."""
    if tracking_uri:
        return Registry(tracking_uri, FLAG)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return Registry(os.environ["MLFLOW_TRACKING_URI"], ENV)
    record = read_last_run(workdir)
    if record is not None:
        run = f", run {record['run_id']}" if record.get("run_id") else ""
        return Registry(record["tracking_uri"], f"the last `cai run` here ({workdir / LAST_RUN}{run})")
    default = workdir / DEFAULT_STORE
    if default.is_file():
        return Registry(f"{_SQLITE}{default.resolve()}", f"`cai run`'s default store here ({default})")
    return None


def _check_store(found: Registry, check: bool) -> None:
    if found.uri.startswith(_SQLITE):
        db = Path(found.uri.removeprefix(_SQLITE).split("?", 1)[0])
        if not db.is_file():
            raise CaiError(
                f"no MLflow store at {found.uri} (from {found.source}): {db} does not exist; "
                f"pass {FLAG} or set MLFLOW_TRACKING_URI to the store the run used"
            )
    elif check and found.uri.startswith(("http://", "https://")):
        from mlflow import MlflowClient

        from cai_lib.core.tracking import _check_reachable

        _check_reachable(
            MlflowClient(tracking_uri=found.uri, registry_uri=found.uri), found.uri, found.source
        )
