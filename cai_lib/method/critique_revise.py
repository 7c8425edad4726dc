"""SL-CAI data: the critique→revision loop (Bai et al. 2022, §3.1), and helpfulness samples.

How it follows the paper:

- the model answers each red-team prompt; then, for `rounds` rounds (paper: up to 4), one
  critique/revision principle is drawn at random *with replacement* from the constitution, the
  model critiques its latest answer by that principle's critique request and rewrites the answer
  by the paired revision request; the next round critiques the latest revision;
- the constitution's few-shot critique/revision examples precede the critique and revision
  requests, so the model sees what a critique and a revision look like;
- every intermediate critique and revision is kept in the trace (the SFT stage may train on all
  of them, as the paper did);
- the no-critique ablation (§3.5) goes straight from the answer to the revision request, and its
  few-shot examples drop their critiques likewise;
- helpfulness samples (§3.1: "we also include helpfulness samples") are the model's own answers
  to helpfulness prompts, kept in the same record with no rounds.

Where it departs:

- the conversation is chat-format turns under the model's chat template (user: prompt /
  assistant: answer / user: critique request / assistant: critique / user: revision request /
  assistant: revision) instead of the paper's raw "Human:/Assistant:/CritiqueRequest:/Critique:/
  RevisionRequest:/Revision:" text, because today's instruct models are trained on chat turns;
- the few-shot examples are chat messages before the conversation (`shared_prefix`, encoded once
  by the backend), one six-turn exchange per example, instead of text concatenated in front; the
  initial answer is generated without them, as the helpful model's plain answer;
- principle draws are seeded per (seed, prompt id, round) by a stable hash, so a run is
  reproducible and a resumed run draws the same principles;
- a revision that opens by announcing itself ("Here's a revised response:") loses that first
  line (`strip_preamble`, a documented pattern), so SFT does not learn to announce revisions;
  the reply as written is kept in the round's `raw_revision`.

All prompts of a shard advance step by step together: one batched `generate` call per step
(initial answer, then critique and revision of each round), never one prompt at a time. Output
goes through `ShardedOutput`, so a rerun after a crash resumes from the last finished shard.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from cai_lib.core.config import Seed
from cai_lib.core.constitution import Constitution, CritiqueRevisionPrinciple
from cai_lib.core.conversation import Conversation
from cai_lib.core.errors import CaiError
from cai_lib.core.names import canonical_sha256
from cai_lib.core.prompts import deduplicate
from cai_lib.core.records import PromptRecord, RevisionRound, Trace, stable_id
from cai_lib.core.shards import ShardedOutput
from cai_lib.engines.generation import (
    ENGINE_SIZING,
    BackendName,
    EngineConfig,
    GenerationBackend,
    SamplingParams,
    check_fits,
    load_backend,
)

log = logging.getLogger(__name__)


class GenerationStageConfig(BaseModel):
    """How a generation stage samples and shards its work."""

    model_config = ConfigDict(extra="forbid")

    seed: Seed = Field(default=0, description="Seeds principle draws and sampling; same seed, same rows.")
    max_new_tokens: int = Field(default=256, ge=1, description="Upper bound on tokens per generated turn.")
    temperature: float = Field(
        default=0.0, ge=0.0, description="0 decodes greedily; >0 samples at this temperature."
    )
    batch_size: int = Field(
        default=16,
        ge=1,
        description="Conversations per forward pass inside the backend. Greedy rows do not depend on it; sampled "
        "rows are drawn from the same distribution but not the same random stream. Left out of the output's "
        "identity so that a run may resume with another batch size (e.g. after running out of GPU memory).",
    )
    shard_size: int = Field(
        default=64,
        ge=1,
        description="Prompts per output shard: the unit of resumption and of one batched step. Part of the "
        "output's identity: a resumed run must use the same value.",
    )
    backend: BackendName = Field(
        default="transformers", description="Generation backend: transformers or vllm."
    )
    chat_template: str | None = Field(
        default=None, description="Jinja chat template replacing the model's own (needed when it has none)."
    )
    engine: EngineConfig = Field(
        default_factory=EngineConfig, description="vLLM engine sizing (backend vllm only)."
    )

    def identity(self, stage: type[BaseModel] | None = None) -> dict:
        """The settings that determine a stage's rows, for its output's fingerprint: the fields of
        `stage` (default: this config's class) except batch_size and the engine's sizing, which
        change how rows are computed, not what they are."""
        fields = set((stage or type(self)).model_fields) - {"batch_size"}
        return self.model_dump(include=fields, exclude={"engine": ENGINE_SIZING})

    def sampling(self, step: int) -> SamplingParams:
        """Sampling parameters of one step; the seed varies by step so rounds do not repeat draws."""
        seed = int(stable_id(str(self.seed), str(step)), 16) % 2**31
        return SamplingParams(max_new_tokens=self.max_new_tokens, temperature=self.temperature, seed=seed)


class HelpfulSamplesConfig(GenerationStageConfig):
    """Settings of the helpfulness samples mixed into SFT (paper §3.1: two per prompt, at T = 1)."""

    samples_per_prompt: int = Field(
        default=1,
        ge=1,
        description="Answers sampled per helpfulness prompt, each with its own seed (paper: 2, with temperature "
        "1); with temperature 0 they are all the same answer.",
    )


class CritiqueReviseConfig(GenerationStageConfig):
    """Settings of the critique→revision stage (paper §3.1)."""

    rounds: int = Field(
        default=4,
        ge=1,
        description="Critique→revision rounds per prompt (paper: up to 4); each draws a principle.",
    )
    no_critique: bool = Field(
        default=False, description="Revise directly without a critique (the paper's no-critique ablation)."
    )


def draw_principle(
    principles: Sequence[CritiqueRevisionPrinciple], seed: int, prompt_id: str, round_index: int
) -> CritiqueRevisionPrinciple:
    """The principle of one round: a uniform draw with replacement, fixed by (seed, prompt id, round)."""
    return random.Random(stable_id(str(seed), prompt_id, str(round_index))).choice(list(principles))


def few_shot_messages(constitution: Constitution, no_critique: bool = False) -> Conversation:
    """The constitution's critique/revision examples as chat turns, in the order of a real round."""
    messages: Conversation = []
    for example in constitution.few_shot.critique_revision:
        messages += [_user(example.prompt), _assistant(example.response)]
        if not no_critique:
            messages += [_user(example.critique_request), _assistant(example.critique)]
        messages += [_user(example.revision_request), _assistant(example.revision)]
    return messages


def critique_revise(
    prompts: list[PromptRecord],
    constitution: Constitution,
    model_ref: str,
    out_uri: str,
    config: CritiqueReviseConfig,
    backend: GenerationBackend | None = None,
    output_key: str | None = None,
) -> int:
    """Write one SL-CAI `Trace` per (deduplicated) red-team prompt under `out_uri`; returns the row count.

    Each trace holds the initial answer and `config.rounds` rounds (principle id, critique or None
    in no-critique mode, revision); `final_answer` is the last revision. Rows are stamped with the
    constitution's ref and sha256 and with `model_ref`. `backend` defaults to
    `load_backend(model_ref, config.backend)`. `output_key` (what the pipeline's content key says
    the output is) identifies the output and its rows; without it, they are identified by the
    inputs. Raises `CaiError`, writing nothing, for a constitution without critique/revision
    principles, no prompts, or an `out_uri` that holds results of other inputs.
    """
    if not constitution.critique_revision:
        raise CaiError(f"constitution {constitution.ref}: has no critique/revision principles")
    # The critique/revision section, not the whole document: a version that changes only other
    # sections resumes and reuses these rows (and their ids).
    run = {
        "stage": "critique_revise",
        "constitution_section_sha256": constitution.section_sha256("critique_revision"),
        "model_ref": model_ref,
        "config": config.identity(),
    }
    run = {"output_key": output_key} if output_key else run
    stamp = _stamp(run, model_ref, constitution)

    def make_traces(
        model: GenerationBackend, shard: Sequence[PromptRecord], progress: Progress
    ) -> list[Trace]:
        return _critique_revise_shard(model, shard, constitution, config, progress, stamp)

    return _generate_traces(
        prompts, run, model_ref, out_uri, config, backend, make_traces, "critique→revision"
    )


def sample_helpful(
    prompts: list[PromptRecord],
    model_ref: str,
    out_uri: str,
    config: HelpfulSamplesConfig,
    backend: GenerationBackend | None = None,
    output_key: str | None = None,
) -> int:
    """Write `config.samples_per_prompt` of the model's answers to each (deduplicated) helpfulness
    prompt, each a `Trace` with no rounds; returns the row count.

    `final_answer` equals `initial_answer`; the constitution fields stay empty. Each sample of a
    prompt is drawn with its own seed, batched across the shard. Sharded and resumable like
    `critique_revise`, with the same `output_key` and bad-input errors.
    """
    run = {"stage": "helpful_samples", "model_ref": model_ref, "config": config.identity()}
    run = {"output_key": output_key} if output_key else run
    stamp = _stamp(run, model_ref)

    def make_traces(
        model: GenerationBackend, shard: Sequence[PromptRecord], progress: Progress
    ) -> list[Trace]:
        traces = []
        for sample in range(config.samples_per_prompt):
            progress(f"answer {sample + 1}/{config.samples_per_prompt}")
            answers = _generate(model, [[_user(p.prompt)] for p in shard], config.sampling(sample))
            traces += [stamp(prompt, answer, [], sample) for prompt, answer in zip(shard, answers)]
        return traces

    return _generate_traces(prompts, run, model_ref, out_uri, config, backend, make_traces, "helpful answers")


# -- shared machinery of the two stages ------------------------------------------------------

Progress = Callable[[str], None]
Stamp = Callable[..., Trace]


def _generate_traces(
    prompts: list[PromptRecord],
    run: dict,
    model_ref: str,
    out_uri: str,
    config: GenerationStageConfig,
    backend: GenerationBackend | None,
    make_traces: Callable[[GenerationBackend, Sequence[PromptRecord], Progress], list[Trace]],
    description: str,
) -> int:
    """Check the prompts, open the model, and run `make_traces` shard by shard into `out_uri`."""
    from tqdm.auto import tqdm

    prompts = deduplicate(prompts)
    if not prompts:
        raise CaiError(f"{description}: no prompts given; check the prompt source")
    # The model is opened before the output is claimed, so a model reference that does not
    # resolve leaves nothing behind at `out_uri`.
    model = backend or load_backend(
        model_ref,
        config.backend,
        batch_size=config.batch_size,
        chat_template=config.chat_template,
        engine=config.engine,
    )
    check_fits(model, [(p.id, [{"role": "user", "content": p.prompt}]) for p in prompts], None, description)
    prompt_ids = [p.id for p in prompts]
    # A pipeline output's key already covers its prompts; a CLI output is identified by them.
    inputs = (
        run
        if "output_key" in run
        else {**run, "prompts": {"count": len(prompt_ids), "sha256": canonical_sha256({"ids": prompt_ids})}}
    )
    output = ShardedOutput(out_uri, inputs)
    with tqdm(total=len(prompts), unit="prompt", desc=description) as bar:
        return output.run(
            prompts,
            config.shard_size,
            lambda shard: _log_empty(make_traces(model, shard, bar.set_postfix_str)),
            on_shard=bar.update,
        )


def _critique_revise_shard(
    model: GenerationBackend,
    shard: Sequence[PromptRecord],
    constitution: Constitution,
    config: CritiqueReviseConfig,
    progress: Progress,
    stamp: Stamp,
) -> list[Trace]:
    """Advance every prompt of `shard` through the answer and all rounds, one batched call per step."""
    prefix = few_shot_messages(constitution, config.no_critique) or None
    progress("answer")
    conversations: list[Conversation] = [[_user(p.prompt)] for p in shard]
    answers = _generate(model, conversations, config.sampling(0))
    rounds: list[list[RevisionRound]] = [[] for _ in shard]
    for conversation, answer in zip(conversations, answers):
        conversation.append(_assistant(answer))
    step = 1
    for round_index in range(config.rounds):
        principles = [
            draw_principle(constitution.critique_revision, config.seed, p.id, round_index) for p in shard
        ]
        critiques: list[str | None] = [None] * len(shard)
        if not config.no_critique:
            progress(f"round {round_index + 1}/{config.rounds}: critique")
            critiques = _continue(
                model, conversations, [p.critique_request for p in principles], prefix, config, step
            )
            step += 1
        progress(f"round {round_index + 1}/{config.rounds}: revision")
        revisions = _continue(
            model, conversations, [p.revision_request for p in principles], prefix, config, step
        )
        step += 1
        for trace_rounds, principle, critique, reply in zip(rounds, principles, critiques, revisions):
            revision = strip_preamble(reply)
            trace_rounds.append(
                RevisionRound(
                    principle_id=principle.id,
                    critique=critique,
                    revision=revision,
                    raw_revision=reply if revision != reply else None,
                )
            )
    return [
        stamp(prompt, answer, trace_rounds) for prompt, answer, trace_rounds in zip(shard, answers, rounds)
    ]


# A revision that announces itself: "Here's a revised response:", "Sure! Here is the rewritten
# answer:", "Revised response:". Only a first line of this shape that ends in a colon is taken off.
PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|okay|ok|certainly|of course)[,!.]?\s*)?"
    r"(?:(?:here(?:'s| is)\s+(?:a|the|my|an)?\s*)?(?:revised|rewritten|updated|improved|new|edited)\s+"
    r"(?:version(?:\s+of\s+(?:the|my)\s+(?:response|answer))?|response|answer|reply)"
    r"|here(?:'s| is)\s+(?:a|the|my)\s+(?:revision|rewrite))"
    r"[^:\n]{0,60}:\s*",
    re.IGNORECASE,
)
QUOTES = ('"', "\u201c", "\u201d")


def strip_preamble(reply: str) -> str:
    """The revision without a preamble announcing it (see `PREAMBLE`) and without the quotation
    marks some models put around the rewritten text; the reply itself when there is none, or
    when nothing would be left."""
    match = PREAMBLE.match(reply)
    if not match or not reply[match.end() :].strip():
        return reply
    text = reply[match.end() :].strip()
    if len(text) > 1 and text[0] in QUOTES and text[-1] in QUOTES:
        text = text[1:-1].strip()
    return text or reply


def _continue(
    model: GenerationBackend,
    conversations: list[Conversation],
    requests: list[str],
    prefix: Conversation | None,
    config: GenerationStageConfig,
    step: int,
) -> list[str]:
    """Put one request to each conversation, generate all replies in one call, append them."""
    for conversation, request in zip(conversations, requests):
        conversation.append(_user(request))
    replies = _generate(model, conversations, config.sampling(step), prefix)
    for conversation, reply in zip(conversations, replies):
        conversation.append(_assistant(reply))
    return replies


def _generate(
    model: GenerationBackend,
    conversations: list[Conversation],
    params: SamplingParams,
    prefix: Conversation | None = None,
) -> list[str]:
    # Copies, so a backend that keeps its arguments never sees the conversations grow later.
    replies = model.generate([list(c) for c in conversations], params, shared_prefix=prefix)
    if len(replies) != len(conversations):
        raise RuntimeError(f"backend returned {len(replies)} replies for {len(conversations)} conversations")
    return [reply.strip() for reply in replies]


def _stamp(run: dict, model_ref: str, constitution: Constitution | None = None) -> Stamp:
    """A function that builds a trace with a stable id and the provenance of this run."""
    run_key = canonical_sha256(run)

    def stamp(prompt: PromptRecord, answer: str, rounds: list[RevisionRound], sample: int = 0) -> Trace:
        return Trace(
            id=stable_id(run_key, prompt.id, *([str(sample)] if sample else [])),
            prompt_id=prompt.id,
            prompt=prompt.prompt,
            kind=prompt.kind,
            initial_answer=answer,
            rounds=rounds,
            final_answer=rounds[-1].revision if rounds else answer,
            constitution_ref=constitution.ref if constitution else "",
            constitution_sha256=constitution.sha256 if constitution else "",
            model_ref=model_ref,
        )

    return stamp


def _log_empty(traces: list[Trace]) -> list[Trace]:
    """Log the empty generations of a shard: they are kept (as empty strings) but worth knowing."""
    empty = sum(empty_generations(trace) for trace in traces)
    if empty:
        log.warning("%d empty generation(s) in a shard of %d traces", empty, len(traces))
    return traces


def empty_generations(trace: Trace) -> int:
    """How many generated turns of `trace` (answer, critiques, revisions) are empty strings."""
    turns = [trace.initial_answer] + [
        t for r in trace.rounds for t in (r.critique, r.revision) if t is not None
    ]
    return sum(1 for turn in turns if not turn)


def _user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}
