"""Typed rows of every dataset the pipeline writes.

Each dataset is JSONL, one pydantic model per dataset, and each row carries a stable `id` that
is derived from its content, so a rerun with the same inputs produces the same ids.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def stable_id(*parts: str, length: int = 16) -> str:
    """A short hex id that depends only on `parts` (order-sensitive)."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return digest[:length]


class Record(BaseModel):
    """Base of every row: unknown fields are an error, so a typo in a file is caught."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Stable id derived from the row's content.")


# xstest: the XSTest prompts every evaluation answers (cai_lib.method.evaluation.xstest).
PromptKind = Literal["red_team", "helpful", "xstest"]


class PromptRecord(Record):
    """One prompt: a red-team (harmful) request or a helpfulness request."""

    prompt: str = Field(min_length=1, description="The human turn put to the assistant.")
    kind: PromptKind = Field(default="red_team", description="Which prompt set this belongs to.")
    source: str = Field(default="", description="Where the prompt was read from (file, URI, dataset id).")


class GeneratedPrompt(Record):
    """A prompt a model wrote few-shot from seed prompts (automated red teaming), with its provenance
    and the verdict of every filter it met. Rejected candidates are kept too, so a team can see
    what was generated and why each was dropped before any of it is used."""

    kind: PromptKind = Field(description="The prompt set it was written for, few-shot from that set's seeds.")
    request: int = Field(ge=0, description="Index of the generation request within its kind.")
    seed_ids: list[str] = Field(description="Ids of the seed prompts shown as examples, in the order shown.")
    raw: str = Field(description="The reply as the model wrote it.")
    prompt: str = Field(description="The prompt parsed from the reply ('' when it did not parse).")
    model_ref: str = Field(description="The model that wrote it.")
    passed: list[str] = Field(default_factory=list, description="The filters it passed, in the order applied.")
    rejected_by: str | None = Field(default=None, description="The filter that dropped it; None when it is kept.")
    near: str | None = Field(
        default=None,
        description="Id of the seed, held-out or generated prompt it nearly duplicates, when that dropped it.",
    )

    @property
    def kept(self) -> bool:
        return self.rejected_by is None


class RevisionRound(BaseModel):
    """One critique→revision round of SL-CAI."""

    model_config = ConfigDict(extra="forbid")

    principle_id: str = Field(description="Id of the critique/revision principle drawn for this round.")
    critique: str | None = Field(description="The model's critique; None in no-critique mode.")
    revision: str = Field(
        description="The model's rewritten answer, without a preamble such as 'Here is a revised response:'."
    )
    raw_revision: str | None = Field(
        default=None, description="The reply as the model wrote it, when a preamble was stripped from it."
    )


class Trace(Record):
    """An SL-CAI trace: the initial answer, every round, and the final answer.

    Helpfulness samples use the same record with no rounds (final_answer == initial_answer).
    """

    prompt_id: str
    prompt: str
    kind: PromptKind = "red_team"
    initial_answer: str
    rounds: list[RevisionRound] = Field(default_factory=list)
    final_answer: str
    constitution_ref: str = Field(default="", description="name@version of the constitution used.")
    constitution_sha256: str = Field(default="", description="Content hash of that constitution.")
    model_ref: str = Field(description="The model reference that generated the answers.")


class ResponsePair(Record):
    """Two answers sampled from one policy for one prompt, to be compared by the feedback model."""

    prompt_id: str
    prompt: str
    answer_a: str = Field(min_length=1)
    answer_b: str = Field(min_length=1)
    model_ref: str


class PrincipleScore(BaseModel):
    """The feedback model's probability that A is better, under one principle, in both orders."""

    model_config = ConfigDict(extra="forbid")

    principle_id: str
    p_a_first: float = Field(ge=0.0, le=1.0, description="P(A better) with A shown as option (A).")
    p_a_second: float = Field(
        ge=0.0, le=1.0, description="P(A better) with A shown as option (B); NaN-free, already un-swapped."
    )
    reasoning: list[str] = Field(default_factory=list, description="Chain-of-thought text, one per order.")
    scoring: Literal["one-pass", "per-option"] | None = Field(
        default=None,
        description="How the options were read: one-pass (one next-token distribution per question) or "
        "per-option (a row per option, when the options are not one distinct token each); None when "
        "the backend does not say.",
    )


class Preference(Record):
    """A soft preference between two answers to one prompt.

    `label` is P(answer_a is better) in [0, 1]; `chosen`/`rejected` name the argmax for
    consumers that want hard pairs. Human rows have label 1.0 for the human choice.
    """

    prompt: str = Field(description="The conversation up to the compared assistant turn.")
    answer_a: str = Field(min_length=1)
    answer_b: str = Field(min_length=1)
    label: float = Field(ge=0.0, le=1.0, description="P(answer_a is better).")
    source: Literal["ai", "human"]
    principle_ids: list[str] = Field(default_factory=list)
    scores: list[PrincipleScore] = Field(default_factory=list)
    constitution_ref: str = ""
    constitution_sha256: str = ""
    model_ref: str = ""

    @property
    def chosen(self) -> str:
        return self.answer_a if self.label >= 0.5 else self.answer_b

    @property
    def rejected(self) -> str:
        return self.answer_b if self.label >= 0.5 else self.answer_a
