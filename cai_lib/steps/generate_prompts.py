"""The generate-prompts steps: new prompts written few-shot from the training prompts of each kind,
one fan-out shard of requests at a time (`generate_prompts_shard`); then the `unique` filter over
every shard's candidates and the mix with the human prompts (`select_prompts`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai_lib.core.names import canonical_sha256
from cai_lib.core.outputs import StageOutput
from cai_lib.core.records import GeneratedPrompt, PromptKind, PromptRecord
from cai_lib.core.shards import read_dataset
from cai_lib.steps.context import DataRef, RunContext, one_line_errors, write_finished_dataset
from cai_lib.steps.stage_runs import make, produce

if TYPE_CHECKING:
    from cai_lib.core.tracking import StageRun


def held_out_prompts(evaluation: dict[str, DataRef], sources: list[str]) -> list[PromptRecord]:
    """Every prompt nothing generated may nearly duplicate: the run's evaluation split (`evaluation`,
    the held-out datasets) and the sets `sources` names."""
    from cai_lib.core.prompts import read_prompts

    rows = [row for ref in evaluation.values() for row in read_dataset(ref.uri, PromptRecord)]
    return rows + [row for source in sources for row in read_prompts(source)]


@one_line_errors
def generate_prompts_shard(
    context: dict, seeds: dict[str, str], evaluation: dict[str, str], shard: int, shards: int
) -> DataRef:
    """Candidate prompts for one of `shards` slices of the generation requests, each judged by the
    filters that look at one candidate alone. `seeds` are the DataRef files of each kind's human
    training prompts, `evaluation` those of the held-out splits."""
    from cai_lib.method.generate_prompts import generate_prompts

    ctx = RunContext.model_validate(context)
    config = ctx.params.generate_prompts
    seed_refs = {kind: DataRef.read(path) for kind, path in seeds.items()}
    eval_refs = {kind: DataRef.read(path) for kind, path in evaluation.items()}
    model = ctx.model(ctx.params.prompt_writer)
    held_out = held_out_prompts(eval_refs, config.held_out)
    identity = {
        "inputs": {
            "seeds": {kind: ref.sha256 for kind, ref in seed_refs.items()},
            "held_out": canonical_sha256(sorted(p.id for p in held_out)),
            "model": model.content,
        },
        "part": [shard, shards],
        "settings": config.identity(),
    }

    def write(uri: str, key: str) -> None:
        rows: dict[PromptKind, list[PromptRecord]] = {
            kind: list(read_dataset(ref.uri, PromptRecord)) for kind, ref in seed_refs.items()
        }
        generate_prompts(rows, held_out, model.load, uri, config, shard, shards, output_key=key)

    return DataRef.of(produce(ctx, "generate_prompts", identity, write, shard=shard))


@one_line_errors
def select_prompts(context: dict, candidates: str, human: dict[str, str]) -> tuple[dict[str, DataRef], dict]:
    """The `unique` filter over the merged candidates (`select_prompts`: every candidate with its
    final verdict), then each kind's training prompts: the human ones (`human`, DataRef files by
    kind) and the kept generated ones at `generated_per_human`. Returns the DataRefs (`generated`,
    `red_team_train`, `helpful_train`) and the counts per filter."""
    from cai_lib.method.generate_prompts import filter_counts, flat_counts, mix_prompts, select_unique

    ctx = RunContext.model_validate(context)
    config = ctx.params.generate_prompts
    source = DataRef.read(candidates)
    identity = {
        "inputs": {"candidates": source.sha256},
        "settings": config.model_dump(mode="json", include={"dedup_threshold", "ngram"}),
    }
    refs: dict[str, DataRef] = {}
    counts: dict = {}

    def write(uri: str, _: str) -> None:
        write_finished_dataset(uri, select_unique(read_dataset(source.uri, GeneratedPrompt), config))

    def mix(run: StageRun, marker) -> None:
        rows = list(read_dataset(marker.uri, GeneratedPrompt))
        counts.update(filter_counts(rows))
        run.log_stage_metrics(flat_counts(counts))
        for kind, path in human.items():
            people = list(read_dataset(DataRef.read(path).uri, PromptRecord))
            mixed = mix_prompts(kind, people, rows, config.kind(kind).generated_per_human, config.seed)
            # Stored by content, as prepare_prompts stores the human splits.
            output = StageOutput(
                ctx.outputs_root,
                "select_prompts",
                {"split": f"{kind}_train", "rows": canonical_sha256({"rows": [r.model_dump() for r in mixed]})},
            )
            done = output.complete() or make(
                ctx, "dataset", output, lambda uri, _, mixed=mixed: write_finished_dataset(uri, mixed), run.run_id
            )
            refs[f"{kind}_train"] = DataRef.of(done)
            run.log_stage_metrics({f"{kind}.train_prompts": len(mixed), f"{kind}.generated_used": len(mixed) - len(people)})

    refs["generated"] = DataRef.of(produce(ctx, "select_prompts", identity, write, then=mix))
    return refs, counts
