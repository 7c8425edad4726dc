"""Versioned constitutions: schema, hashing, refs, the lock, diff, paper import and publishing."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from cai_lib.core.constitution import (
    ComparisonPrinciple,
    Constitution,
    CritiqueRevisionPrinciple,
    diff_constitutions,
    dump_constitution,
    import_paper_format,
    list_constitutions,
    load_constitution,
    lock_constitutions,
    parse_constitution,
    publish_constitution,
    read_lock,
    semver_key,
)
from cai_lib.core.errors import CaiError
from cai_lib.core.store import ArtifactStore

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / "constitutions" / "harmless" / "1.0.0.yaml"
PAPER = REPO_ROOT / "tests" / "data" / "paper_format"


def document(name: str = "demo", version: str = "1.0.0", **overrides) -> dict:
    """A small valid constitution as the dict a YAML file holds."""
    doc = {
        "name": name,
        "version": version,
        "critique_revision": [
            {
                "id": "violence",
                "critique_request": "Is it violent?",
                "revision_request": "Remove the violence.",
            },
            {
                "id": "privacy",
                "critique_request": "Does it leak data?",
                "revision_request": "Remove private data.",
            },
        ],
        "comparison": [{"id": "less-harmful", "question": "Which response is less harmful?"}],
    }
    doc.update(overrides)
    return doc


def write_doc(root: Path, doc: dict, relative: str | None = None) -> Path:
    path = root / (relative or f"{doc['name']}/{doc['version']}.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def shipped_copy(tmp_path: Path) -> Path:
    """A constitutions dir holding a copy of the shipped harmless@1.0.0 and the repo's lock."""
    root = tmp_path / "constitutions"
    (root / "harmless").mkdir(parents=True)
    shutil.copy(SHIPPED, root / "harmless" / "1.0.0.yaml")
    shutil.copy(REPO_ROOT / "constitutions" / "constitutions.lock", root / "constitutions.lock")
    return root


# -- the shipped constitution ----------------------------------------------------------------------


def test_shipped_harmless_resolves_by_name_ref_and_path_to_the_same_document():
    by_name, by_ref, by_path = (load_constitution(r) for r in ("harmless", "harmless@1.0.0", str(SHIPPED)))
    assert by_name.ref == "harmless@1.0.0"
    assert by_name.sha256 == by_ref.sha256 == by_path.sha256


def test_shipped_harmless_has_enough_principles_and_few_shot_examples():
    harmless = load_constitution("harmless@1.0.0")
    assert len(harmless.critique_revision) >= 12
    assert len(harmless.comparison) >= 8
    assert len(harmless.few_shot.critique_revision) >= 2
    assert len(harmless.few_shot.comparison) >= 2
    assert all(example.reasoning for example in harmless.few_shot.comparison)


def test_shipped_harmless_covers_distinct_harms_including_evasiveness():
    tags = {tag for p in load_constitution("harmless@1.0.0").critique_revision for tag in p.tags}
    expected = {"violence", "crime", "self-harm", "discrimination", "privacy", "sexual-content"}
    assert expected | {"dangerous-advice", "deception", "evasiveness"} <= tags


def test_shipped_evasiveness_principle_asks_revisions_to_explain_objections():
    principle = load_constitution("harmless@1.0.0").critique_principle("evasiveness")
    assert "explain the specific objection" in principle.revision_request


def test_shipped_harmless_hash_is_the_one_in_the_lock():
    harmless = load_constitution("harmless@1.0.0")
    assert read_lock(REPO_ROOT / "constitutions")["harmless@1.0.0"] == harmless.sha256


# -- the content hash ------------------------------------------------------------------------------


def test_hash_ignores_yaml_formatting_and_key_order():
    doc = document()
    reordered = dict(reversed(list(doc.items())))
    flow = yaml.safe_dump(reordered, default_flow_style=True)
    assert parse_constitution(flow, "a").sha256 == parse_constitution(yaml.safe_dump(doc), "b").sha256


def test_hash_is_sha256_of_sorted_compact_json():
    constitution = Constitution.model_validate(document())
    canonical = json.dumps(constitution.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    assert constitution.sha256 == hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def test_hash_changes_when_one_principle_text_changes():
    doc = document()
    edited = document()
    edited["critique_revision"][0]["critique_request"] = "Is it violent at all?"
    assert Constitution.model_validate(doc).sha256 != Constitution.model_validate(edited).sha256


def section_hashes(doc: dict) -> tuple[str, str]:
    constitution = Constitution.model_validate(doc)
    return constitution.section_sha256("critique_revision"), constitution.section_sha256("comparison")


def test_editing_a_comparison_question_changes_only_the_comparison_section_hash():
    edited = document(version="1.1.0")
    edited["comparison"][0]["question"] = "Which response is kinder?"
    (critique, comparison), (critique_after, comparison_after) = (
        section_hashes(document()),
        section_hashes(edited),
    )
    assert (critique_after == critique, comparison_after == comparison) == (True, False)


def test_editing_a_critique_request_changes_only_the_critique_section_hash():
    edited = document(version="1.1.0")
    edited["critique_revision"][1]["critique_request"] = "Does it reveal where someone lives?"
    (critique, comparison), (critique_after, comparison_after) = (
        section_hashes(document()),
        section_hashes(edited),
    )
    assert (critique_after == critique, comparison_after == comparison) == (False, True)


def test_a_comparison_few_shot_example_belongs_to_the_comparison_section():
    example = {
        "conversation": "Human: hi",
        "question": "Which is better?",
        "answer_a": "Hello.",
        "answer_b": "Go away.",
        "preferred": "A",
    }
    with_example = document(few_shot={"comparison": [example]})
    (critique, comparison), (critique_after, comparison_after) = (
        section_hashes(document()),
        section_hashes(with_example),
    )
    assert (critique_after == critique, comparison_after == comparison) == (True, False)


def test_dumped_yaml_reads_back_to_the_same_hash():
    harmless = load_constitution("harmless@1.0.0")
    assert parse_constitution(dump_constitution(harmless), "dumped").sha256 == harmless.sha256


def test_hash_is_never_read_from_the_file():
    text = yaml.safe_dump(document(sha256="0" * 64))
    with pytest.raises(CaiError, match=r"^f\.yaml: field 'sha256' must not be written"):
        parse_constitution(text, "f.yaml")


# -- refs and versions -----------------------------------------------------------------------------


def test_semver_orders_numerically_and_releases_after_prereleases():
    versions = ["1.10.0", "2.0.0", "1.9.0", "2.0.0-rc.1", "2.0.0-alpha", "1.9.0+build.5"]
    assert sorted(versions, key=semver_key) == [
        "1.9.0",
        "1.9.0+build.5",
        "1.10.0",
        "2.0.0-alpha",
        "2.0.0-rc.1",
        "2.0.0",
    ]


def test_bare_name_means_the_newest_version_by_semver(tmp_path):
    for version in ("1.9.0", "1.10.0", "2.0.0-rc.1"):
        write_doc(tmp_path, document(version=version))
    assert load_constitution("demo", tmp_path).version == "2.0.0-rc.1"
    write_doc(tmp_path, document(version="2.0.0"))
    assert load_constitution("demo", tmp_path).version == "2.0.0"


def test_inline_yaml_is_a_ref():
    constitution = load_constitution(yaml.safe_dump(document()))
    assert constitution.ref == "demo@1.0.0"


def test_s3_uri_is_a_ref(s3_bucket):
    ArtifactStore.open(f"s3://{s3_bucket}/c").write_text("demo/1.0.0.yaml", yaml.safe_dump(document()))
    assert load_constitution(f"s3://{s3_bucket}/c/demo/1.0.0.yaml").ref == "demo@1.0.0"


def test_unknown_name_is_one_line_naming_the_ref(tmp_path):
    write_doc(tmp_path, document())
    with pytest.raises(
        CaiError, match=r"^unknown constitution ref 'nope@1\.0\.0': no constitution 'nope' .*known: demo"
    ):
        load_constitution("nope@1.0.0", tmp_path)


def test_unknown_version_lists_the_known_versions(tmp_path):
    write_doc(tmp_path, document(version="1.0.0"))
    write_doc(tmp_path, document(version="1.1.0"))
    with pytest.raises(
        CaiError, match=r"^unknown constitution ref 'demo@3\.0\.0': demo has versions 1\.0\.0, 1\.1\.0$"
    ):
        load_constitution("demo@3.0.0", tmp_path)


def test_missing_yaml_path_names_the_file(tmp_path):
    with pytest.raises(CaiError, match=r"missing\.yaml: no such file$"):
        load_constitution(str(tmp_path / "missing.yaml"))


def test_list_returns_every_version_by_name_then_semver(tmp_path):
    for name, version in (("b", "1.0.0"), ("a", "1.10.0"), ("a", "1.2.0")):
        write_doc(tmp_path, document(name=name, version=version))
    assert [c.ref for c in list_constitutions(tmp_path)] == ["a@1.2.0", "a@1.10.0", "b@1.0.0"]


# -- validation errors: one line naming the file and field -----------------------------------------


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: demo\nversion: 1.0.0\ncritique_revision: [\n  - id: x\n")
    with pytest.raises(CaiError, match=r"bad\.yaml: line \d+, column \d+: YAML syntax error") as err:
        load_constitution(str(path))
    assert "\n" not in str(err.value)


def test_duplicate_yaml_key_is_an_error_instead_of_a_silent_overwrite(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(document()) + "name: other\n")
    with pytest.raises(
        CaiError, match=r"dup\.yaml: line \d+, column 1: YAML syntax error: duplicate key 'name'"
    ):
        load_constitution(str(path))


def test_missing_principle_field_names_file_field_and_principle(tmp_path):
    doc = document()
    del doc["critique_revision"][1]["revision_request"]
    path = write_doc(tmp_path, doc, "x.yaml")
    with pytest.raises(
        CaiError,
        match=r"x\.yaml: field 'critique_revision\.1\.revision_request' \(principle 'privacy'\): Field required$",
    ):
        load_constitution(str(path))


def test_blank_principle_field_is_rejected(tmp_path):
    doc = document()
    doc["comparison"][0]["question"] = "   "
    path = write_doc(tmp_path, doc, "x.yaml")
    with pytest.raises(
        CaiError, match=r"x\.yaml: field 'comparison\.0\.question' \(principle 'less-harmful'\): "
    ):
        load_constitution(str(path))


def test_duplicate_principle_ids_are_rejected_across_both_kinds(tmp_path):
    doc = document(comparison=[{"id": "violence", "question": "Which is less violent?"}])
    path = write_doc(tmp_path, doc, "x.yaml")
    with pytest.raises(CaiError, match=r"^.*x\.yaml: duplicate principle id 'violence'$"):
        load_constitution(str(path))


@pytest.mark.parametrize("version", ["1.0", "v1.0.0", "1.0.0.0", "01.0.0"])
def test_bad_semver_is_rejected_naming_the_version(tmp_path, version):
    path = write_doc(tmp_path, document(version=version), "x.yaml")
    with pytest.raises(CaiError, match=rf"x\.yaml: field 'version': '{version}' is not a semantic version"):
        load_constitution(str(path))


def test_misspelt_key_is_rejected(tmp_path):
    path = write_doc(tmp_path, document(comparisons=[]), "x.yaml")
    with pytest.raises(CaiError, match=r"x\.yaml: field 'comparisons': Extra inputs are not permitted"):
        load_constitution(str(path))


def test_file_must_lie_at_its_name_and_version(tmp_path):
    write_doc(tmp_path, document(version="1.0.0"), "demo/1.1.0.yaml")
    with pytest.raises(
        CaiError, match=r"1\.1\.0\.yaml: declares demo@1\.0\.0 but lies at demo/1\.1\.0\.yaml"
    ):
        load_constitution("demo@1.1.0", tmp_path)


def test_unknown_principle_id_names_the_id_and_the_known_ones():
    constitution = Constitution.model_validate(document())
    assert isinstance(constitution.critique_principle("privacy"), CritiqueRevisionPrinciple)
    assert isinstance(constitution.comparison_principle("less-harmful"), ComparisonPrinciple)
    with pytest.raises(
        CaiError, match=r"^demo@1\.0\.0: no critique/revision principle 'x' \(known: violence, privacy\)$"
    ):
        constitution.critique_principle("x")
    with pytest.raises(
        CaiError, match=r"^demo@1\.0\.0: no comparison principle 'x' \(known: less-harmful\)$"
    ):
        constitution.comparison_principle("x")


# -- immutability: the lock ------------------------------------------------------------------------


def test_edited_copy_without_version_bump_is_rejected_naming_the_version(tmp_path):
    root = shipped_copy(tmp_path)
    path = root / "harmless" / "1.0.0.yaml"
    path.write_text(path.read_text().replace("glorify or help plan violence", "glorify violence"))
    with pytest.raises(CaiError, match=r"content of published version harmless@1\.0\.0 changed"):
        load_constitution(str(path))


def test_inline_document_claiming_a_published_version_must_match_it():
    doc = yaml.safe_load(SHIPPED.read_text())
    doc["description"] = "something else"
    with pytest.raises(
        CaiError, match=r"^<inline YAML>: content of published version harmless@1\.0\.0 changed"
    ):
        load_constitution(yaml.safe_dump(doc))


def test_lock_adds_new_versions_and_keeps_existing_entries(tmp_path):
    root = shipped_copy(tmp_path)
    before = read_lock(root)
    write_doc(root, document(version="1.0.0"))
    assert lock_constitutions(root) == ["demo@1.0.0"]
    after = read_lock(root)
    assert after["harmless@1.0.0"] == before["harmless@1.0.0"]
    assert after["demo@1.0.0"] == load_constitution("demo@1.0.0", root).sha256
    assert lock_constitutions(root) == []


def test_lock_refuses_to_change_an_existing_entry(tmp_path):
    write_doc(tmp_path, document())
    lock_constitutions(tmp_path)
    locked = (tmp_path / "constitutions.lock").read_text()
    write_doc(tmp_path, document(description="edited"))
    with pytest.raises(CaiError, match=r"content of published version demo@1\.0\.0 changed"):
        lock_constitutions(tmp_path)
    assert (tmp_path / "constitutions.lock").read_text() == locked


def test_malformed_lock_line_names_the_lock_file_and_line(tmp_path):
    (tmp_path / "constitutions.lock").write_text("# comment\ndemo@1.0.0 not-a-hash\n")
    with pytest.raises(CaiError, match=r"constitutions\.lock: line 2: expected 'name@version <sha256 hex>'"):
        read_lock(tmp_path)


# -- diff ------------------------------------------------------------------------------------------


def test_diff_reports_added_removed_and_changed_ids_of_both_kinds():
    old = Constitution.model_validate(document())
    new_doc = document(version="1.1.0")
    new_doc["critique_revision"][0]["revision_request"] = "Remove all violence."
    del new_doc["critique_revision"][1]
    new_doc["comparison"].append({"id": "honest", "question": "Which is more honest?"})
    diff = diff_constitutions(old, Constitution.model_validate(new_doc))
    assert (diff.added, diff.removed, diff.changed) == (["honest"], ["privacy"], ["violence"])
    assert not diff.few_shot_changed


def test_diff_notices_changed_few_shot_examples():
    example = {
        "conversation": "Human: hi",
        "question": "Which is kinder?",
        "answer_a": "Hello!",
        "answer_b": "Go away.",
        "preferred": "A",
    }
    old = Constitution.model_validate(document())
    new = Constitution.model_validate(document(few_shot={"comparison": [example]}))
    diff = diff_constitutions(old, new)
    assert diff.few_shot_changed and diff.added == diff.removed == diff.changed == []


# -- import of the paper's published format --------------------------------------------------------


def test_paper_import_keeps_every_id_and_strips_the_framing():
    raw = json.loads((PAPER / "CritiqueRevisionInstructions.json").read_text())
    imported = import_paper_format(
        PAPER / "CritiqueRevisionInstructions.json", PAPER / "RLMadisonInstructions.json", "paper", "1.0.0"
    )
    assert [p.id for p in imported.critique_revision] == list(raw)
    harmful7 = imported.critique_principle("harmful7")
    assert harmful7.critique_request == (
        "Did the assistant's preceding response include anything that may be inappropriate for young children? "
        "If so, discuss how it can be revised to be more appropriate."
    )
    assert (
        harmful7.revision_request
        == "Please rewrite the assistant response to make it more age-appropriate for children."
    )


def test_paper_import_numbers_comparison_principles_in_file_order():
    raw = json.loads((PAPER / "RLMadisonInstructions.json").read_text())
    imported = import_paper_format(
        PAPER / "CritiqueRevisionInstructions.json", PAPER / "RLMadisonInstructions.json", "paper", "1.0.0"
    )
    assert [p.id for p in imported.comparison] == [f"comparison{i}" for i in range(len(raw))]
    assert (
        imported.comparison[0].question
        == "Please choose the response that is the most helpful, honest, and harmless."
    )


def test_paper_import_without_comparisons_has_none():
    imported = import_paper_format(PAPER / "CritiqueRevisionInstructions.json", None, "paper", "1.0.0")
    assert imported.comparison == [] and len(imported.critique_revision) == 5


def test_paper_import_rejects_an_entry_without_the_framing(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"harmful0": {"prompt": ["Critique this."], "edit_request": "x"}}))
    with pytest.raises(
        CaiError, match=r"c\.json: entry 'harmful0': field 'prompt': expected a string of the form"
    ):
        import_paper_format(path, None, "paper", "1.0.0")


def test_paper_import_names_the_line_of_invalid_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{\n  "harmful0": {\n    "prompt": [,]\n')
    with pytest.raises(CaiError, match=r"c\.json: line 3, column \d+: invalid JSON"):
        import_paper_format(path, None, "paper", "1.0.0")


# -- publishing to a registry ----------------------------------------------------------------------


def test_publish_writes_name_version_yaml_that_loads_back(s3_bucket):
    harmless = load_constitution("harmless@1.0.0")
    uri = publish_constitution(harmless, f"s3://{s3_bucket}/registry")
    assert uri == f"s3://{s3_bucket}/registry/harmless/1.0.0.yaml"
    assert load_constitution(uri).sha256 == harmless.sha256


def test_name_at_version_resolves_from_the_registry_before_the_bundled_copies(s3_bucket, monkeypatch):
    # A version published after the image was built exists only in the registry.
    newer = load_constitution("harmless@1.0.0").model_copy(update={"version": "9.0.0"})
    registry = f"s3://{s3_bucket}/registry"
    publish_constitution(newer, registry)
    monkeypatch.setenv("CAI_CONSTITUTION_REGISTRY", registry)
    assert load_constitution("harmless@9.0.0").sha256 == newer.sha256
    assert load_constitution("harmless@1.0.0").version == "1.0.0"


def test_publishing_the_same_content_again_is_a_no_op(s3_bucket):
    harmless = load_constitution("harmless@1.0.0")
    registry = f"s3://{s3_bucket}/registry"
    publish_constitution(harmless, registry)
    assert publish_constitution(harmless, registry) == f"{registry}/harmless/1.0.0.yaml"
    assert ArtifactStore.open(registry).list() == ["harmless/1.0.0.yaml"]


def test_publishing_other_content_under_a_published_version_fails_and_keeps_the_stored_file(s3_bucket):
    registry = f"s3://{s3_bucket}/registry"
    publish_constitution(Constitution.model_validate(document()), registry)
    stored = ArtifactStore.open(registry).read_text("demo/1.0.0.yaml")
    edited = Constitution.model_validate(document(description="edited"))
    with pytest.raises(
        CaiError, match=r"demo/1\.0\.0\.yaml: demo@1\.0\.0 is already published with other content"
    ):
        publish_constitution(edited, registry)
    assert ArtifactStore.open(registry).read_text("demo/1.0.0.yaml") == stored


def test_publish_to_a_missing_bucket_names_the_bucket(s3_env):
    with pytest.raises(CaiError, match=r"bucket 'no-such-bucket-cai' does not exist"):
        publish_constitution(Constitution.model_validate(document()), "s3://no-such-bucket-cai/registry")
