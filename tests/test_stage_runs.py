"""A stage that reuses its output records itself in the run's folder at once and in MLflow when
the run's exit handler writes what the reused stages left (`write_deferred`): a reused step then
costs no MLflow imports or store connection, and MLflow still ends up with every stage run."""

from __future__ import annotations

import pytest

from cai_lib.core.names import DEMO_DATA_TAG, METRIC_SOURCE_TAG_PREFIX, REUSE_TAG, STAGE_TAG
from cai_lib.core.prompts import demo_set_note
from cai_lib.core.tracking import connect, start_pipeline_run
from cai_lib.platform.run_config import PipelineParams
from cai_lib.steps.context import RunContext
from cai_lib.steps.stage_runs import produce, run_records, source_tags, write_deferred


@pytest.fixture
def contexts(tmp_path):
    """Two runs sharing one artifact root and one MLflow store: the second reuses the first's output."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def context(run_id: str) -> RunContext:
        parent = start_pipeline_run(uri, "stage-runs", run_id, run_id, {}, "harmless@1.0.0", "0" * 64)
        return RunContext(
            params=PipelineParams(),
            run_id=run_id,
            run_name=run_id,
            artifact_root=str(tmp_path / "artifacts"),
            tracking_uri=uri,
            parent_run_id=parent,
        )

    return context("run-1"), context("run-2")


def write_merge(uri: str, _: str) -> dict:
    from cai_lib.core.records import PromptRecord
    from cai_lib.steps.context import write_finished_dataset

    write_finished_dataset(uri, [PromptRecord(id="p1", prompt="Hi?", kind="red_team", source="test")])


def stage_runs(ctx: RunContext) -> list:
    client = connect(ctx.tracking_uri)
    runs = client.search_runs(
        [client.get_run(ctx.parent_run_id).info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{ctx.parent_run_id}' and tags.`{STAGE_TAG}` = 'merge_traces'",
    )
    return runs


def test_a_reused_stage_writes_its_mlflow_run_only_when_the_exit_handler_asks(contexts, tmp_path):
    first, second = contexts
    produce(first, "merge_traces", {"of": "traces"}, write_merge)
    produce(second, "merge_traces", {"of": "traces"}, write_merge)
    assert stage_runs(second) == []
    (record,) = run_records(second.run_root)
    assert record.status == "reused"
    assert record.deferred.tags[REUSE_TAG] == "reused"

    assert write_deferred(second.tracking_uri, second.run_root) == ["merge_traces"]
    (run,) = stage_runs(second)
    assert run.data.tags[REUSE_TAG] == "reused"
    assert run.data.metrics["rows"] == 1.0
    assert run.info.status == "FINISHED"
    assert run_records(second.run_root)[0].deferred is None


def test_a_stage_that_runs_records_itself_in_mlflow_at_once(contexts):
    first, _ = contexts
    produce(first, "merge_traces", {"of": "traces"}, write_merge)
    (run,) = stage_runs(first)
    assert run.data.tags[REUSE_TAG] == "ran"
    assert run_records(first.run_root)[0].deferred is None


def test_writing_the_deferred_runs_twice_writes_them_once(contexts):
    first, second = contexts
    produce(first, "merge_traces", {"of": "traces"}, write_merge)
    produce(second, "merge_traces", {"of": "traces"}, write_merge)
    write_deferred(second.tracking_uri, second.run_root)
    assert write_deferred(second.tracking_uri, second.run_root) == []
    assert len(stage_runs(second)) == 1


def test_a_file_a_reused_stage_logs_is_uploaded_to_its_stage_run(contexts, tmp_path):
    first, second = contexts
    report = tmp_path / "report.html"
    report.write_text("<html>report</html>")

    def then(run, marker) -> None:
        run.log_artifact(report, "report")

    produce(first, "merge_traces", {"of": "traces"}, write_merge)
    produce(second, "merge_traces", {"of": "traces"}, write_merge, then=then)
    write_deferred(second.tracking_uri, second.run_root)
    (run,) = stage_runs(second)
    client = connect(second.tracking_uri)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/report.html"]


def test_a_stage_runs_tags_name_the_source_of_each_group_of_metrics_and_the_demo_sets_among_them():
    hub = "hf:Anthropic/hh-rlhf/harmless-base:test"
    tags = source_tags({"xstest": "builtin:refusal_contrast", "pm_accuracy": hub})

    assert tags == {
        f"{METRIC_SOURCE_TAG_PREFIX}xstest": "builtin:refusal_contrast",
        f"{METRIC_SOURCE_TAG_PREFIX}pm_accuracy": hub,
        DEMO_DATA_TAG: demo_set_note("builtin:refusal_contrast"),
    }
    assert DEMO_DATA_TAG not in source_tags({"pm_accuracy": hub})
