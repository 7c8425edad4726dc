"""The pipeline's first step: validate the run, pin its constitution and models, open its MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from cai_lib.core.config import Platform
from cai_lib.core.constitution import dump_constitution, load_constitution
from cai_lib.core.errors import CaiError
from cai_lib.core.names import PINNED_CONSTITUTION_FILE, RUN_FILE
from cai_lib.core.outputs import StageRecord
from cai_lib.core.store import ArtifactStore
from cai_lib.core.tracking import run_url, start_pipeline_run
from cai_lib.platform.run_config import PipelineParams
from cai_lib.steps.context import PinnedModel, RunContext, one_line_errors
from cai_lib.steps.policies import champion_source
from cai_lib.steps.stage_runs import recorded, write_record


@one_line_errors
def resolve(
    params: dict, run_id: str, run_name: str, constitution_path: str, compiled_rounds: int | None = None
) -> dict:
    """First step: validate the run, pin the constitution, run the pre-flight checks, open the
    MLflow parent run (keyed on the KFP run id `run_id`; `run_name` is its display name).

    Writes the pinned constitution YAML to `constitution_path` (a small KFP artifact every later
    step reads, so a run is reproducible whatever happens to the registry) and returns the run
    context as a dict, with each model reference pinned to what it names now (so an alias that
    moves mid-run does not change what later stages load) and the RL-CAI champion it found (what
    the first round is evaluated against). Everything a user can get wrong fails
    here, before any model loads, and so does a run whose `rounds` is not the `compiled_rounds`
    unrolled into the pipeline it runs in.
    """
    from pydantic import ValidationError

    from cai_lib.core.config import format_validation_error
    from cai_lib.engines.models import pin_model
    from cai_lib.platform.preflight import check_run

    try:
        checked = PipelineParams.model_validate(params)
    except ValidationError as err:
        raise CaiError(format_validation_error(err, "pipeline parameters")) from None
    if compiled_rounds is not None and checked.rounds != compiled_rounds:
        raise CaiError(
            f"params.rounds: {checked.rounds}, but this pipeline was compiled with {compiled_rounds} round(s) of "
            f"iterated CAI; compile it for {checked.rounds} (cai compile --set rounds={checked.rounds}) or run "
            f"it with rounds {compiled_rounds}"
        )
    platform = Platform.from_environment()
    constitution = load_constitution(checked.constitution)
    check_run(checked, constitution)
    Path(constitution_path).parent.mkdir(parents=True, exist_ok=True)
    Path(constitution_path).write_text(dump_constitution(constitution))
    display = checked.run_name or run_name
    models = {
        ref: PinnedModel(**pin_model(ref)._asdict())
        for ref in {
            checked.base_model,
            checked.feedback_model,
            checked.judge_model,
            checked.prompt_writer,
            *checked.validate_labels.compare_models,
        }
    }
    # Two references to one checkpoint are one model: judged by what the pins name, not how.
    checked.check_independent_judge({ref: pin.content for ref, pin in models.items()})
    parent = start_pipeline_run(
        platform.tracking_uri,
        checked.experiment,
        run_id,
        display,
        checked.model_dump(mode="json"),
        constitution.ref,
        constitution.sha256,
    )
    ctx = RunContext(
        params=checked,
        run_id=run_id,
        run_name=display,
        artifact_root=platform.artifact_root,
        tracking_uri=platform.tracking_uri,
        parent_run_id=parent,
        mlflow_run_url=run_url(platform.tracking_uri, parent),
        models=models,
    )
    ctx.champion = champion_source(ctx, constitution)
    folder = ArtifactStore.open(ctx.run_root)
    folder.write_text(PINNED_CONSTITUTION_FILE, dump_constitution(constitution))
    # The pinned models too: `cai impact` and `cai compare` load the labeller this run used.
    folder.write_json(
        RUN_FILE,
        {
            "run_id": run_id,
            "run_name": display,
            "params": checked.model_dump(mode="json"),
            "models": {ref: pin.model_dump() for ref, pin in models.items()},
        },
    )
    with recorded(ctx, "resolve") as run:
        run.log_artifact(constitution_path, "constitution")
        write_record(ctx, StageRecord(stage="resolve", status="ran", made_by_run=run_id, run_id=run_id))
    return ctx.model_dump(mode="json", exclude_none=True)  # KFP structs cannot hold null
