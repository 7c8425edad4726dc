"""Content-addressed stage outputs (`cai_lib.core.outputs`) and the stage table, on a local directory
and on moto's S3 server: keys, the marker written last, first commit wins, abandoned attempts
discarded, and the per-run records that say what ran and what was reused."""

from __future__ import annotations

import pytest

from cai_lib.core import stage_table
from cai_lib.core.errors import CaiError
from cai_lib.core.names import MARKER
from cai_lib.core.outputs import StageOutput, StageRecord, record_of, summary_lines
from cai_lib.core.store import ArtifactStore


# The s3 variant starts moto's server through getfixturevalue, which the tier hook cannot see.
@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.server)])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "outputs")
    return f"s3://{request.getfixturevalue('s3_bucket')}/outputs"


def write_checkpoint(uri: str, content: bytes) -> None:
    store = ArtifactStore.open(uri)
    store.write_bytes("model.safetensors", content)
    store.write_json("_MANIFEST.json", {"files": {}})


def test_the_key_depends_on_every_part_of_the_identity(root):
    keys = {
        StageOutput(root, "sft", {"inputs": {"traces": "a"}, "settings": {"lr": 1}}).key,
        StageOutput(root, "sft", {"inputs": {"traces": "b"}, "settings": {"lr": 1}}).key,
        StageOutput(root, "sft", {"inputs": {"traces": "a"}, "settings": {"lr": 2}}).key,
        StageOutput(root, "rl", {"inputs": {"traces": "a"}, "settings": {"lr": 1}}).key,
    }
    assert len(keys) == 4


def test_the_key_does_not_depend_on_the_order_of_the_identitys_fields(root):
    assert StageOutput(root, "sft", {"a": 1, "b": 2}).key == StageOutput(root, "sft", {"b": 2, "a": 1}).key


def test_an_output_without_its_marker_is_not_complete(root):
    output = StageOutput(root, "sft", {"x": 1})
    write_checkpoint(output.new_attempt(), b"weights")
    assert output.complete() is None


def test_a_committed_output_is_complete_and_found_by_a_new_handle_with_the_same_identity(root):
    output = StageOutput(root, "sft", {"x": 1})
    attempt = output.new_attempt()
    write_checkpoint(attempt, b"weights")
    output.commit(attempt, "checkpoint", "run-1", sha256="ab", metrics={"loss": 0.5})

    found = StageOutput(root, "sft", {"x": 1}).complete()
    assert (found.uri, found.made_by_run, found.metrics) == (attempt, "run-1", {"loss": 0.5})


def test_the_first_commit_wins_and_the_losing_attempt_is_deleted(root):
    output = StageOutput(root, "sft", {"x": 1})
    first, second = output.new_attempt(), output.new_attempt()
    write_checkpoint(first, b"first")
    write_checkpoint(second, b"second")

    output.commit(first, "checkpoint", "run-1")
    standing = output.commit(second, "checkpoint", "run-2")

    assert (standing.uri, standing.made_by_run) == (first, "run-1")
    assert not ArtifactStore.open(second).list()


def test_committing_deletes_attempts_abandoned_by_killed_writers(root):
    output = StageOutput(root, "sft", {"x": 1})
    killed = output.new_attempt()
    ArtifactStore.open(killed).write_bytes("model.safetensors", b"half")  # no manifest: never finished
    done = output.new_attempt()
    write_checkpoint(done, b"weights")

    output.commit(done, "checkpoint", "run-2")

    assert not ArtifactStore.open(killed).list()
    assert ArtifactStore.open(done).exists("model.safetensors")


def test_a_marker_recording_another_key_is_refused(root):
    output = StageOutput(root, "sft", {"x": 1})
    other = StageOutput(root, "sft", {"x": 2})
    other.commit(other.new_attempt(), "checkpoint", "run-1")
    output.store.write_bytes(MARKER, other.store.read_bytes(MARKER))

    with pytest.raises(CaiError, match=f"records key {other.key}, not {output.key}"):
        output.complete()


def test_an_output_made_by_this_run_counts_as_ran_and_one_made_by_another_as_reused(root):
    output = StageOutput(root, "label", {"x": 1})
    marker = output.commit(output.data_uri(), "dataset", "run-1", rows=3)
    assert (record_of(marker, "run-1").status, record_of(marker, "run-2").status) == ("ran", "reused")


def record(
    stage: str, status: str, key: str = "0123456789abcdef", shard=None, made_by="run-1"
) -> StageRecord:
    return StageRecord(stage=stage, shard=shard, status=status, key=key, made_by_run=made_by, run_id="run-2")


def test_summary_lines_follow_the_pipeline_order_and_name_key_and_maker():
    lines = summary_lines([record("sft", "reused"), record("resolve", "ran")], stage_table.NAMES)
    assert lines == ["stage resolve: ran", "stage sft: reused (0123456789ab, first made by run run-1)"]


def test_a_fanned_out_stage_is_reused_only_when_every_shard_was():
    records = [record("critique_revise", "reused", shard=0), record("critique_revise", "ran", shard=1)]
    assert summary_lines(records, stage_table.NAMES) == ["stage critique_revise: ran (1 of 2 shards reused)"]


def test_a_later_rounds_stages_are_listed_after_round_ones_and_named_by_round():
    later = StageRecord(stage="rl", round=2, status="ran", key="0" * 32, made_by_run="run-2", run_id="run-2")
    lines = summary_lines([later, record("rl", "reused"), record("sft", "ran")], stage_table.NAMES)
    assert lines == [
        "stage sft: ran",
        "stage rl: reused (0123456789ab, first made by run run-1)",
        "stage rl (round 2): ran",
    ]


def test_a_later_rounds_record_has_a_file_of_its_own():
    later = StageRecord(stage="rl", round=2, status="ran", made_by_run="r", run_id="r")
    assert (record("rl", "ran").file_name, later.file_name) == ("rl.json", "rl@round2.json")


# -- the stage table ------------------------------------------------------------------------------------


def test_every_stage_names_a_component_that_exists():
    from components import stages

    assert all(callable(getattr(stages, stage.component, None)) for stage in stage_table.STAGES)


def test_every_stage_section_it_names_is_a_run_config_section():
    from cai_lib.platform.run_config import PipelineParams

    assert {s.settings for s in stage_table.STAGES if s.settings} <= set(PipelineParams.model_fields)


def test_code_hashes_differ_between_stages_built_from_different_modules():
    assert stage_table.code_sha256("sft") != stage_table.code_sha256("label")


def test_stages_built_from_the_same_modules_share_a_code_hash():
    assert stage_table.code_sha256("critique_revise") == stage_table.code_sha256("helpful_samples")


def test_an_unknown_stage_is_named_with_the_known_ones():
    with pytest.raises(CaiError, match="unknown stage 'sfft'; stages are resolve, prepare_prompts"):
        stage_table.stage("sfft")


def test_only_the_bookkeeping_stages_are_never_reused():
    assert [s.name for s in stage_table.STAGES if not s.reusable] == [
        "resolve",
        "prepare_prompts",
        "compare",
        "register",
    ]


def test_a_stage_code_hash_covers_the_modules_its_modules_import():
    # sample_pairs' settings are a GenerationStageConfig, defined in critique_revise.
    assert {"method.critique_revise", "engines.generation", "core.transcripts"} <= stage_table.stage_modules(
        "sample_pairs"
    )


def test_the_code_hash_of_a_stage_skips_the_layers_above_the_method():
    modules = set().union(*(stage_table.stage_modules(s.name) for s in stage_table.STAGES))
    assert {m.split(".")[0] for m in modules} <= {"core", "engines", "method"}


def test_infrastructure_is_in_no_stage_code_hash():
    modules = set().union(*(stage_table.stage_modules(s.name) for s in stage_table.STAGES))
    assert not modules & stage_table.INFRASTRUCTURE


def test_shards_of_one_stage_have_their_own_keys_and_share_their_rows_key(tmp_path):
    first, second = (StageOutput(str(tmp_path), "label", {"x": 1, "part": part}) for part in ("p1", "p2"))
    assert first.key != second.key
    assert first.rows_key == second.rows_key != StageOutput(str(tmp_path), "label", {"x": 2}).rows_key
