"""`cai constitution ...` run as a user runs it: the installed console script in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai_lib.core.constitution import load_constitution, parse_constitution

REPO_ROOT = Path(__file__).resolve().parents[1]
CAI = Path(sys.executable).parent / "cai"
SHIPPED = REPO_ROOT / "constitutions" / "harmless" / "1.0.0.yaml"
PAPER = REPO_ROOT / "tests" / "data" / "paper_format"
SMALL = {
    "name": "demo",
    "version": "1.0.0",
    "critique_revision": [
        {"id": "violence", "critique_request": "Is it violent?", "revision_request": "Remove the violence."},
        {
            "id": "privacy",
            "critique_request": "Does it leak data?",
            "revision_request": "Remove private data.",
        },
    ],
}


def cai(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CAI), "constitution", *args],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2 and exactly one line on stderr that contains every fragment."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def write_yaml(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.mark.parametrize("command", ["validate", "list", "show", "diff", "import", "publish", "lock"])
def test_every_command_has_help_with_an_example(command):
    result = cai(command, "--help")
    assert result.returncode == 0
    assert f"Example: cai constitution {command}" in result.stdout


def test_validate_prints_name_version_sha256_and_counts_of_the_shipped_file():
    result = cai("validate", str(SHIPPED))
    assert result.returncode == 0, result.stderr
    harmless = load_constitution(str(SHIPPED))
    assert f"name: harmless\nversion: 1.0.0\nsha256: {harmless.sha256}\n" in result.stdout
    assert f"critique_revision principles: {len(harmless.critique_revision)}\n" in result.stdout
    assert f"comparison principles: {len(harmless.comparison)}\n" in result.stdout
    assert "lock: recorded" in result.stdout


def test_validate_rejects_an_edited_copy_of_a_published_version_naming_the_version(tmp_path):
    root = tmp_path / "constitutions"
    (root / "harmless").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "constitutions" / "constitutions.lock", root / "constitutions.lock")
    edited = SHIPPED.read_text().replace("glorify or help plan violence", "glorify violence")
    (root / "harmless" / "1.0.0.yaml").write_text(edited)
    result = cai("validate", str(root / "harmless" / "1.0.0.yaml"))
    assert_user_error(result, "harmless@1.0.0", "changed", "new version")


def test_validate_names_file_and_line_of_a_yaml_syntax_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: demo\nversion: 1.0.0\ncritique_revision:\n  - id: x\n   critique_request: [\n")
    assert_user_error(cai("validate", str(path)), "broken.yaml: line 5", "YAML syntax error")


def test_validate_names_a_missing_principle_field(tmp_path):
    doc = yaml.safe_load(yaml.safe_dump(SMALL))
    del doc["critique_revision"][0]["critique_request"]
    path = write_yaml(tmp_path / "demo.yaml", doc)
    assert_user_error(
        cai("validate", str(path)), "demo.yaml", "field 'critique_revision.0.critique_request'", "'violence'"
    )


def test_validate_rejects_a_bad_semver(tmp_path):
    path = write_yaml(tmp_path / "demo.yaml", {**SMALL, "version": "1.0"})
    assert_user_error(cai("validate", str(path)), "field 'version'", "'1.0' is not a semantic version")


def test_validate_rejects_an_unknown_ref():
    assert_user_error(
        cai("validate", "harmless@99.0.0"), "unknown constitution ref 'harmless@99.0.0'", "1.0.0"
    )


def test_list_shows_each_version_with_its_hash(tmp_path):
    write_yaml(tmp_path / "demo" / "1.0.0.yaml", SMALL)
    write_yaml(tmp_path / "demo" / "1.1.0.yaml", {**SMALL, "version": "1.1.0"})
    result = cai("list", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    refs = [line.split()[0] for line in result.stdout.splitlines()]
    assert refs == ["demo@1.0.0", "demo@1.1.0"]
    assert load_constitution("demo@1.1.0", tmp_path).sha256[:12] in result.stdout


def test_show_prints_yaml_with_the_same_hash():
    result = cai("show", "harmless@1.0.0")
    assert result.returncode == 0, result.stderr
    harmless = load_constitution("harmless@1.0.0")
    assert result.stdout.startswith(f"# harmless@1.0.0\n# sha256: {harmless.sha256}\n")
    assert parse_constitution(result.stdout, "stdout").sha256 == harmless.sha256


def test_diff_lists_added_removed_and_changed_ids(tmp_path):
    newer = yaml.safe_load(yaml.safe_dump(SMALL))
    newer["version"] = "1.1.0"
    newer["critique_revision"][0]["revision_request"] = "Remove all violence."
    newer["critique_revision"][1] = {
        "id": "crime",
        "critique_request": "Crime?",
        "revision_request": "No crime.",
    }
    write_yaml(tmp_path / "demo" / "1.0.0.yaml", SMALL)
    write_yaml(tmp_path / "demo" / "1.1.0.yaml", newer)
    result = cai("diff", "demo@1.0.0", "demo@1.1.0", env={"CAI_CONSTITUTIONS_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "demo@1.0.0 -> demo@1.1.0",
        "added: crime",
        "removed: privacy",
        "changed: violence",
        "few-shot: unchanged",
    ]


def test_import_of_the_paper_format_writes_a_file_validate_accepts_with_every_id(tmp_path):
    critiques, comparisons = PAPER / "CritiqueRevisionInstructions.json", PAPER / "RLMadisonInstructions.json"
    args = ["--critiques", str(critiques), "--comparisons", str(comparisons)]
    result = cai("import", *args, "--name", "paper", "--version", "1.0.0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    written = tmp_path / "paper" / "1.0.0.yaml"
    validated = cai("validate", str(written))
    assert validated.returncode == 0, validated.stderr
    imported = load_constitution(str(written))
    assert [p.id for p in imported.critique_revision] == [
        "harmful0",
        "harmful3",
        "harmful7",
        "harmful14",
        "harmful15",
    ]
    assert [p.id for p in imported.comparison] == [f"comparison{i}" for i in range(5)]


def test_import_never_overwrites_an_existing_version_with_other_content(tmp_path):
    critiques = str(PAPER / "CritiqueRevisionInstructions.json")
    first = cai(
        "import", "--critiques", critiques, "--name", "paper", "--version", "1.0.0", "--out", str(tmp_path)
    )
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "paper" / "1.0.0.yaml").read_text()
    second = cai(
        "import",
        "--critiques",
        critiques,
        "--comparisons",
        str(PAPER / "RLMadisonInstructions.json"),
        "--name",
        "paper",
        "--version",
        "1.0.0",
        "--out",
        str(tmp_path),
    )
    assert_user_error(second, "paper@1.0.0 is already published with other content")
    assert (tmp_path / "paper" / "1.0.0.yaml").read_text() == before


def test_import_rejects_a_bad_version():
    critiques = str(PAPER / "CritiqueRevisionInstructions.json")
    result = cai("import", "--critiques", critiques, "--name", "paper", "--version", "one", "--out", "unused")
    assert_user_error(result, "field 'version'", "'one' is not a semantic version")


def test_publish_writes_once_and_refuses_other_content(s3_bucket, tmp_path):
    registry = f"s3://{s3_bucket}/constitutions"
    first = cai("publish", "harmless@1.0.0", "--registry", registry)
    assert first.returncode == 0, first.stderr
    assert f"{registry}/harmless/1.0.0.yaml" in first.stdout
    assert cai("publish", "harmless@1.0.0", "--registry", registry).returncode == 0
    other = write_yaml(tmp_path / "harmless.yaml", {**SMALL, "name": "harmless"})
    assert_user_error(
        cai("publish", str(other), "--registry", registry, "--dir", str(tmp_path / "empty")),
        "harmless@1.0.0 is already published with other content",
    )


def test_publish_to_a_missing_bucket_is_a_user_error(s3_env):
    result = cai("publish", "harmless@1.0.0", "--registry", "s3://no-such-bucket-cai/c")
    assert_user_error(result, "bucket 'no-such-bucket-cai' does not exist")


def test_lock_records_new_versions_and_refuses_to_change_one(tmp_path):
    path = write_yaml(tmp_path / "demo" / "1.0.0.yaml", SMALL)
    result = cai("lock", "--dir", str(tmp_path))
    assert (result.returncode, result.stdout.strip()) == (0, "locked demo@1.0.0")
    write_yaml(path, {**SMALL, "description": "edited"})
    assert_user_error(cai("lock", "--dir", str(tmp_path)), "demo@1.0.0", "changed")
