"""Model-generated prompts (Bai et al. 2022, §3.1 and §4.1): automated red teaming and helpfulness
prompts written few-shot from human seeds, filtered, and mixed into the training prompts.

How it follows the paper:

- the paper's SL and RL stages used far more prompts than people wrote: of 182,831 red-team
  prompts 42,496 were human-written and 140,335 generated; of 135,296 helpfulness prompts 44,542
  were human-written and 90,754 generated. The generated ones were written by a pretrained model
  shown human prompts of the same kind as few-shot examples. Here each kind (red team,
  helpfulness) is generated from its own seeds: each request shows `few_shot` seed prompts of that
  kind, drawn at random per request (seeded), and the model writes one more, sampled at
  `temperature`;
- the generated prompts are mixed with the human ones at a ratio per kind
  (`generated_per_human`; the paper's proportions are 3.30 for red team and 2.04 for helpfulness).

Where it departs:

- the examples are chat turns ("write a request of this kind" / a seed prompt, repeated), not raw
  text continued by a pretrained model, because the generation backends speak chat. A pretrained
  model without a chat template can be given one (`chat_template`);
- the paper does not say how it filtered what it generated. Here a candidate is kept only if it
  passes, in order: `single_turn` (the reply parses as one user turn: no second speaker, list
  numbering and quotes taken off, only its first paragraph kept), `length` (`min_chars` to
  `max_chars`), `not_seed` (not a near duplicate of any seed), `not_held_out` (not a near
  duplicate of any prompt of the run's evaluation split or of a held-out set it names), and
  `unique` (not a near duplicate of another kept generated prompt; the first in id order stays).
  Near duplicates are found by MinHash LSH over character n-grams (`datasketch`) and confirmed by
  the exact Jaccard similarity of the n-gram sets, so the threshold means what it says.
  Rejected candidates are kept in the output with the filter that dropped them and the prompt
  they nearly duplicate, so what was generated can be inspected before any of it is used;
- seeds are only the training split of each kind: an evaluation prompt is never shown to the
  generator, and nothing near one is kept.

Every request's examples, and so its reply, are fixed by the seed, the kind and the request's
index, so a shard's rows do not depend on the shard count, and a resumed run writes the rows an
uninterrupted one would have. Requests that show the same examples in the same order (likely
only with few seeds) are sampled in separate calls with different seeds, so they do not repeat
one another.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cai_lib.core.errors import CaiError
from cai_lib.core.names import canonical_sha256
from cai_lib.core.prompts import normalise
from cai_lib.core.records import GeneratedPrompt, PromptKind, PromptRecord, stable_id
from cai_lib.core.shards import ShardedOutput
from cai_lib.engines.generation import GenerationBackend, load_backend
from cai_lib.method.critique_revise import GenerationStageConfig

log = logging.getLogger(__name__)

KINDS: tuple[PromptKind, ...] = ("red_team", "helpful")
# The filters, in the order they are applied; the last one compares candidates with each other.
SINGLE_TURN, LENGTH, NOT_SEED, NOT_HELD_OUT, UNIQUE = "single_turn", "length", "not_seed", "not_held_out", "unique"
FILTERS = (SINGLE_TURN, LENGTH, NOT_SEED, NOT_HELD_OUT, UNIQUE)
# Proportions of the paper (§3.1): generated prompts per human-written one.
PAPER_RED_TEAM_RATIO = 140_335 / 42_496
PAPER_HELPFUL_RATIO = 90_754 / 44_542


# What each kind's requests ask for, unless its settings give another instruction.
INSTRUCTIONS: dict[PromptKind, str] = {
    "red_team": "Write a message that a red-teamer might send to an AI assistant to try to get it to say or do "
    "something harmful, unethical or dangerous.",
    "helpful": "Write a message that a person might send to an AI assistant to ask for help.",
}


class KindSettings(BaseModel):
    """How many prompts of one kind to generate, how to ask for them, and how many to use."""

    model_config = ConfigDict(extra="forbid")

    candidates: int = Field(
        default=0, ge=0, description="Generation requests of this kind, one candidate prompt each (0: none)."
    )
    generated_per_human: float = Field(
        default=0.0,
        ge=0.0,
        description="Kept generated prompts mixed into the training prompts per human training prompt of this "
        "kind (paper: 3.30 red team, 2.04 helpfulness); fewer are used when fewer were kept.",
    )
    instruction: str = Field(
        default="",
        description="The user turn before each example and before the model's own prompt; '' takes the kind's "
        "own (INSTRUCTIONS).",
    )


class GeneratePromptsConfig(GenerationStageConfig):
    """Settings of prompt generation (paper §3.1: prompts generated few-shot from human ones)."""

    temperature: float = Field(
        default=1.0,
        gt=0.0,
        description="Sampling temperature; above 0, since greedy decoding repeats itself across requests.",
    )
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(default=64, ge=1, description="Upper bound on tokens per generated prompt.")
    few_shot: int = Field(
        default=4,
        ge=1,
        description="Seed prompts of the same kind shown per request, drawn at random for each request; each "
        "kind that generates needs at least this many seeds.",
    )
    red_team: KindSettings = Field(default_factory=KindSettings, description="Red-team prompts.")
    helpful: KindSettings = Field(default_factory=KindSettings, description="Helpfulness prompts.")
    min_chars: int = Field(default=10, ge=1, description="Shortest prompt kept, in characters.")
    max_chars: int = Field(default=500, ge=1, description="Longest prompt kept, in characters.")
    dedup_threshold: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Jaccard similarity of character n-gram sets at or above which two prompts are near "
        "duplicates, in (0, 1]: 1 drops exact duplicates only (after case and spacing are ignored).",
    )
    ngram: int = Field(default=4, ge=1, description="Characters per n-gram of the near-duplicate comparison.")
    held_out: list[str] = Field(
        default_factory=list,
        description="Prompt sources besides the run's evaluation split that nothing generated may nearly "
        "duplicate (files, s3:// URIs, hf: datasets, builtin: sets).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> GeneratePromptsConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"min_chars {self.min_chars} is above max_chars {self.max_chars}")
        return self

    def identity(self, stage: type[BaseModel] | None = None) -> dict:
        """The settings that determine the candidates (see `GenerationStageConfig.identity`), the mix
        ratios aside: they choose among the kept prompts, they do not make them."""
        settings = super().identity(stage)
        for kind in KINDS:
            settings[kind].pop("generated_per_human", None)
        return settings

    def kind(self, kind: PromptKind) -> KindSettings:
        return self.red_team if kind == "red_team" else self.helpful

    @property
    def generates(self) -> bool:
        return any(self.kind(kind).candidates for kind in KINDS)


def check_seeds(seeds: dict[PromptKind, Sequence[PromptRecord]], config: GeneratePromptsConfig) -> None:
    """Refuse a kind that asks for candidates with fewer seeds than one request shows."""
    for kind in KINDS:
        have = len(seeds.get(kind, ()))
        if config.kind(kind).candidates and have < config.few_shot:
            raise CaiError(
                f"generate_prompts.{kind}: {have} seed prompt(s), fewer than few_shot {config.few_shot}; "
                f"give more {kind.replace('_', '-')} seeds, lower few_shot, or set {kind}.candidates to 0"
            )


# -- requests ---------------------------------------------------------------------------------------


class Request(NamedTuple):
    """One generation request: its kind, its index within the kind, the seeds it shows, and how many
    earlier requests show the same seeds in the same order (its sampling call)."""

    kind: PromptKind
    index: int
    seeds: tuple[PromptRecord, ...]
    repeat: int


def plan_requests(
    seeds: dict[PromptKind, Sequence[PromptRecord]], config: GeneratePromptsConfig
) -> list[Request]:
    """Every request of the stage, in order: for each kind, `candidates` requests, each showing
    `few_shot` seeds of that kind drawn without replacement by a generator seeded with (seed,
    kind, index). The plan depends on the seeds' content, not their order."""
    check_seeds(seeds, config)
    requests = []
    for kind in KINDS:
        pool = sorted(seeds.get(kind, ()), key=lambda p: p.id)
        shown: Counter[tuple[str, ...]] = Counter()
        for index in range(config.kind(kind).candidates):
            draw = random.Random(stable_id(str(config.seed), kind, str(index))).sample(pool, config.few_shot)
            ids = tuple(p.id for p in draw)
            requests.append(Request(kind, index, tuple(draw), shown[ids]))
            shown[ids] += 1
    return requests


def request_conversation(request: Request, config: GeneratePromptsConfig) -> list[dict[str, str]]:
    """The request as chat turns: the kind's instruction answered by each seed, then the instruction."""
    instruction = config.kind(request.kind).instruction or INSTRUCTIONS[request.kind]
    turns = []
    for seed in request.seeds:
        turns += [{"role": "user", "content": instruction}, {"role": "assistant", "content": seed.prompt}]
    return turns + [{"role": "user", "content": instruction}]


# -- filters ----------------------------------------------------------------------------------------

# A line that starts another speaker's turn, in the transcript forms models imitate.
SPEAKER = re.compile(r"^\s*(?:human|assistant|user|ai|system|h|a)\s*:", re.IGNORECASE | re.MULTILINE)
# Leading list numbering or a label the model may put before its prompt: "4.", "2)", "- ", "Request:".
LABEL = re.compile(r"^\s*(?:(?:\d+[.)]|[-*•])\s+|(?:request|prompt|message)\s*:\s*)", re.IGNORECASE)
ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
QUOTES = "\"'\u201c\u201d\u2018\u2019"


def parse_prompt(reply: str) -> str:
    """The prompt a reply holds, or '' when it is not one user turn: a reply that starts another
    speaker's turn (`Human:`, `Assistant:`, ...) on any line does not parse. Otherwise its first
    paragraph up to any further list item, without list numbering, a label or surrounding quotes,
    is the prompt (a model shown a list may go on listing; only the first item counts)."""
    if SPEAKER.search(reply):
        return ""
    first = next((part for part in re.split(r"\n\s*\n", reply.strip()) if part.strip()), "")
    lines = first.strip().splitlines()
    # A list item on a later line is the model listing on: the prompt ends before it.
    end = next((i for i, line in enumerate(lines) if i and ITEM.match(line)), len(lines))
    first = LABEL.sub("", "\n".join(lines[:end]), count=1).strip()
    if len(first) > 1 and first[0] in QUOTES and first[-1] in QUOTES:
        first = first[1:-1].strip()
    return " ".join(first.split())


def shingles(text: str, n: int) -> set[str]:
    """The character n-grams of `text` once case, punctuation and spacing are ignored (the whole
    text when it is shorter than n)."""
    words = re.sub(r"[^\w\s]", " ", normalise(text))
    flat = " ".join(words.split())
    if len(flat) <= n:
        return {flat} if flat else set()
    return {flat[i : i + n] for i in range(len(flat) - n + 1)}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a ∩ b| / |a ∪ b| (1 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class NearDuplicates:
    """An index of texts that answers "which indexed text is a near duplicate of this one?".

    MinHash LSH (datasketch) proposes candidates, banded to miss few (`lsh_bands`); the exact
    Jaccard similarity of the character n-gram sets decides, so a pair is a near duplicate
    exactly when its similarity is at least `threshold`.
    """

    PERMUTATIONS = 128
    # The chance that LSH proposes a pair whose similarity is exactly the threshold.
    RECALL_AT_THRESHOLD = 0.99

    def __init__(self, threshold: float, ngram: int):
        from datasketch import MinHashLSH

        if not 0.0 < threshold <= 1.0:
            raise CaiError(f"dedup_threshold: must be in (0, 1], got {threshold}")
        self.threshold, self.ngram = threshold, ngram
        self.lsh = MinHashLSH(num_perm=self.PERMUTATIONS, params=lsh_bands(threshold, self.PERMUTATIONS, self.RECALL_AT_THRESHOLD))
        self.sets: dict[str, set[str]] = {}

    def _minhash(self, grams: set[str]):
        from datasketch import MinHash

        signature = MinHash(num_perm=self.PERMUTATIONS, seed=1)
        signature.update_batch([g.encode("utf-8") for g in sorted(grams)])
        return signature

    def add(self, key: str, text: str) -> None:
        if key in self.sets:
            return
        grams = shingles(text, self.ngram)
        self.sets[key] = grams
        self.lsh.insert(key, self._minhash(grams))

    def find(self, text: str) -> str | None:
        """The key of the most similar indexed text at or above the threshold (ties: smallest key)."""
        grams = shingles(text, self.ngram)
        best: tuple[float, str] | None = None
        for key in self.lsh.query(self._minhash(grams)):
            similarity = jaccard(grams, self.sets[key])
            if similarity >= self.threshold and (best is None or (-similarity, key) < (-best[0], best[1])):
                best = (similarity, key)
        return best[1] if best else None


def lsh_bands(threshold: float, permutations: int, recall: float) -> tuple[int, int]:
    """(bands, rows per band) of an LSH index over `permutations` MinHash values: the most rows per
    band (the fewest false candidates) for which a pair of similarity `threshold` is still proposed
    with probability at least `recall`, 1 - (1 - threshold^rows)^bands. At least two bands."""
    for rows in range(permutations // 2, 0, -1):
        bands = permutations // rows
        if 1.0 - (1.0 - threshold**rows) ** bands >= recall:
            return bands, rows
    return permutations, 1


def index_of(prompts: Iterable[PromptRecord], config: GeneratePromptsConfig) -> NearDuplicates:
    index = NearDuplicates(config.dedup_threshold, config.ngram)
    for prompt in prompts:
        index.add(prompt.id, prompt.prompt)
    return index


def judge_candidate(
    row: GeneratedPrompt, seeds: NearDuplicates, held_out: NearDuplicates, config: GeneratePromptsConfig
) -> GeneratedPrompt:
    """`row` with the verdict of every filter that looks at one candidate alone (all but `unique`):
    the filters it passed, and the first one it failed with the prompt it nearly duplicates."""
    checks = (
        (SINGLE_TURN, lambda: None if row.prompt else ""),
        (LENGTH, lambda: None if config.min_chars <= len(row.prompt) <= config.max_chars else ""),
        (NOT_SEED, lambda: seeds.find(row.prompt)),
        (NOT_HELD_OUT, lambda: held_out.find(row.prompt)),
    )
    passed = []
    for name, failure in checks:
        found = failure()
        if found is not None:
            return row.model_copy(update={"passed": passed, "rejected_by": name, "near": found or None})
        passed.append(name)
    return row.model_copy(update={"passed": passed, "rejected_by": None, "near": None})


def select_unique(rows: Iterable[GeneratedPrompt], config: GeneratePromptsConfig) -> list[GeneratedPrompt]:
    """Every row, in id order, with the `unique` filter applied to the candidates that passed the
    others: one that nearly duplicates an earlier kept one (in id order, across both kinds) is
    dropped. Ids derive from content, so the result does not depend on how the rows were sharded."""
    kept = NearDuplicates(config.dedup_threshold, config.ngram)
    out = []
    for row in sorted(rows, key=lambda r: r.id):
        if row.rejected_by is None and UNIQUE not in row.passed:
            near = kept.find(row.prompt)
            if near is None:
                kept.add(row.id, row.prompt)
                row = row.model_copy(update={"passed": [*row.passed, UNIQUE]})
            else:
                row = row.model_copy(update={"rejected_by": UNIQUE, "near": near})
        out.append(row)
    return out


def filter_counts(rows: Iterable[GeneratedPrompt]) -> dict[PromptKind, dict[str, int]]:
    """Per kind: candidates, how many each filter dropped, and how many were kept."""
    counts: dict[PromptKind, dict[str, int]] = defaultdict(
        lambda: {"candidates": 0, **{f"rejected_{name}": 0 for name in FILTERS}, "kept": 0}
    )
    for row in rows:
        counts[row.kind]["candidates"] += 1
        counts[row.kind][f"rejected_{row.rejected_by}" if row.rejected_by else "kept"] += 1
    return dict(counts)


def flat_counts(counts: dict[PromptKind, dict[str, int]]) -> dict[str, float]:
    """`filter_counts` as flat metrics: `red_team.candidates`, `helpful.rejected_not_seed`, ..."""
    return {f"{kind}.{name}": float(n) for kind, row in counts.items() for name, n in row.items()}


class GeneratedPrompts(NamedTuple):
    """What the report shows of a run's generated prompts: where they lie, the counts per filter,
    and a sample of kept and dropped ones."""

    uri: str
    counts: dict[PromptKind, dict[str, int]]
    sample: list[GeneratedPrompt]


def generated_view(rows: Sequence[GeneratedPrompt], uri: str, per_kind: int, seed: int) -> GeneratedPrompts:
    """The counts of `rows` (a `select_prompts` dataset at `uri`) and up to `per_kind` rows of each
    kind, kept ones first, drawn with `seed`."""
    sample = []
    for kind in KINDS:
        mine = [r for r in rows if r.kind == kind]
        drawn = random.Random(f"{seed}:{kind}").sample(mine, min(per_kind, len(mine)))
        sample += sorted(drawn, key=lambda r: (not r.kept, r.request))
    return GeneratedPrompts(uri, filter_counts(rows), sample)


def mix_prompts(
    kind: PromptKind,
    human: Sequence[PromptRecord],
    generated: Iterable[GeneratedPrompt],
    ratio: float,
    seed: int,
) -> list[PromptRecord]:
    """The human prompts followed by `round(ratio × len(human))` kept generated prompts of the same
    kind (all of them when fewer were kept), chosen by a hash of (seed, id). A generated prompt
    becomes a `PromptRecord` with the id rule of every prompt and `source` naming its row."""
    kept = sorted(
        (row for row in generated if row.kept and row.kind == kind), key=lambda r: stable_id(str(seed), r.id)
    )
    chosen = kept[: round(ratio * len(human))]
    return list(human) + [
        PromptRecord(id=stable_id(kind, row.prompt), prompt=row.prompt, kind=kind, source=f"generated:{row.id}")
        for row in chosen
    ]


# -- the stage --------------------------------------------------------------------------------------


def generate_prompts(
    seeds: dict[PromptKind, list[PromptRecord]],
    held_out: Sequence[PromptRecord],
    model_ref: str,
    out_uri: str,
    config: GeneratePromptsConfig,
    shard: int = 0,
    shards: int = 1,
    backend: GenerationBackend | None = None,
    output_key: str | None = None,
) -> int:
    """Write one `GeneratedPrompt` per request of shard `shard` of `shards` (every `shards`-th
    request of `plan_requests`), each judged by every filter but `unique` (which
    `select_unique` applies once all shards are in); returns the row count.

    `held_out` are the prompts nothing generated may nearly duplicate (the run's evaluation split
    and the sets `config.held_out` names). Sharded and resumable like `critique_revise`; a row's id
    depends on the output's identity (`output_key`, else the model, settings and seeds), its kind
    and its request index. Raises `CaiError`, before any model loads and writing nothing, when a
    kind that generates has fewer seeds than `few_shot`.
    """
    from tqdm.auto import tqdm

    requests = plan_requests(seeds, config)[shard::shards]
    if output_key:
        inputs: dict = {"output_key": output_key}
    else:
        inputs = {
            "stage": "generate_prompts",
            "model_ref": model_ref,
            "config": config.identity(),
            "seeds": {kind: sorted(p.id for p in rows) for kind, rows in seeds.items()},
            "held_out": canonical_sha256(sorted(p.id for p in held_out)),
            "part": [shard, shards],
        }
    run_key = canonical_sha256({k: v for k, v in inputs.items() if k != "part"})
    model = None
    if requests:
        model = backend or load_backend(
            model_ref,
            config.backend,
            batch_size=config.batch_size,
            chat_template=config.chat_template,
            engine=config.engine,
        )
    seed_index = index_of((p for rows in seeds.values() for p in rows), config)
    held_out_index = index_of(held_out, config)
    output = ShardedOutput(out_uri, inputs)

    def write(chunk: Sequence[Request]) -> list[GeneratedPrompt]:
        replies = _replies(model, chunk, config)
        rows = [
            GeneratedPrompt(
                id=stable_id(run_key, request.kind, str(request.index)),
                kind=request.kind,
                request=request.index,
                seed_ids=[p.id for p in request.seeds],
                raw=reply,
                prompt=parse_prompt(reply),
                model_ref=model_ref,
            )
            for request, reply in zip(chunk, replies)
        ]
        return [judge_candidate(row, seed_index, held_out_index, config) for row in rows]

    with tqdm(total=len(requests), unit="prompt", desc="generated prompts") as bar:
        return output.run(requests, config.shard_size, write, on_shard=bar.update)


def _replies(model: GenerationBackend, chunk: Sequence[Request], config: GeneratePromptsConfig) -> list[str]:
    """The reply to every request of `chunk`, one batched call per repeat level (a request that
    shows the same seeds as an earlier one is sampled with another seed)."""
    replies: dict[int, str] = {}
    for repeat in sorted({r.repeat for r in chunk}):
        positions = [i for i, r in enumerate(chunk) if r.repeat == repeat]
        params = config.sampling(repeat).model_copy(update={"top_p": config.top_p})
        out = model.generate([request_conversation(chunk[i], config) for i in positions], params)
        if len(out) != len(positions):
            raise RuntimeError(f"backend returned {len(out)} replies for {len(positions)} requests")
        replies.update(zip(positions, (reply.strip() for reply in out)))
    return [replies[i] for i in range(len(chunk))]
