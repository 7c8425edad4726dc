"""The validate-labels step: the feedback labeller, as the label stage uses it, scored on held-out
human comparisons before the preference model trains; the gate that stops the run.
"""

from __future__ import annotations

from cai_lib.core.errors import CaiError
from cai_lib.core.names import LABEL_VALIDATION_FILE, canonical_sha256
from cai_lib.core.outputs import StageRecord
from cai_lib.core.store import ArtifactStore
from cai_lib.steps.context import RunContext, one_line_errors, pinned_constitution
from cai_lib.steps.stage_runs import produce, run_records, source_tags


@one_line_errors
def validate_labels(context: dict, constitution_path: str) -> dict[str, float]:
    """Score the run's feedback model (and `validate_labels.compare_models`) with the label
    stage's settings on the held-out human comparisons (paper §4.1, Fig. 4); returns the
    configured labeller's metrics. Raises `CaiError` (the run stops, one line) when
    `gates.min_label_accuracy` is set and not met; the validation is stored either way."""
    from cai_lib.method.label_validation import gate_failure, labeller_names, validation_comparisons
    from cai_lib.method.label_validation import validate_labels as run_validation

    ctx = RunContext.model_validate(context)
    p = ctx.params
    constitution = pinned_constitution(constitution_path)
    # The label stage's settings, and none of the pairs train_pm reads from human_preferences.
    settings = p.labelling_settings(constitution)
    comparisons = validation_comparisons(p.validate_labels, p.human_preferences, p.num_human)
    models = {name: ctx.model(name) for name in labeller_names(p.feedback_model, p.validate_labels)}
    identity = {
        "inputs": {
            "models": {name: pin.content for name, pin in models.items()},
            "configured": p.feedback_model,
            "comparisons": canonical_sha256(
                [
                    {"source": c.source, "pairs": [pair.id for pair in c.pairs], "excluded": c.excluded}
                    for c in comparisons
                ]
            ),
        },
        "settings": settings.identity(),
    }

    def write(uri: str, _: str) -> dict:
        result = run_validation(
            comparisons,
            constitution,
            {name: pin.load for name, pin in models.items()},
            p.feedback_model,
            settings,
        )
        ArtifactStore.open(uri).write_text(LABEL_VALIDATION_FILE, result.model_dump_json(indent=2) + "\n")
        return result.metrics()

    def name_sources(run, marker) -> None:
        run.set_tags(source_tags(load_validation(marker.uri).metric_sources()))

    marker = produce(ctx, "validate_labels", identity, write, constitution, then=name_sources)
    failure = gate_failure(load_validation(marker.uri), p.gates)
    if failure:
        raise CaiError(failure)
    return marker.metrics


def load_validation(uri: str):
    """The `LabelValidation` stored at `uri` by this step."""
    from cai_lib.method.label_validation import LabelValidation

    return LabelValidation.model_validate_json(ArtifactStore.open(uri).read_text(LABEL_VALIDATION_FILE))


def run_validation_of(run_root: str):
    """The labeller validation a pipeline run used (its validate_labels record), or None."""
    record: StageRecord | None = next(
        (r for r in run_records(run_root) if r.stage == "validate_labels"), None
    )
    if record is None or not record.uri:
        return None
    return load_validation(record.uri)
