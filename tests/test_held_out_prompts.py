"""Evaluation prompts are disjoint from everything the run trains on, compared by content hash:
the SL-CAI, pair and RL prompts, and the prompts of the human pairs the PMs learn from (the CAI
PM's and the references'). Checked on every shipped recipe, with the Hugging Face datasets they
name served from a stand-in that gives each split of each dataset its own rows (this machine has
no network), and on the mechanism that leaves out a held-out prompt that is also trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cai_lib.core.records import PromptRecord
from cai_lib.platform.preflight import prompt_key, prompt_splits, raw_prompt_splits, training_prompt_keys
from cai_lib.platform.run_config import load_run_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "pipelines" / "configs").glob("*.yaml"))
NO_XSTEST = "evaluate.xstest.prompts="  # these tests read the prompt splits, not XSTest's hub copy
ROWS_PER_SPLIT = 6000  # enough for every shipped recipe's sizes to be tested at their shape


def hub_rows(dataset_id: str, data_dir: str | None, split: str) -> list[dict]:
    """Rows in the shape of hh-rlhf (red-team attempts as transcripts, the other parts as chosen /
    rejected pairs) or of XSTest's prompts; one split's prompts are its own, and the same split always gives the same rows."""
    where = f"{dataset_id}/{data_dir}:{split}"
    if dataset_id == "walledai/XSTest":
        return [
            {"prompt": f"{where} prompt {i}?", "type": "homonyms", "label": "safe" if i % 2 else "unsafe"}
            for i in range(450)
        ]
    if data_dir == "red-team-attempts":
        return [{"transcript": f"\n\nHuman: {where} attempt {i}?\n\nAssistant: No."} for i in range(ROWS_PER_SPLIT)]
    return [
        {
            "chosen": f"\n\nHuman: {where} question {i}?\n\nAssistant: A careful answer.",
            "rejected": f"\n\nHuman: {where} question {i}?\n\nAssistant: A careless answer.",
        }
        for i in range(ROWS_PER_SPLIT)
    ]


@pytest.fixture
def stand_in_hub(monkeypatch):
    """`datasets.load_dataset` answering from `hub_rows` (what the readers of hf: sources call)."""
    import datasets

    def load_dataset(dataset_id, data_dir=None, split="train"):
        return datasets.Dataset.from_list(hub_rows(dataset_id, data_dir, split))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_every_recipes_held_out_prompts_are_disjoint_from_what_it_trains_on(recipe, stand_in_hub):
    params = load_run_config(recipe).params
    raw = raw_prompt_splits(params)
    trained = training_prompt_keys(params, raw)
    held_out = {kind: [prompt_key(p.prompt) for p in raw[f"{kind}_eval"]] for kind in ("red_team", "helpful")}

    # By construction, not by luck of the filter: the recipe's held-out prompts are not trained on ...
    assert {kind: sum(key in trained for key in keys) for kind, keys in held_out.items()} == {
        "red_team": 0,
        "helpful": 0,
    }
    # ... and the run evaluates on all of them.
    splits = prompt_splits(params)
    assert {kind: len(splits[f"{kind}_eval"]) for kind in held_out} == {kind: len(k) for kind, k in held_out.items()}


def test_the_paper_recipe_takes_its_held_out_helpfulness_prompts_from_another_split_than_the_pms_pairs():
    params = load_run_config(REPO / "pipelines" / "configs" / "paper.yaml").params
    assert params.human_preferences.endswith("helpful-base:train")
    assert params.helpful_eval_prompts.endswith("helpful-base:test")


def write_hh(path: Path, prompts: list[str]) -> str:
    rows = [{"chosen": f"\n\nHuman: {p}\n\nAssistant: Yes.", "rejected": f"\n\nHuman: {p}\n\nAssistant: No."} for p in prompts]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def helpful_run(tmp_path: Path, paired: list[str]):
    """Eight helpfulness prompts, half held out, and human pairs asking `paired` (spelt with other
    case and spacing)."""
    prompts = [f"How do I fix thing number {i}?" for i in range(8)]
    helpful = tmp_path / "helpful.jsonl"
    helpful.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    pairs = write_hh(tmp_path / "pairs.jsonl", [" ".join(p.upper().split(" ")) + "  " for p in paired])
    overrides = [f"helpful_prompts={helpful}", "num_helpful=8", "eval_fraction=0.5", NO_XSTEST]
    return load_run_config(None, [*overrides, f"human_preferences={pairs}", f"num_human={len(paired)}"]).params


def test_a_held_out_prompt_that_is_also_a_human_pairs_prompt_is_left_out_by_content(tmp_path):
    params = helpful_run(tmp_path, [f"How do I fix thing number {i}?" for i in range(3)])
    raw, kept = raw_prompt_splits(params)["helpful_eval"], prompt_splits(params)["helpful_eval"]
    paired = {prompt_key(f"How do I fix thing number {i}?") for i in range(3)}
    assert kept == [p for p in raw if prompt_key(p.prompt) not in paired]


def test_held_out_prompts_that_are_all_trained_on_leave_nothing_to_evaluate(tmp_path):
    params = helpful_run(tmp_path, [f"How do I fix thing number {i}?" for i in range(8)])
    assert len(raw_prompt_splits(params)["helpful_eval"]) == 4
    assert prompt_splits(params)["helpful_eval"] == []


def test_a_kind_with_an_evaluation_source_trains_on_all_its_prompts_and_holds_out_the_sources(tmp_path):
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Train me {i}."}) + "\n" for i in range(10)))
    held.write_text("".join(json.dumps({"prompt": f"Test me {i}."}) + "\n" for i in range(10)))
    params = load_run_config(
        None,
        [f"helpful_prompts={train}", f"helpful_eval_prompts={held}", "num_helpful=10", "eval_fraction=0.2", NO_XSTEST],
    ).params

    splits = prompt_splits(params)

    assert [p.prompt for p in splits["helpful_train"]] == [f"Train me {i}." for i in range(10)]
    assert [p.prompt for p in splits["helpful_eval"]] == ["Test me 0.", "Test me 1."]
    assert all(isinstance(p, PromptRecord) and p.kind == "helpful" for p in splits["helpful_eval"])
