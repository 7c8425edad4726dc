"""The run config: one pydantic model that is the whole experiment.

The same fields are seen by the CLI (`cai run --config FILE --set key=value`), by `kfp.local`, by
the compiled pipeline (each top-level field of `PipelineParams` is one pipeline parameter, nested
stage sections are `dict` parameters) and by MLflow (logged as params of the parent run).
Deployment settings that cannot change per run (images, resource profiles, secrets) live in
`DeployConfig` and are applied when the pipeline is compiled; where the installation keeps its
artifacts and its MLflow server (`Platform`) reach each step through its environment.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from cai_lib.core.config import Seed, Strict, format_validation_error, parse_override, read_config_file
from cai_lib.core.constitution import Constitution
from cai_lib.core.deploy import DeployConfig
from cai_lib.core.errors import CaiError
from cai_lib.core.stage_table import TRAINING_STAGES, canonical
from cai_lib.method.critique_revise import CritiqueReviseConfig, HelpfulSamplesConfig
from cai_lib.method.evaluation.config import EvaluationConfig
from cai_lib.method.feedback import FeedbackConfig
from cai_lib.method.generate_prompts import GeneratePromptsConfig
from cai_lib.method.label_validation import Gates, LabelValidationConfig
from cai_lib.method.pairs import SamplePairsConfig
from cai_lib.method.preference_model import PreferenceModelConfig
from cai_lib.method.references import ReferencesConfig
from cai_lib.method.rl import RLConfig
from cai_lib.method.sft import SFTStageConfig
from cai_lib.platform.registry.gate import PromotionGate

# Names that end up in MLflow search filters, registered model names and Kubernetes objects: no
# quotes, no path separators, no "..".
RUN_NAME = r"^([A-Za-z0-9][A-Za-z0-9 ._:-]*)?$"
MODEL_PREFIX = r"^[a-z][a-z0-9-]*$"
# A run id (KFP or MLflow): it is looked up in MLflow search filters and used as a folder name.
RUN_REF = r"^([A-Za-z0-9][A-Za-z0-9._:-]*)?$"


# The sections with a seed of their own.
SEEDED_SECTIONS = (
    "generate_prompts",
    "critique_revise",
    "helpful_samples",
    "sft",
    "sample_pairs",
    "label",
    "train_pm",
    "rl",
    "evaluate",
)


# Sections named after a concept before they took the name of the stage they configure; a run
# config that still uses one is told the new name.
RENAMED_SECTIONS = {
    "pairs": "sample_pairs",
    "feedback": "label",
    "preference_model": "train_pm",
    "evaluation": "evaluate",
}

# The sections a later round of iterated CAI may set on its own (`iteration.overrides`).
ROUND_SECTIONS = ("sample_pairs", "label", "train_pm", "rl")
MAX_ROUNDS = 10


class RoundOverrides(Strict):
    """Settings of one later round that differ from the run's: each a partial section, merged over it."""

    sample_pairs: dict = Field(default_factory=dict, description="Fields of `sample_pairs` for this round.")
    label: dict = Field(default_factory=dict, description="Fields of `label` for this round.")
    train_pm: dict = Field(default_factory=dict, description="Fields of `train_pm` for this round.")
    rl: dict = Field(default_factory=dict, description="Fields of `rl` for this round.")


class IterationConfig(Strict):
    """How rounds 2..`rounds` of iterated CAI build on the round before (see docs/method.md)."""

    pm_init: Literal["continue", "scratch"] = Field(
        default="continue",
        description="Round k+1's preference model: 'continue' fine-tunes round k's PM on round k+1's labels; "
        "'scratch' trains a new one from base_model on them.",
    )
    feedback_follows_policy: bool = Field(
        default=False,
        description="Round k+1's pairs are labelled by round k's RL policy instead of feedback_model. The judge "
        "must then be independent of base_model, which every policy descends from.",
    )
    overrides: dict[str, RoundOverrides] = Field(
        default_factory=dict,
        description="Round number (2..rounds) -> settings of that round that differ from the run's "
        "sample_pairs, label, train_pm and rl sections. Changing one round's settings reruns that round and "
        "the rounds after it only.",
    )


def stage_seed(run_seed: int, section: str) -> int:
    """The seed a section derives from the run's seed when it pins none: a stable hash of both."""
    digest = hashlib.sha256(f"{run_seed}\0{section}".encode()).hexdigest()
    return int(digest[:8], 16) % 2**31


class PipelineParams(Strict):
    """Everything a run can vary. Each field is one Kubeflow pipeline parameter."""

    constitution: str = Field(
        default="harmless",
        description="Constitution ref: name, name@version, s3:// or file URI, or inline YAML.",
    )
    base_model: str = Field(
        default="smollm2-135m-instruct", description="Model ref of the helpful base policy."
    )
    feedback_model: str = Field(
        default="smollm2-135m-instruct", description="Model ref of the AI feedback model that labels pairs."
    )
    judge_model: str = Field(
        default="smollm2-135m-instruct",
        description="Model ref of the judge of the evaluation (win rates, Elo, evasiveness, the promotion gate): "
        "a model of another family than base_model and feedback_model. A judge that names the same model as "
        "either is refused when the run is loaded, unless evaluate.allow_dependent_judge gives a reason.",
    )
    prompt_model: str = Field(
        default="",
        description="Model ref that writes the generated prompts (generate_prompts); '' takes base_model. The paper "
        "used a pretrained model: give one with a chat_template if it has none.",
    )
    red_team_prompts: str = Field(default="builtin:red_team", description="Source of red-team prompts.")
    helpful_prompts: str = Field(default="builtin:helpful", description="Source of helpfulness prompts.")
    red_team_eval_prompts: str = Field(
        default="",
        description="Source of the held-out red-team prompts (round(num_red_team × eval_fraction) of them); '' "
        "holds out eval_fraction of red_team_prompts instead. Either way a held-out prompt whose text is also a "
        "training prompt, or the prompt of a human pair the PMs learn from, is left out of evaluation.",
    )
    helpful_eval_prompts: str = Field(
        default="",
        description="Source of the held-out helpfulness prompts (round(num_helpful × eval_fraction) of them), "
        "e.g. another split of the data helpful_prompts comes from; '' holds out eval_fraction of helpful_prompts.",
    )
    human_preferences: str = Field(
        default="",
        description="hh-rlhf-format source of human-labelled pairs mixed into PM training ('' for none). The "
        "paper's premise: human helpfulness comparisons (e.g. hh-rlhf helpful-base), with harmlessness "
        "labelled by AI.",
    )
    human_preference_kind: Literal["helpfulness", "harmlessness"] = Field(
        default="helpfulness",
        description="What the human pairs compare, recorded in each model's lineage. helpfulness follows the "
        "paper; harmlessness (e.g. hh-rlhf harmless-base) is the ablation that adds human harm labels.",
    )
    num_red_team: int = Field(default=64, ge=1, description="Red-team prompts used (before the eval split).")
    num_helpful: int = Field(
        default=64, ge=1, description="Helpfulness prompts used (before the eval split)."
    )
    num_human: int = Field(default=256, ge=0, description="Human-labelled pairs read from human_preferences.")
    eval_fraction: float = Field(
        default=0.25, gt=0.0, lt=1.0, description="Share of prompts held out for evaluation."
    )
    seed: Seed = Field(
        default=0,
        description="The run's seed: it splits the prompts and derives the seed of every stage section that "
        "does not pin its own (from this seed and the section's name), so one number reruns or varies the "
        "whole method.",
    )
    num_shards: int = Field(
        default=0,
        ge=0,
        le=512,
        description="Tasks each generation stage fans out to (dsl.ParallelFor; critique-revise, helpful "
        "samples, pair sampling, labelling), each on its own GPU; 0 derives it from rows_per_shard. "
        "Evaluation's answers fan out by the same rule over the held-out prompts, never to a task without one.",
    )
    rows_per_shard: int = Field(
        default=1000,
        ge=1,
        description="Red-team training prompts per generation task when num_shards is 0: the shard count "
        "is the prompts divided by this, rounded up.",
    )
    run_name: str = Field(
        default="",
        max_length=100,
        pattern=RUN_NAME,
        description="Display name of the MLflow parent run; '' takes the KFP run name. Letters, digits, "
        "spaces and . _ - : only. Runs are identified by their KFP run id, not by this name; an interrupted "
        "run resumes by running it again, since every stage output is found by its content key.",
    )
    experiment: str = Field(default="constitutional-ai", description="MLflow experiment name.")
    rounds: int = Field(
        default=1,
        ge=1,
        le=MAX_ROUNDS,
        description="Rounds of iterated CAI. Round 1 is SL-CAI then RL-CAI; each later round samples pairs from the "
        "round before's RL policy, labels them, retrains the PM and continues RL from that policy. Unrolled into "
        "the DAG when the pipeline is compiled: a run with another value needs the pipeline compiled for it.",
    )
    model_name_prefix: str = Field(
        default="cai",
        max_length=40,
        pattern=MODEL_PREFIX,
        description="Registered model names are <prefix>-<constitution>-{pm,sl-cai,rl-cai}: lowercase "
        "letters, digits and '-', starting with a letter.",
    )

    compare_against: str = Field(
        default="",
        max_length=200,
        pattern=RUN_REF,
        description="A finished run to compare this one with when it has been evaluated (its KFP or MLflow run "
        "id; '' for none): the compare step writes `cai compare`'s report into this run, and registration "
        "records it on the new model versions and in the gate's reason. `cai retrain` sets it to the run that "
        "made the champion the new run challenges.",
    )

    @model_validator(mode="after")
    def _derive_stage_seeds(self) -> PipelineParams:
        # A section's seed set explicitly (in YAML, --set or a pipeline parameter) is pinned; one left
        # out derives from the run's seed. It stays "not set", so a dump for the pipeline's
        # parameters leaves it out and a new run seed derives it again.
        for name in SEEDED_SECTIONS:
            section = getattr(self, name)
            if "seed" not in section.model_fields_set:
                section.seed = stage_seed(self.seed, name)
                section.model_fields_set.discard("seed")
        return self

    @model_validator(mode="after")
    def _overrides_name_later_rounds(self) -> PipelineParams:
        for key, overrides in self.iteration.overrides.items():
            if not key.isdigit() or not 2 <= int(key) <= self.rounds:
                raise ValueError(
                    f"iteration.overrides: round '{key}' is not one of the later rounds 2..{self.rounds} (rounds: "
                    f"{self.rounds})"
                )
            for section in ROUND_SECTIONS:
                merged = {**getattr(self, section).model_dump(), **getattr(overrides, section)}
                try:
                    type(getattr(self, section)).model_validate(merged)
                except ValidationError as err:
                    first = err.errors()[0]
                    where = ".".join(str(part) for part in first["loc"])
                    raise ValueError(f"iteration.overrides.{key}.{section}.{where}: {first['msg']}") from None
        return self

    def for_round(self, round_: int) -> PipelineParams:
        """The parameters round `round_` runs with: these, with its `iteration.overrides` merged over
        the round sections (round 1 has none)."""
        overrides = self.iteration.overrides.get(str(round_))
        if overrides is None:
            return self
        update = {
            section: type(getattr(self, section)).model_validate(
                {**getattr(self, section).model_dump(), **getattr(overrides, section)}
            )
            for section in ROUND_SECTIONS
            if getattr(overrides, section)
        }
        return self.model_copy(update=update)

    @field_validator("run_name")
    @classmethod
    def _no_dot_dot(cls, value: str) -> str:
        if ".." in value:
            raise ValueError("must not contain '..'")
        return value

    generate_prompts: GeneratePromptsConfig = Field(default_factory=GeneratePromptsConfig)
    critique_revise: CritiqueReviseConfig = Field(default_factory=CritiqueReviseConfig)
    helpful_samples: HelpfulSamplesConfig = Field(default_factory=HelpfulSamplesConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    sample_pairs: SamplePairsConfig = Field(default_factory=SamplePairsConfig)
    label: FeedbackConfig = Field(default_factory=FeedbackConfig)
    validate_labels: LabelValidationConfig = Field(default_factory=LabelValidationConfig)
    gates: Gates = Field(default_factory=Gates)
    train_pm: PreferenceModelConfig = Field(default_factory=PreferenceModelConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    evaluate: EvaluationConfig = Field(default_factory=EvaluationConfig)
    references: ReferencesConfig = Field(default_factory=ReferencesConfig)
    promotion: PromotionGate = Field(default_factory=PromotionGate)
    iteration: IterationConfig = Field(default_factory=IterationConfig)

    def shard_count(self, prompts: int) -> int:
        """Tasks per generation stage for `prompts` red-team training prompts: `num_shards` when
        set, else one per `rows_per_shard` prompts (at least one)."""
        return self.num_shards or max(1, -(-prompts // self.rows_per_shard))

    def eval_shard_count(self, red_team: int, helpful: int, xstest: int = 0) -> int:
        """Tasks of evaluation's generation over `red_team` and `helpful` held-out prompts and
        `xstest` XSTest prompts: the generation stages' rule for that many prompts, but never a
        shard that would get none (a shard takes every n-th prompt of each set), since each
        starts a GPU pod for nothing."""
        return max(1, min(self.shard_count(red_team + helpful + xstest), max(red_team, helpful, xstest)))

    @property
    def prompt_writer(self) -> str:
        """The model ref that writes generated prompts."""
        return self.prompt_model or self.base_model

    def judge_dependence(self, contents: dict[str, str] | None = None) -> list[str]:
        """What makes this run's judge not independent of what it judges, one phrase each: judge_model
        naming the same model as feedback_model or base_model (the base policy, and the start of every
        trained one), or a model this pipeline registers; judging principles not held out of the labels.
        `contents` (model reference -> the run's pinned content hash) also catches two references to
        one checkpoint."""
        from cai_lib.method.evaluation.config import judge_dependence

        roles = {"feedback_model": self.feedback_model, "base_model": self.base_model}
        found = [f"judge_model is also {role}" for role in judge_dependence(self.judge_model, roles)]
        if contents:
            judge = contents.get(self.judge_model)
            found += [
                f"judge_model is the same checkpoint as {role}"
                for role, ref in roles.items()
                if judge is not None and contents.get(ref) == judge and f"judge_model is also {role}" not in found
            ]
        if self.judge_model.strip().startswith(f"models:/{self.model_name_prefix}-"):
            found.append("judge_model is a model this pipeline registers and evaluates")
        if not self.evaluate.hold_out_judge_principles:
            found.append("evaluate.hold_out_judge_principles is off, so the judging principles make labels too")
        return found

    def check_independent_judge(self, contents: dict[str, str] | None = None) -> None:
        """Refuse a run whose judge is not independent (`judge_dependence`), unless
        evaluate.allow_dependent_judge says why it may be; and a run that names feedback_model or
        base_model but leaves judge_model at its default, which would silently judge with the
        embedded model."""
        from cai_lib.method.evaluation.config import RUN_CONFIG_ALLOWANCE, check_judge

        named = self.model_fields_set & {"feedback_model", "base_model"}
        if named and "judge_model" not in self.model_fields_set:
            raise CaiError(
                f"params.judge_model: not given while {' and '.join(sorted(named))} is; the judge would stay "
                f"on the default {self.judge_model}: name the model that judges the evaluation"
            )
        check_judge(
            self.judge_model, self.judge_dependence(contents), self.evaluate, "params.judge_model", RUN_CONFIG_ALLOWANCE
        )

    def labelling_settings(self, constitution: Constitution) -> FeedbackConfig:
        """The feedback settings the label stage uses: `label`, with the evaluation judge's
        principles held out of the label pool unless `evaluate.hold_out_judge_principles` is off."""
        from cai_lib.method.evaluation.config import judging_principles

        if not self.evaluate.hold_out_judge_principles:
            return self.label
        judges = {p.id for p in judging_principles(constitution, self.evaluate).values()}
        held = sorted({*self.label.held_out_principles, *judges})
        return self.label.model_copy(update={"held_out_principles": held})


class RunConfig(Strict):
    """The whole experiment: run parameters plus deployment settings."""

    params: PipelineParams = Field(default_factory=PipelineParams)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @model_validator(mode="after")
    def _processes_fit_the_profiles(self) -> RunConfig:
        for stage in TRAINING_STAGES:
            profile = self.deploy.resources.get(stage)
            processes = getattr(self.params, stage).processes
            if profile and profile.wants_gpu and processes > profile.accelerator_count:
                raise ValueError(
                    f"params.{stage}.processes {processes}: more than the {profile.accelerator_count} "
                    f"accelerator(s) per pod of resources.{stage}"
                )
        return self


def load_run_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a run config YAML (or the defaults) and apply `key=value` overrides; validate it all.

    A file may build on another (`base: FILE`, see `read_config_file`). A top-level key that is a `params` field may be given without the `params.` prefix.
    Unknown keys and bad values raise `CaiError` naming the file and the field.
    """
    data = read_config_file(Path(path)) if path else {}
    where = str(path) if path else "defaults"
    for item in overrides:
        keys, value = parse_override(item)
        keys = [canonical(keys[0]), *keys[1:]]
        if keys[0] not in RunConfig.model_fields:
            keys = ["params", *keys]
        keys = [keys[0], canonical(keys[1]), *keys[2:]] if len(keys) > 2 else keys
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CaiError(f"--set {item}: '{key}' is not a section")
        node[keys[-1]] = value
        where = f"{where} with --set" if "--set" not in where else where
    params = data.get("params")
    for old, new in RENAMED_SECTIONS.items():
        if isinstance(params, dict) and old in params:
            raise CaiError(
                f"{where}: field 'params.{old}': renamed 'params.{new}', after the stage it configures"
            )
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise CaiError(format_validation_error(err, where)) from None


def params_as_pipeline_arguments(params: PipelineParams) -> dict:
    """The pipeline's arguments: scalars as they are, sections as plain dicts (JSON-safe).

    Unset (None) section fields are left out: KFP's struct parameters cannot hold null, and
    validation gives them back their None default. Derived stage seeds are left out too, so that
    a run started with another `seed` derives them again.
    """
    arguments = json.loads(params.model_dump_json(exclude_none=True))
    for name in SEEDED_SECTIONS:
        if "seed" not in getattr(params, name).model_fields_set:
            arguments[name].pop("seed")
    return arguments
