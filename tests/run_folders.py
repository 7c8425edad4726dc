"""Pipeline run folders written without running the pipeline, for `cai compare` and `cai impact`.

A run here leaves what a real one leaves for those commands to read: `run.json` (params and pinned
models), the pinned constitution, content-addressed outputs committed with their markers
(`StageOutput.commit`, the code the steps use) for sample_pairs (one per shard), label (one per
shard), merge_labels and, when given, evaluate; one stage record per output, ran or reused as
`record_of` says; and `summary.json` when it finished. Keys hash what the real steps' keys hash
for the parts compared here (the pairs, the labelling settings, the comparison section), so two
runs share the outputs a real pair of runs would share.
"""

from __future__ import annotations

from pathlib import Path

from cai_lib.core.constitution import Constitution, dump_constitution
from cai_lib.core.names import (
    ANSWERS_FILE,
    METRICS_FILE,
    PINNED_CONSTITUTION_FILE,
    RUN_FILE,
    STAGES_DIR,
    SUMMARY_FILE,
)
from cai_lib.core.outputs import StageOutput, record_of
from cai_lib.core.records import Preference, ResponsePair
from cai_lib.core.shards import dataset_summary
from cai_lib.core.store import ArtifactStore, join_uri
from cai_lib.method.evaluation.results import EvaluationResult, PolicyAnswer
from cai_lib.platform.run_config import PipelineParams
from cai_lib.steps.context import write_finished_dataset


def _dataset(outputs: str, stage: str, identity: dict, rows: list, run_id: str):
    output = StageOutput(outputs, stage, identity)
    marker = output.complete()
    if marker is None:
        write_finished_dataset(output.data_uri(), rows)
        summary = dataset_summary(output.data_uri())
        marker = output.commit(output.data_uri(), "dataset", run_id, rows=summary["rows"], sha256=summary["sha256"])
    return marker


def write_run(
    root: Path,
    run_id: str,
    constitution: Constitution,
    params: PipelineParams,
    pairs: list[list[ResponsePair]],
    labels: list[list[Preference]],
    evaluation: tuple[EvaluationResult, list[PolicyAnswer]] | None = None,
    finished: bool = True,
) -> str:
    """The folder of run `run_id` under the artifact root `root`, with a shard of pairs and of labels per item."""
    outputs, folder = str(root / "outputs"), ArtifactStore.open(str(root / "runs" / run_id))
    settings = params.labelling_settings(constitution)
    records, label_shas = [], []
    for shard, (shard_pairs, shard_labels) in enumerate(zip(pairs, labels)):
        made = _dataset(outputs, "sample_pairs", {"part": [shard, len(pairs)]}, shard_pairs, run_id)
        records.append(record_of(made, run_id, shard))
        identity = {
            "inputs": {"model": "tiny"},
            "part": made.sha256,
            "settings": settings.identity(),
            "constitution": {"comparison": constitution.section_sha256("comparison")},
        }
        labelled = _dataset(outputs, "label", identity, shard_labels, run_id)
        records.append(record_of(labelled, run_id, shard))
        label_shas.append(labelled.sha256)
    merged_rows = [row for shard in labels for row in shard]
    merged = _dataset(outputs, "merge_labels", {"of": "labels", "inputs": label_shas}, merged_rows, run_id)
    records.append(record_of(merged, run_id))
    if evaluation:
        result, answers = evaluation
        output = StageOutput(outputs, "evaluate", {"inputs": {"labels": merged.sha256}})
        attempt = ArtifactStore.open(output.new_attempt())
        attempt.write_jsonl(ANSWERS_FILE, answers)
        attempt.write_text(METRICS_FILE, result.model_dump_json())
        records.append(record_of(output.commit(attempt.uri, "directory", run_id), run_id))
    for record in records:
        folder.write_text(join_uri(STAGES_DIR, record.file_name), record.model_dump_json())
    folder.write_text(PINNED_CONSTITUTION_FILE, dump_constitution(constitution))
    models = {ref: {"load": ref, "content": "tiny"} for ref in {params.feedback_model, params.judge_model}}
    folder.write_json(RUN_FILE, {"run_id": run_id, "run_name": run_id, "params": params.model_dump(mode="json"), "models": models})
    if finished:
        folder.write_json(SUMMARY_FILE, {"run_id": run_id})
    return folder.uri
