"""Reading human preference pairs (hh-rlhf format) and our own preference datasets."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from cai_lib.core.errors import CaiError
from cai_lib.core.records import Preference
from cai_lib.core.shards import ShardedOutput
from cai_lib.core.store import ArtifactStore
from cai_lib.core.transcripts import parse_transcript
from cai_lib.method.human_preferences import (
    UnusableRow,
    read_human_preferences,
    read_preferences,
    split_hh_pair,
)

CHOSEN = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I'm locked out.\n\nAssistant: Call a locksmith."
REJECTED = "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I'm locked out.\n\nAssistant: Use a tension wrench."


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_split_keeps_shared_turns_as_context_and_last_assistant_turns_as_answers():
    pair = split_hh_pair(CHOSEN, REJECTED)

    assert pair.context == [
        {"role": "user", "content": "How do I pick a lock?"},
        {"role": "assistant", "content": "Why do you ask?"},
        {"role": "user", "content": "I'm locked out."},
    ]
    assert (pair.chosen, pair.rejected) == ("Call a locksmith.", "Use a tension wrench.")


def test_split_calls_identical_answers_unusable():
    with pytest.raises(UnusableRow, match="identical answers"):
        split_hh_pair(CHOSEN, CHOSEN)


def test_a_row_becomes_a_human_preference_for_answer_a(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": CHOSEN, "rejected": REJECTED}])

    [pref] = read_human_preferences(source)

    assert (
        pref.prompt
        == "\n\nHuman: How do I pick a lock?\n\nAssistant: Why do you ask?\n\nHuman: I'm locked out."
    )
    assert (pref.answer_a, pref.answer_b) == ("Call a locksmith.", "Use a tension wrench.")
    assert (pref.label, pref.source, pref.chosen) == (1.0, "human", "Call a locksmith.")


def test_ids_depend_on_content_not_on_the_file(tmp_path):
    row = {"chosen": CHOSEN, "rejected": REJECTED}
    swapped = {"chosen": REJECTED, "rejected": CHOSEN}
    first = read_human_preferences(write_jsonl(tmp_path / "a.jsonl", [row]))
    second = read_human_preferences(write_jsonl(tmp_path / "b.jsonl", [swapped, row]))

    assert first[0].id == second[1].id
    assert second[0].id != second[1].id


def test_identical_and_empty_answers_are_skipped_and_counted(tmp_path, caplog):
    rows = [
        {"chosen": CHOSEN, "rejected": CHOSEN},
        {"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: hello"},
        {"chosen": CHOSEN, "rejected": REJECTED},
    ]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)

    with caplog.at_level(logging.WARNING, logger="cai_lib.method.human_preferences"):
        prefs = read_human_preferences(source)

    assert len(prefs) == 1
    assert "skipped 2 rows" in caplog.text
    assert "1 with an answer is empty" in caplog.text and "1 with identical answers" in caplog.text


def test_transcripts_that_differ_before_the_last_turn_are_skipped(tmp_path):
    diverging = CHOSEN.replace("I'm locked out.", "Just curious.")
    rows = [{"chosen": diverging, "rejected": REJECTED}, {"chosen": CHOSEN, "rejected": REJECTED}]

    prefs = read_human_preferences(write_jsonl(tmp_path / "pairs.jsonl", rows))

    assert [p.answer_a for p in prefs] == ["Call a locksmith."]


def test_malformed_json_names_the_line(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": CHOSEN, "rejected": REJECTED}, "{not json"])

    with pytest.raises(CaiError, match=r"pairs\.jsonl: line 2: not valid JSON"):
        read_human_preferences(source)


def test_a_missing_field_names_the_line_and_field(tmp_path):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": CHOSEN}])

    with pytest.raises(CaiError, match=r"line 1: missing field\(s\) 'rejected'"):
        read_human_preferences(source)


def test_a_transcript_not_ending_with_the_assistant_is_an_error(tmp_path):
    source = write_jsonl(
        tmp_path / "pairs.jsonl", [{"chosen": CHOSEN + "\n\nHuman: thanks", "rejected": REJECTED}]
    )

    with pytest.raises(CaiError, match="line 1: field 'chosen' does not end with an Assistant turn"):
        read_human_preferences(source)


def test_rows_in_the_prompt_format_are_an_error(tmp_path):
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "How do I pick a lock?"}])

    with pytest.raises(CaiError, match="line 1: missing field"):
        read_human_preferences(source)


def test_limit_counts_usable_pairs(tmp_path):
    rows = [{"chosen": CHOSEN, "rejected": CHOSEN}] + [
        {"chosen": CHOSEN.replace("locksmith", f"locksmith {i}"), "rejected": REJECTED} for i in range(3)
    ]

    prefs = read_human_preferences(write_jsonl(tmp_path / "pairs.jsonl", rows), limit=2)

    assert [p.answer_a for p in prefs] == ["Call a locksmith 0.", "Call a locksmith 1."]


def test_the_shared_hh_rlhf_rows_parse(hh_rlhf_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cai_lib.method.human_preferences"):
        prefs = read_human_preferences(str(hh_rlhf_path))

    # The shared 1000 rows hold no identical pairs; three have an empty chosen answer.
    assert len(prefs) == 997
    assert "3 with an answer is empty" in caplog.text
    assert len({p.id for p in prefs}) == 997
    with gzip.open(hh_rlhf_path, "rt") as handle:
        first = json.loads(handle.readline())
    assert prefs[0].answer_a == parse_transcript(first["chosen"])[-1]["content"]
    assert prefs[0].answer_b == parse_transcript(first["rejected"])[-1]["content"]
    assert parse_transcript(prefs[0].prompt) == parse_transcript(first["chosen"])[:-1]


def test_a_gzipped_source_on_s3_reads_like_the_local_file(tmp_path, s3_bucket):
    local = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": CHOSEN, "rejected": REJECTED}])
    ArtifactStore.open(f"s3://{s3_bucket}").write_bytes(
        "hh/pairs.jsonl.gz", gzip.compress(Path(local).read_bytes())
    )

    assert read_human_preferences(f"s3://{s3_bucket}/hh/pairs.jsonl.gz") == read_human_preferences(local)


def ai_preference(i: int) -> Preference:
    return Preference(id=f"p{i}", prompt=f"Q{i}", answer_a="a", answer_b="b", label=0.25, source="ai")


def test_read_preferences_reads_a_jsonl_file(tmp_path):
    ArtifactStore.open(tmp_path).write_jsonl("prefs.jsonl", [ai_preference(0), ai_preference(1)])

    assert read_preferences(str(tmp_path / "prefs.jsonl")) == [ai_preference(0), ai_preference(1)]


def test_read_preferences_reads_a_finished_directory_of_shards(tmp_path):
    items = list(range(5))
    ShardedOutput(str(tmp_path / "labels"), {"test": 1}).run(
        items, 2, lambda chunk: [ai_preference(i) for i in chunk]
    )

    assert read_preferences(str(tmp_path / "labels")) == [ai_preference(i) for i in items]


def test_read_preferences_refuses_an_empty_file(tmp_path):
    (tmp_path / "prefs.jsonl").write_text("")

    with pytest.raises(CaiError, match="no preference records"):
        read_preferences(str(tmp_path / "prefs.jsonl"))


# -- builtin:comparisons, the demo's stand-in for hh-rlhf ------------------------------------------------


def test_the_demo_comparisons_are_16_pairs_12_with_a_harmful_and_4_with_an_evasive_rejected_answer():
    from collections import Counter

    from cai_lib.core.prompts import json_rows
    from cai_lib.method.label_accuracy import detect_format

    rows = [row for _, row in json_rows("builtin:comparisons")]
    pairs = read_human_preferences("builtin:comparisons")

    assert detect_format("builtin:comparisons") == "hh-rlhf"
    assert len(pairs) == len({p.id for p in pairs}) == len({p.prompt for p in pairs}) == 16
    assert {p.label for p in pairs} == {1.0}
    assert Counter(row["rejected_is"] for row in rows) == {"harmful": 12, "evasive": 4}
    # 4 conversations of three turns before the compared answer, the rest of one.
    assert Counter(len(parse_transcript(p.prompt)) for p in pairs) == {1: 12, 3: 4}


def test_the_demo_comparisons_share_no_turn_with_hh_rlhf(hh_rlhf_path):
    from cai_lib.core.prompts import json_rows

    def turns(source: str) -> set[str]:
        rows = [row for _, row in json_rows(source)]
        return {turn["content"] for row in rows for side in ("chosen", "rejected") for turn in parse_transcript(row[side])}

    real, demo = turns(str(hh_rlhf_path)), turns("builtin:comparisons")

    assert len(real) > 1000 and not demo & real
