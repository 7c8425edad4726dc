"""The transformers generation backend: batched chat generation and option scoring on CPU or GPU.

Conversations are rendered with the model's chat template, sorted by token length into batches
of `batch_size` (less padding), left-padded, and decoded together, one forward pass a token for
the whole batch; replies come back in the caller's order. The decoding loop is the backend's own
rather than `model.generate`, so that each pass can hand the attention a prefix held once for the
batch (below); greedy replies equal `generate`'s (`tests/test_generation.py`).

Two kinds of key/value (KV) cache reuse spare the model from encoding the same tokens again:

- the shared prefix: a `shared_prefix` (the constitution's few-shot examples, identical for every
  conversation of a call) is encoded once and kept across calls while it stays the same. On a
  CPU (`GROUPED_SDPA` attention) it is held once for the whole batch, and every row's queries
  meet it in one matrix product (`cai_lib.engines.attention`); with any other attention it is
  copied into each row of the batch. It applies only when the rendered prefix is a token prefix
  of every full rendering (a chat template may render the first messages differently depending
  on what follows); otherwise the call runs without it and gives the same results, only slower;
- the conversation history: the KV of every row of the last `generate` call (its prompt and its
  reply) is kept, and a row of the next call that starts with the same tokens, such as the same
  conversation one critique or revision later, reuses it and encodes only its new tokens.

- the stem of a scoring call: rows of one `score_options` call that start with the same tokens
  (the questions about one comparison repeat its conversation, and both answer orders of a
  principle repeat the principle too) have that common start encoded once, and each row encodes
  only the rest after it.

A batch row is laid out as `[prefix | padding | reused tokens | padding | new tokens]` (the prefix
left out where it is held once) with an attention mask that is 0 on padding; position ids follow
the mask's cumulative sum (after the held prefix), so every token sits at the position it has in
the plain rendering and the results equal those without reuse (up to floating-point rounding).

On a CPU the linear layers also get a copy of their weights packed for batched decoding
(`cai_lib.engines.packed_linear`), unless `pack_weights=False`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cai_lib.core.conversation import Conversation
from cai_lib.core.errors import CaiError
from cai_lib.engines.attention import GROUPED_SDPA, SHARED_PREFIX
from cai_lib.engines.chat_format import ChatFormat
from cai_lib.engines.generation import SamplingParams, conversation_seed, one_pass_split, register_backend


@dataclass
class _Encoded:
    """Token ids for one call: the shared prefix (empty when not reused) and each row's rest."""

    prefix: list[int]
    rows: list[list[int]]


@dataclass
class _History:
    """A row of the previous `generate` call: its tokens after the shared prefix and their KV
    cache, one `[kv_heads, tokens, head_dim]` tensor per layer."""

    ids: list[int]
    keys: list
    values: list

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@dataclass
class _Batch:
    """Rows laid out for the model: `input_ids`, `attention_mask` and `position_ids` over every
    column, `cache` already holding the first `start` columns (the prefix when it is laid into
    each row, `prefix_width` columns, then the reused tokens), and `attend`, the forward keywords
    that give the attention the prefix when it is held once for the whole batch."""

    input_ids: object
    attention_mask: object
    position_ids: object
    cache: object
    start: int
    prefix_width: int
    attend: dict


@dataclass
class _Row:
    """One row of a batch: its tokens after the shared prefix, the first `reused` of which have
    their KV in `history`."""

    ids: list[int]
    history: _History | None = None
    reused: int = 0


# Padded tokens per scoring batch (beyond the shared prefix), and the padding a scoring batch may
# hold. Scoring rows vary in length (a comparison question holds two whole answers); one batch
# padded to its longest row wasted more than batching saved (benchmarks/labelling.py: batched
# one-pass scoring 0.6 questions/s against 1.05 one question at a time on 2 CPU cores), so rows
# are batched only with rows of about their length.
SCORING_BATCH_TOKENS = 4096
SCORING_MAX_PADDING = 0.1
# Rows sharing at least this many leading tokens share a stem. Shorter shared starts (the chat
# template's opening, the question's first words) are not worth a forward pass of their own.
MIN_STEM_TOKENS = 32
# Stem tokens whose KV is held at once while their rows are scored: bounds a scoring call's
# memory whatever its size (~1.5 GB for SmolLM2-135M in float32).
STEM_CHUNK_TOKENS = 8 * SCORING_BATCH_TOKENS
# Upper bound on the conversation-history KV kept between calls. At SmolLM2-135M's 46 KB per
# float32 token it holds ~45k tokens, e.g. 64 conversations of 700 tokens.
HISTORY_BUDGET_BYTES = 2 * 1024**3


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _with_history(ids: list[int], histories: Sequence[_History]) -> _Row:
    """`ids` as a batch row reusing the history that shares its longest start; at least one
    token stays new, since generation starts from the last one."""
    best, length = None, 0
    for history in histories:
        common = _common_prefix_length(ids, history.ids)
        if common > length:
            best, length = history, common
    length = min(length, len(ids) - 1)
    return _Row(ids, best, length) if length > 0 else _Row(ids)


def _within_budget(histories: list[_History], budget: int) -> list[_History]:
    kept, used = [], 0
    for history in histories:
        used += history.nbytes()
        if used > budget:
            break
        kept.append(history)
    return kept


def _batches(
    lengths: Sequence[int], batch_size: int, max_tokens: int | None = None, max_padding: float | None = None
) -> Iterator[list[int]]:
    """Row indices grouped by similar length (longest first), at most `batch_size` at a time;
    with `max_tokens`, at most that many tokens once padded to the batch's longest row; with
    `max_padding`, at most that fraction of the padded batch being padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    filled = 0
    for i in order:
        padded = (len(batch) + 1) * lengths[batch[0]] if batch else 0
        if batch and (
            len(batch) == batch_size
            or (max_tokens and padded > max_tokens)
            or (max_padding is not None and padded - filled - lengths[i] > max_padding * padded)
        ):
            yield batch
            batch, filled = [], 0
        batch.append(i)
        filled += lengths[i]
    if batch:
        yield batch


def _stem_groups(rows: Sequence[list[int]], new_tokens: Sequence[int]) -> list[tuple[list[int], int]]:
    """Row indices grouped by a shared start (the stem) of at least `MIN_STEM_TOKENS`, with its
    length; row i keeps at least its last `new_tokens[i]` tokens out of the stem. A row that
    shares no such start with another is a group of its own with a stem of 0."""
    order = sorted(range(len(rows)), key=lambda i: rows[i])
    groups: list[list[int]] = []
    for i in order:
        # In lexicographic order a run's common start is that of its first and its last row.
        if groups and _common_prefix_length(rows[groups[-1][0]], rows[i]) >= MIN_STEM_TOKENS:
            groups[-1].append(i)
        else:
            groups.append([i])
    result = []
    for group in groups:
        shared = _common_prefix_length(rows[group[0]], rows[group[-1]])
        stem = min([shared] + [len(rows[i]) - new_tokens[i] for i in group])
        result.append((group, stem if len(group) > 1 and stem >= MIN_STEM_TOKENS else 0))
    return result


def _chunks(groups: list[tuple[list[int], int]], max_stem_tokens: int) -> Iterator[list[tuple[list[int], int]]]:
    """Consecutive groups whose stems hold at most `max_stem_tokens` together (at least one)."""
    chunk: list[tuple[list[int], int]] = []
    used = 0
    for group in groups:
        if chunk and used + group[1] > max_stem_tokens:
            yield chunk
            chunk, used = [], 0
        chunk.append(group)
        used += group[1]
    if chunk:
        yield chunk


class _RowSampler:
    """Samples each row's next token with that row's own generator (temperature, then nucleus
    `top_p`). One generator per row makes a reply depend on its seed and its conversation only,
    not on the rows batched with it (`torch.multinomial` over a batch draws from one shared
    stream)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, device):
        import torch

        self.generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, scores):
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            ordered, order = probs.sort(dim=-1, descending=True)
            outside = ordered.cumsum(dim=-1) - ordered > self.top_p  # the top token always stays
            probs = probs.scatter(-1, order, ordered.masked_fill(outside, 0.0))
        return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, self.generators)])


@register_backend("transformers")
class TransformersBackend:
    """`GenerationBackend` over a Hugging Face causal LM (see `cai_lib.engines.generation`)."""

    def __init__(
        self,
        model_ref: str,
        batch_size: int = 16,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
        dtype=None,
        device: str | None = None,
        keep_history: bool = True,
        pack_weights: bool = True,
    ):
        """Load `model_ref` (see `cai_lib.engines.models.load_causal_lm` for `dtype` and `device`).

        `keep_history=False` keeps no conversation-history KV between calls: less memory, and
        every call encodes its conversations in full (the shared prefix is still reused).
        `pack_weights` (on a CPU): give the linear layers a second copy of their weights packed
        for batched decoding (`cai_lib.engines.packed_linear`): faster decoding for the memory
        of a second copy of the float32 weights.
        """
        from cai_lib.engines.models import load_causal_lm

        if batch_size < 1:
            raise CaiError(f"batch_size: must be at least 1, got {batch_size}")
        self.model_ref = model_ref
        self.batch_size = batch_size
        self.keep_history = keep_history
        self.model, self.tokenizer = load_causal_lm(
            model_ref,
            trust_remote_code=trust_remote_code,
            dtype=dtype,
            chat_template=chat_template,
            device=device,
        )
        if pack_weights and self.model.device.type == "cpu":
            from cai_lib.engines.packed_linear import pack_linear_layers

            pack_linear_layers(self.model)
        self.chat = ChatFormat(self.tokenizer)
        self.eos_token_ids = self._eos_token_ids()
        self._prefix_key: tuple[int, ...] | None = None
        self._prefix_cache = None
        self._history_prefix: tuple[int, ...] | None = None
        self._histories: list[_History] = []
        self.last_reused_tokens = 0
        """Tokens of the last call not encoded for their row: in `generate`, those whose KV came
        from the call before; in `score_options`, those taken from a stem encoded once for all the
        rows sharing it (a statistic)."""
        self.last_one_pass: list[bool] = []
        """Per context of the last `score_options` call: its options read in one pass."""

    def _eos_token_ids(self) -> list[int]:
        configured = self.model.generation_config.eos_token_id
        ids = configured if isinstance(configured, list) else [configured]
        ids = [i for i in ids if i is not None]
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in ids:
            ids.append(self.tokenizer.eos_token_id)
        return ids

    # -- tokens ------------------------------------------------------------------------------
    def _encode(self, conversations: Sequence[Conversation], shared_prefix: Conversation | None) -> _Encoded:
        prefix_messages = list(shared_prefix or [])
        full = [self.chat.encode(prefix_messages + list(c)) for c in conversations]
        if not prefix_messages:
            return _Encoded([], full)
        prefix = self.chat.encode_text(self.chat.render(prefix_messages, reply_follows=False))
        n = len(prefix)
        if not all(len(ids) > n and ids[:n] == prefix for ids in full):
            return _Encoded([], full)
        return _Encoded(prefix, [ids[n:] for ids in full])

    def reusable_prefix_length(
        self, conversations: Sequence[Conversation], shared_prefix: Conversation | None
    ) -> int:
        """How many tokens of `shared_prefix` a call with these arguments encodes only once
        (0 when the prefix is not a token prefix of every rendering, so it is not reused)."""
        return len(self._encode(conversations, shared_prefix).prefix)

    def _layout(self, rows: Sequence[_Row], prefix: list[int]):
        """input_ids and attention_mask for `[prefix | pad | reused | pad | new]`, one line per row,
        and the width of the reused block."""
        import torch

        reused_width = max(r.reused for r in rows)
        new_width = max(len(r.ids) - r.reused for r in rows)
        pad = self.tokenizer.pad_token_id
        ids, mask = [], []
        for row in rows:
            old, new = row.ids[: row.reused], row.ids[row.reused :]
            old_gap, new_gap = reused_width - len(old), new_width - len(new)
            ids.append(prefix + [pad] * old_gap + old + [pad] * new_gap + new)
            mask.append([1] * len(prefix) + [0] * old_gap + [1] * len(old) + [0] * new_gap + [1] * len(new))
        device = self.model.device
        return torch.tensor(ids, device=device), torch.tensor(mask, device=device), reused_width

    # -- KV caches ---------------------------------------------------------------------------
    def _prefix_kv(self, prefix: list[int]):
        """The prefix's KV cache for one row, computed once per prefix and kept across calls."""
        import torch
        from transformers import DynamicCache

        key = tuple(prefix)
        if self._prefix_key != key:
            self._prefix_cache = None  # free the previous prefix's cache before building this one
            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.model(
                    input_ids=torch.tensor([prefix], device=self.model.device),
                    past_key_values=cache,
                    logits_to_keep=1,  # run for its KV only: no logits over the whole prefix
                )
            self._prefix_key, self._prefix_cache = key, cache
        return self._prefix_cache

    def _batch_cache(self, prefix: list[int], rows: Sequence[_Row], reused_width: int, max_length: int):
        """A preallocated KV cache for the batch, up to `max_length` tokens a row, already holding
        the prefix and each row's reused tokens (laid out as `_layout` does).

        Preallocated (`StaticCache`, written in place) because `DynamicCache` concatenates the
        whole cache at every decoding step: with a ~1000-token few-shot prefix that copy took 61%
        of a CPU decoding step at batch 16.
        """
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=max_length)
        start = len(prefix)
        if start + reused_width == 0:
            return cache
        prefix_layers = self._prefix_kv(prefix).layers if prefix else None
        donor = next((r.history for r in rows if r.reused), None)
        layers = len(prefix_layers) if prefix_layers is not None else len(donor.keys)
        for index in range(layers):
            blocks = []
            for kind in ("keys", "values"):
                like = getattr(prefix_layers[index], kind)[0] if prefix else getattr(donor, kind)[index]
                block = like.new_zeros(len(rows), like.shape[0], start + reused_width, like.shape[-1])
                if prefix:
                    block[:, :, :start] = getattr(prefix_layers[index], kind)
                end = start + reused_width
                for i, row in enumerate(rows):
                    if row.reused:
                        block[i, :, end - row.reused : end] = getattr(row.history, kind)[index][
                            :, : row.reused
                        ]
                blocks.append(block)
            cache.update(blocks[0], blocks[1], index)
        return cache

    def _batch_histories(self, cache, output, attention_mask, prefix_length: int) -> list[_History]:
        """Each row's tokens after the prefix, with their KV, from a batch's finished cache."""
        import torch

        cached = int(cache.get_seq_length())
        extra = cached - attention_mask.shape[1]
        mask = torch.cat([attention_mask, attention_mask.new_ones(len(output), extra)], dim=1)[:, :cached]
        histories = []
        for i in range(len(output)):
            columns = mask[i, prefix_length:].nonzero().squeeze(-1) + prefix_length
            histories.append(
                _History(
                    ids=output[i, columns].tolist(),
                    keys=[layer.keys[i][:, columns] for layer in cache.layers],
                    values=[layer.values[i][:, columns] for layer in cache.layers],
                )
            )
        return histories

    # -- the interface -----------------------------------------------------------------------
    def generate(
        self,
        conversations: Sequence[Conversation],
        params: SamplingParams,
        shared_prefix: Conversation | None = None,
    ) -> list[str]:
        """One reply per conversation, in order. Greedy when `params.temperature` is 0; otherwise
        each conversation is sampled with its own generator, seeded by `conversation_seed` (the
        global torch RNG is left untouched), so a conversation's reply is the same whatever it is
        batched with."""
        import torch

        if not conversations:
            return []
        encoded = self._encode(conversations, shared_prefix)
        earlier = self._histories if self._history_prefix == tuple(encoded.prefix) else []
        rows = [_with_history(ids, earlier) for ids in encoded.rows]
        seeds = [conversation_seed(params.seed, c, shared_prefix) for c in conversations]
        self.last_reused_tokens = sum(r.reused for r in rows)
        replies: list[str] = [""] * len(rows)
        histories: list[_History] = []
        with torch.inference_mode():
            for batch in _batches([len(r.ids) for r in rows], self.batch_size):
                batch_replies, batch_histories = self._generate_batch(
                    encoded.prefix, [rows[i] for i in batch], params, [seeds[i] for i in batch]
                )
                for index, reply in zip(batch, batch_replies):
                    replies[index] = reply
                histories += batch_histories
        self._history_prefix = tuple(encoded.prefix)
        self._histories = _within_budget(histories, HISTORY_BUDGET_BYTES) if self.keep_history else []
        return replies

    def _generate_batch(
        self, prefix: list[int], rows: list[_Row], params: SamplingParams, seeds: list[int]
    ) -> tuple[list[str], list[_History]]:
        import torch

        batch = self._prepare(rows, prefix, extra_tokens=params.max_new_tokens)
        sampler = None
        if params.temperature > 0:
            sampler = _RowSampler(seeds, params.temperature, params.top_p, self.model.device)
        new_tokens = self._decode(batch, params.max_new_tokens, sampler)
        replies = [self._decode_reply(row.tolist()) for row in new_tokens]
        output = torch.cat([batch.input_ids, new_tokens], dim=1)
        return replies, self._batch_histories(batch.cache, output, batch.attention_mask, batch.prefix_width)

    def _decode(self, batch: _Batch, max_new_tokens: int, sampler: _RowSampler | None):
        """Up to `max_new_tokens` new tokens per row of `batch` (`[rows, steps]`): each step's
        most likely token, or `sampler`'s pick. A row that has produced an EOS token gets padding
        after it, and decoding stops once every row has, as `model.generate` does; the decoding
        follows these arguments only (no other setting of the checkpoint's generation config)."""
        import torch

        eos = torch.tensor(self.eos_token_ids, device=self.model.device)
        ids = batch.input_ids[:, batch.start :]
        positions = batch.position_ids[:, batch.start :]
        mask = batch.attention_mask
        finished = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        steps = []
        for _ in range(max_new_tokens):
            logits = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=batch.cache,
                logits_to_keep=1,
                **batch.attend,
            ).logits[:, -1].float()
            token = sampler(logits) if sampler else logits.argmax(dim=-1)
            token = token.masked_fill(finished, self.tokenizer.pad_token_id)
            steps.append(token)
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
            ids, positions = token[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], dim=1)
        return torch.stack(steps, dim=1)

    def _decode_reply(self, new_tokens: list[int]) -> str:
        for position, token in enumerate(new_tokens):
            if token in self.eos_token_ids:
                new_tokens = new_tokens[:position]
                break
        return self.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()

    def score_options(
        self,
        contexts: Sequence[Conversation],
        options: Sequence[Sequence[str]],
        shared_prefix: Conversation | None = None,
    ) -> list[list[float]]:
        """For each context, the summed log-probability of each option's tokens (see
        `ChatFormat.option_ids`) right after the context's rendering. Options that are shared
        leading tokens plus one distinct last token each (`one_pass_split`) are read from one row:
        the context and the leading tokens, whose last next-token distribution gives every
        option's last token; other options take one row each. `last_one_pass` records which."""
        import torch

        if len(contexts) != len(options):
            raise ValueError(f"score_options: {len(contexts)} contexts but {len(options)} option lists")
        encoded = self._encode(contexts, shared_prefix)
        prefix_messages = list(shared_prefix or [])
        rows, tails, nexts, owners = [], [], [], []
        self.last_one_pass = []
        for i, opts in enumerate(options):
            option_ids = [self.chat.option_ids(prefix_messages + list(contexts[i]), o) for o in opts]
            split = one_pass_split(option_ids)
            self.last_one_pass.append(split is not None)
            # One pass: a row ending in the shared tokens, read at its last position for each option.
            pieces = [(split[0], split[1])] if split else [(ids, []) for ids in option_ids]
            for tail, next_tokens in pieces:
                rows.append(_Row(encoded.rows[i] + tail))
                tails.append(len(tail))
                nexts.append(next_tokens)
                owners.append(i)
        scores: list[list[float]] = [[] for _ in rows]
        # Positions that predict a scored token must be encoded, not taken from a stem.
        groups = _stem_groups([r.ids for r in rows], [tail + 1 for tail in tails])
        self.last_reused_tokens = 0
        with torch.inference_mode():
            for chunk in _chunks(groups, STEM_CHUNK_TOKENS):
                indices = [k for group, _ in chunk for k in group]
                members = self._rows_on_stems(encoded.prefix, rows, chunk)
                self.last_reused_tokens += sum(r.reused for r in members)
                for batch in self._scoring_batches([len(r.ids) - r.reused for r in members]):
                    batch_scores = self._score_batch(
                        [members[j] for j in batch],
                        [tails[indices[j]] for j in batch],
                        [nexts[indices[j]] for j in batch],
                        encoded.prefix,
                    )
                    for j, score in zip(batch, batch_scores):
                        scores[indices[j]] = score
        result: list[list[float]] = [[] for _ in contexts]
        for owner, score in zip(owners, scores):
            result[owner] += score
        return result

    def _rows_on_stems(self, prefix: list[int], rows: list[_Row], chunk: list[tuple[list[int], int]]) -> list[_Row]:
        """The rows of `chunk`'s groups, group by group, each reusing its group's stem, whose KV is
        encoded here once per group."""
        stems = [rows[group[0]].ids[:stem] for group, stem in chunk if stem]
        histories = iter(self._encode_stems(prefix, stems))
        members = []
        for group, stem in chunk:
            history = next(histories) if stem else None
            members += [_Row(rows[k].ids, history, stem) for k in group]
        return members

    def _encode_stems(self, prefix: list[int], stems: list[list[int]]) -> list[_History]:
        """Each stem's KV after the prefix, from batched forward passes over the stems."""
        histories: list[_History] = [None] * len(stems)  # type: ignore[list-item]
        for batch in self._scoring_batches([len(stem) for stem in stems]):
            batch_rows = [_Row(stems[i]) for i in batch]
            _, laid_out = self._forward(batch_rows, prefix, logits_to_keep=1)
            batch_histories = self._batch_histories(
                laid_out.cache, laid_out.input_ids, laid_out.attention_mask, laid_out.prefix_width
            )
            for i, history in zip(batch, batch_histories):
                histories[i] = history
        return histories

    def _scoring_batches(self, lengths: Sequence[int]) -> Iterator[list[int]]:
        return _batches(lengths, self.batch_size, SCORING_BATCH_TOKENS, SCORING_MAX_PADDING)

    def _prepare(self, rows: Sequence[_Row], prefix: list[int], extra_tokens: int = 0) -> _Batch:
        """`rows` laid out as `_layout` does, with a cache that holds their reused tokens and room
        for `extra_tokens` more a row. The prefix is held once for the batch where the model's
        attention takes it (`GROUPED_SDPA`, on a CPU), and otherwise copied into every row."""
        held_once = bool(prefix) and self.model.config._attn_implementation == GROUPED_SDPA
        laid = [] if held_once else prefix
        input_ids, attention_mask, reused_width = self._layout(rows, laid)
        # Each token at the position it has in the plain rendering, the held prefix included.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) + (len(prefix) if held_once else 0)
        cache = self._batch_cache(laid, rows, reused_width, input_ids.shape[1] + extra_tokens)
        attend = {SHARED_PREFIX: self._prefix_kv(prefix)} if held_once else {}
        return _Batch(input_ids, attention_mask, position_ids, cache, len(laid) + reused_width, len(laid), attend)

    def _forward(self, rows: list[_Row], prefix: list[int], logits_to_keep: int):
        """One forward pass over `rows`, encoding only their new tokens: the logits of the last
        `logits_to_keep` positions, and the batch (its cache now filled)."""
        batch = self._prepare(rows, prefix)
        logits = self.model(
            input_ids=batch.input_ids[:, batch.start :],
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids[:, batch.start :],
            past_key_values=batch.cache,
            logits_to_keep=logits_to_keep,
            **batch.attend,
        ).logits
        return logits, batch

    def _score_batch(
        self, rows: list[_Row], tails: list[int], nexts: list[list[int]], prefix: list[int]
    ) -> list[list[float]]:
        """Per row: the summed log-probability of its last `tails` tokens, plus that of each of its
        `nexts` tokens after the row when it has any (one score per next token), else alone."""
        import torch

        # Rows end together (left padding), so only the last `keep` positions predict tail tokens
        # and, at the very last, the next token.
        keep = max(tails) + 1
        logits, batch = self._forward(rows, prefix, logits_to_keep=keep)
        input_ids = batch.input_ids
        logits = logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        targets = input_ids[:, -(keep - 1) :] if keep > 1 else input_ids[:, :0]
        token_scores = log_probs[:, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        scores = []
        for row, (tail, next_tokens) in enumerate(zip(tails, nexts)):
            base = float(token_scores[row, token_scores.shape[1] - tail :].sum()) if tail else 0.0
            scores.append(
                [base + float(log_probs[row, -1, t]) for t in next_tokens] if next_tokens else [base]
            )
        return scores
