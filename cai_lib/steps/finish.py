"""The exit handler: close the run's MLflow run, complete a promotion it left half-done and release
its locks, whatever became of the run.
"""

from __future__ import annotations

import json

from cai_lib.core.config import Platform
from cai_lib.core.errors import CaiError
from cai_lib.core.names import RUNS_DIR, SUMMARY_FILE
from cai_lib.core.settings import settings, variable
from cai_lib.core.store import ArtifactStore, join_uri
from cai_lib.core.tracking import finish_pipeline_run, run_url
from cai_lib.steps.context import one_line_errors
from cai_lib.steps.stage_runs import run_summary, write_deferred

OUTCOME_ENV = variable("run_outcome")


@one_line_errors
def finish(run_id: str, experiment: str, state: str, error: str = "") -> str:
    """The exit handler: write the MLflow stage runs that reused stages left for it
    (`write_deferred`), close the MLflow parent run FINISHED when the pipeline `state` is
    SUCCEEDED and FAILED otherwise (failed, cancelled), complete any promotion the run left
    pending (killed half-way) and release any promotion lock it still holds. Runs whatever
    happened to the other steps. Returns a JSON summary: the state, what it closed, completed and
    released, one line per stage that recorded itself (ran or reused), and the register step's
    summary when the run got that far."""
    from cai_lib.platform.registry.lock import release_run_locks
    from cai_lib.platform.registry.promotion import complete_run_promotions

    platform = Platform.from_environment()
    succeeded = state == "SUCCEEDED"
    # Each is tried whatever the others do; a failure of any fails the task, which KFP retries.
    completed, released, parent, errors = [], [], None, []
    folder = ArtifactStore.open(join_uri(platform.artifact_root, RUNS_DIR, run_id))
    try:
        write_deferred(platform.tracking_uri, folder.uri)
    except Exception as err:  # noqa: BLE001 - collected and raised below
        errors.append(f"writing the MLflow runs of reused stages: {err}")
    try:
        completed = complete_run_promotions(platform.tracking_uri, run_id)
        released = release_run_locks(platform.tracking_uri, run_id)
    except Exception as err:  # noqa: BLE001 - collected and raised below
        errors.append(f"completing promotions and releasing promotion locks: {err}")
    try:
        parent = finish_pipeline_run(platform.tracking_uri, experiment, run_id, succeeded)
    except Exception as err:  # noqa: BLE001 - collected and raised below
        errors.append(f"closing the MLflow run: {err}")
    if errors:
        raise CaiError(f"exit handler of pipeline run {run_id}: {'; '.join(errors)}")
    outcome = json.dumps(
        {
            "run_id": run_id,
            "state": state,
            "error": error,
            "mlflow_run": parent,
            "mlflow_run_url": run_url(platform.tracking_uri, parent) if parent else "",
            "promotions_completed": completed,
            "locks_released": released,
            "stages": run_summary(folder.uri),
            "summary": folder.read_json(SUMMARY_FILE) if folder.exists(SUMMARY_FILE) else None,
        }
    )
    # kfp.local returns no pipeline output from a failed run; `cai run` names a file to read instead.
    outcome_file = settings().run_outcome
    if outcome_file:
        outcome_file.write_text(outcome)
    return outcome
