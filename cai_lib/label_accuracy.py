"""How often the AI feedback labeller agrees with human labels (Bai et al. 2022, §4.1, Figure 4).

The paper checks its feedback model against human choices before trusting its labels. Two real
formats of human-labelled data are read, detected per file from its first row:

- **hh-rlhf** rows `{"chosen", "rejected"}` (read by `cai_lib.human_preferences`): the labeller
  (`cai_lib.feedback`, with its principles, ensembling, order debiasing and optional chain of
  thought) labels the pair (chosen, rejected); it agrees when P(chosen better) > 0.5.
- **multiple choice**, the format in which the paper's authors published their evaluations
  (`evals/*.jsonl` of anthropics/ConstitutionalHarmlessnessPaper): rows with `prompt` (a full
  question ending in "The answer is:"), `corrects` and `incorrects` (option strings such as
  " (B)"), optionally `text_correct`/`text_incorrect`. Each option is scored by its summed
  log-probability as the feedback model's reply: the prompt is the user turn of the chat and the
  option (without its leading space, which only joined it to "The answer is:") is read at the
  start of the assistant turn, after the constitution's comparison few-shot examples, exactly as
  the labeller reads "(A"/"(B". A row agrees when the best correct option scores higher than
  every incorrect one. These questions are scored as published: their option order is fixed
  by the file, so no order debiasing, no principle draw and no chain of thought apply.

Scoring the raw prompt text without the chat template would fit a pretrained model, as in the
paper; the backends here speak chat, and the embedded model is an instruct model, so the chat
form is the one its labels are made with.

The agreement comes with a Wilson score 95% interval (`cai_lib.elo.wilson_interval`, shared with
the evaluation's win rates), which stays inside [0, 1] and behaves at small n and at agreement
near 0 or 1, where the normal approximation does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

from cai_lib.constitution import Constitution
from cai_lib.elo import wilson_interval
from cai_lib.errors import CaiError
from cai_lib.feedback import FeedbackConfig, FeedbackLabeller, check_constitution, few_shot_messages
from cai_lib.generation import GenerationBackend, load_backend
from cai_lib.human_preferences import read_human_preferences
from cai_lib.prompts import HF_PREFIX, json_rows

HH_FIELDS = ("chosen", "rejected")
MC_FIELDS = ("prompt", "corrects", "incorrects")
Format = Literal["hh-rlhf", "multiple-choice"]


class MultipleChoiceRow(BaseModel):
    """One published multiple-choice question."""

    prompt: str = Field(description="The full question, ending in 'The answer is:'.")
    corrects: list[str] = Field(description="Options a correct answer may be, e.g. [' (B)'].")
    incorrects: list[str] = Field(description="Options that are wrong, e.g. [' (A)'].")


class AccuracyReport(BaseModel):
    """The labeller's agreement with human labels on one source."""

    source: str = Field(description="The human-labelled source that was read.")
    format: Format = Field(description="The detected format of the source.")
    model_ref: str = Field(description="The feedback model.")
    constitution_ref: str = Field(
        description="name@version of the constitution (its few-shot examples and principles)."
    )
    constitution_sha256: str = Field(description="Content hash of that constitution.")
    n: int = Field(description="Human-labelled comparisons scored.")
    agreed: int = Field(description="How many of them the labeller agreed with.")
    agreement: float = Field(description="agreed / n.")
    ci_low: float = Field(description="Lower end of the Wilson 95% interval of the agreement.")
    ci_high: float = Field(description="Upper end of the Wilson 95% interval of the agreement.")
    mean_p_human_choice: float | None = Field(
        default=None, description="hh-rlhf only: the labeller's mean soft probability for the human's choice."
    )
    config: dict = Field(default_factory=dict, description="The labeller settings (hh-rlhf) used.")

    def summary(self) -> str:
        """One line ending in the agreement and its count, e.g. for the CLI's last line."""
        unit = "pairs" if self.format == "hh-rlhf" else "questions"
        return f"agreement {self.agreement:.2f} (95% CI {self.ci_low:.2f}-{self.ci_high:.2f}) over {self.n} {unit}"


def detect_format(source: str) -> Format:
    """The format of a human-labelled source, from its first row; `hf:` datasets are hh-rlhf."""
    if str(source).startswith(HF_PREFIX):
        return "hh-rlhf"
    first = next(json_rows(str(source)), None)
    if first is None:
        raise CaiError(f"{source}: no rows")
    return _row_format(source, *first)


def label_accuracy(
    human_source: str,
    constitution: Constitution,
    model_ref: str,
    limit: int | None,
    config: FeedbackConfig,
    backend: GenerationBackend | None = None,
) -> AccuracyReport:
    """The feedback labeller's agreement with the first `limit` human labels of `human_source`.

    See the module docstring for the two formats and what agreement means in each. Raises
    `CaiError` naming the source and row for a file in neither format, and for a constitution or
    K the labeller cannot use, and for `config.cot` on a multiple-choice file.
    """
    if limit is not None and limit < 1:
        raise CaiError(f"limit: must be at least 1, got {limit}")
    check_constitution(constitution, config)
    kind = detect_format(human_source)
    if kind == "multiple-choice" and config.cot:
        raise CaiError(
            f"{human_source}: chain of thought applies to hh-rlhf pairs; multiple-choice questions are scored directly"
        )
    rows = (
        read_human_preferences(human_source, limit)
        if kind == "hh-rlhf"
        else read_multiple_choice(human_source, limit)
    )
    model = backend or load_backend(model_ref, config.backend, batch_size=config.batch_size)
    if kind == "hh-rlhf":
        labeller = FeedbackLabeller(model, constitution, model_ref, config)
        p_human = _label_human_pairs(labeller, rows, config.shard_size)
        agreed = sum(p > 0.5 for p in p_human)
        extra = {"mean_p_human_choice": sum(p_human) / len(p_human), "config": config.identity()}
    else:
        agreed = _score_multiple_choice(
            model, few_shot_messages(constitution, cot=False), rows, config.shard_size
        )
        extra = {}
    low, high = wilson_interval(agreed, len(rows))
    return AccuracyReport(
        source=str(human_source),
        format=kind,
        model_ref=model_ref,
        constitution_ref=constitution.ref,
        constitution_sha256=constitution.sha256,
        n=len(rows),
        agreed=agreed,
        agreement=agreed / len(rows),
        ci_low=low,
        ci_high=high,
        **extra,
    )


def read_multiple_choice(source: str, limit: int | None = None) -> list[MultipleChoiceRow]:
    """The first `limit` multiple-choice rows of `source`; a row out of format is a `CaiError` naming it."""
    rows = []
    for where, row in json_rows(str(source)):
        if _row_format(source, where, row) != "multiple-choice":
            raise CaiError(f"{source}: {where}: an hh-rlhf row in a multiple-choice file")
        rows.append(_multiple_choice_row(source, where, row))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise CaiError(f"{source}: no multiple-choice rows")
    return rows


def multiple_choice_agrees(correct_scores: Sequence[float], incorrect_scores: Sequence[float]) -> bool:
    """Whether the best correct option scores strictly higher than every incorrect option."""
    return max(correct_scores) > max(incorrect_scores)


def _label_human_pairs(labeller: FeedbackLabeller, rows: list, chunk: int) -> list[float]:
    """P(chosen better) for each human pair (answer A is the human's choice)."""
    from tqdm.auto import tqdm

    probabilities: list[float] = []
    with tqdm(total=len(rows), unit="pair", desc="labelling human pairs") as bar:
        for start in range(0, len(rows), chunk):
            probabilities += [p.label for p in labeller.label(rows[start : start + chunk])]
            bar.update(len(rows[start : start + chunk]))
    return probabilities


def _score_multiple_choice(
    model: GenerationBackend, prefix: list, rows: list[MultipleChoiceRow], chunk: int
) -> int:
    """How many questions the model answers correctly (see `multiple_choice_agrees`)."""
    from tqdm.auto import tqdm

    agreed = 0
    with tqdm(total=len(rows), unit="question", desc="multiple-choice questions") as bar:
        for start in range(0, len(rows), chunk):
            batch = rows[start : start + chunk]
            contexts = [[{"role": "user", "content": row.prompt.strip()}] for row in batch]
            options = [[o.strip() for o in row.corrects + row.incorrects] for row in batch]
            scores = model.score_options(contexts, options, shared_prefix=prefix or None)
            for row, row_scores in zip(batch, scores):
                n_correct = len(row.corrects)
                agreed += multiple_choice_agrees(row_scores[:n_correct], row_scores[n_correct:])
            bar.update(len(batch))
    return agreed


def _row_format(source: str, where: str, row: object) -> Format:
    if isinstance(row, dict) and all(field in row for field in HH_FIELDS):
        return "hh-rlhf"
    if isinstance(row, dict) and all(field in row for field in MC_FIELDS):
        return "multiple-choice"
    found = sorted(row) if isinstance(row, dict) else type(row).__name__
    raise CaiError(
        f"{source}: {where}: neither an hh-rlhf row (fields chosen, rejected) nor a multiple-choice row "
        f"(fields prompt, corrects, incorrects); found {found}"
    )


def _multiple_choice_row(source: str, where: str, row: dict) -> MultipleChoiceRow:
    def problem() -> str | None:
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            return "field 'prompt' must be a non-empty string"
        for field in ("corrects", "incorrects"):
            options = row[field]
            if not isinstance(options, list) or not options:
                return f"field '{field}' must be a non-empty list of option strings"
            if not all(isinstance(o, str) and o.strip() for o in options):
                return f"field '{field}' holds an option that is not a non-empty string"
        return None

    error = problem()
    if error:
        raise CaiError(f"{source}: {where}: {error}")
    return MultipleChoiceRow(prompt=row["prompt"], corrects=row["corrects"], incorrects=row["incorrects"])
