"""Versioned constitutions: the only human oversight in Constitutional AI (Bai et al. 2022).

A constitution is a YAML file `constitutions/<name>/<version>.yaml` holding

- `critique_revision` principles (paper §3.1, Appendix C): a critique request and the paired
  revision request; SL-CAI draws one at random per round;
- `comparison` principles (paper §4.1, Appendix C): the multiple-choice question the feedback
  model is asked when it labels a pair of responses;
- few-shot examples that precede both kinds of prompt (paper §3.1, §4.1).

Its identity is `name@version` plus a sha256 of a canonical form (the sorted-key compact JSON of
the validated document), computed and never written in the file. A published version is
immutable: `constitutions/constitutions.lock` records the hash of each published version, and a
document that claims a recorded `name@version` with other content is rejected, whatever its
source. `cai constitution lock` adds new versions to the lock and never changes an entry.

The paper's authors published their principles as JSON (`CritiqueRevisionInstructions.json`,
`RLMadisonInstructions.json`); `import_paper_format` converts those files, keeping their ids.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from cai_lib.core.errors import CaiError
from cai_lib.core.names import LOCK_FILE, canonical_sha256
from cai_lib.core.settings import settings, variable
from cai_lib.core.store import ArtifactStore, LocalStore, is_s3
from cai_lib.core.text import BOM, read_text_file, text_lines
from cai_lib.core.yaml_text import load_yaml

REGISTRY_ENV = variable("constitution_registry")
SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
IDENTIFIER = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER)]


Section = Literal["critique_revision", "comparison"]


class _Strict(BaseModel):
    # A misspelt key in a hand-written YAML file must fail loudly, not be dropped.
    model_config = ConfigDict(extra="forbid")


class CritiqueRevisionPrinciple(_Strict):
    """One critique request and the revision request paired with it (paper §3.1)."""

    id: Identifier = Field(
        description="Stable id, unique in the constitution; recorded in every SL-CAI trace."
    )
    critique_request: Text = Field(
        description="Asks the model to critique its last answer by this principle."
    )
    revision_request: Text = Field(
        description="Asks the model to rewrite its answer to address the critique."
    )
    tags: list[Text] = Field(
        default=[], description="Free-form labels (e.g. the harm covered) for statistics."
    )


class ComparisonPrinciple(_Strict):
    """One question put to the feedback model about two responses (paper §4.1)."""

    id: Identifier = Field(description="Stable id, unique in the constitution; recorded in every AI label.")
    question: Text = Field(
        description="The question before the options, e.g. 'Which of these assistant responses is less harmful?'."
    )
    tags: list[Text] = Field(default=[], description="Free-form labels for per-principle statistics.")


class CritiqueRevisionExample(_Strict):
    """A worked critique→revision round shown to the model before the real one."""

    prompt: Text = Field(description="The human's request.")
    response: Text = Field(description="The assistant's first answer, which the critique examines.")
    critique_request: Text = Field(description="The critique request used in this example.")
    critique: Text = Field(description="The example critique.")
    revision_request: Text = Field(description="The revision request used in this example.")
    revision: Text = Field(description="The example revision.")


class ComparisonExample(_Strict):
    """A worked multiple-choice comparison shown to the feedback model before the real one."""

    conversation: Text = Field(description="The conversation up to the assistant turn being compared.")
    question: Text = Field(description="The comparison question asked.")
    answer_a: Text = Field(description="Option (A).")
    answer_b: Text = Field(description="Option (B).")
    preferred: Literal["A", "B"] = Field(description="The better option.")
    reasoning: str = Field(default="", description="Step-by-step reasoning, used in chain-of-thought mode.")


class FewShot(_Strict):
    """Few-shot examples that precede critique/revision and comparison prompts."""

    critique_revision: list[CritiqueRevisionExample] = Field(
        default=[], description="Critique/revision examples."
    )
    comparison: list[ComparisonExample] = Field(default=[], description="Comparison examples.")


class Constitution(_Strict):
    """A named, versioned set of principles. Its `sha256` is computed, never stored in the file."""

    name: Identifier = Field(description="Constitution name; the directory under constitutions/.")
    version: str = Field(
        description="Semantic version MAJOR.MINOR.PATCH; any content change needs a new one."
    )
    description: str = Field(default="", description="What this constitution is for, for people.")
    critique_revision: list[CritiqueRevisionPrinciple] = Field(
        min_length=1, description="Critique/revision pairs; SL-CAI draws one at random per round."
    )
    comparison: list[ComparisonPrinciple] = Field(
        default=[], description="Questions for AI feedback; labels average over several of them."
    )
    few_shot: FewShot = Field(default=FewShot(), description="Examples shown before each prompt.")

    @field_validator("version", mode="before")
    @classmethod
    def _version_is_semver(cls, value: object) -> object:
        # YAML reads `version: 1.0` as a float; report it as a bad version, not a wrong type.
        value = str(value) if isinstance(value, (int, float)) else value
        if isinstance(value, str) and not SEMVER.match(value):
            raise ValueError(f"'{value}' is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
        return value

    @model_validator(mode="after")
    def _ids_are_unique(self) -> Constitution:
        seen: set[str] = set()
        for principle in [*self.critique_revision, *self.comparison]:
            if principle.id in seen:
                raise ValueError(f"duplicate principle id '{principle.id}'")
            seen.add(principle.id)
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def sha256(self) -> str:
        """Hex sha256 of the canonical form: sorted-key compact JSON of the document, UTF-8."""
        return canonical_sha256(self.model_dump(mode="json"))

    def section(self, name: Section) -> dict:
        """One section as plain data: its principles and the few-shot examples that go with them.

        Stage outputs are keyed on the sections a stage reads, not on the whole document, so a
        new version that edits only comparison principles leaves the SL-CAI data valid."""
        principles = self.critique_revision if name == "critique_revision" else self.comparison
        examples = getattr(self.few_shot, name)
        return {
            "principles": [p.model_dump(mode="json") for p in principles],
            "few_shot": [e.model_dump(mode="json") for e in examples],
        }

    def section_sha256(self, name: Section) -> str:
        """sha256 of `section(name)` in the canonical form of `sha256`."""
        return canonical_sha256(self.section(name))

    def critique_principle(self, principle_id: str) -> CritiqueRevisionPrinciple:
        for principle in self.critique_revision:
            if principle.id == principle_id:
                return principle
        known = ", ".join(p.id for p in self.critique_revision)
        raise CaiError(f"{self.ref}: no critique/revision principle '{principle_id}' (known: {known})")

    def comparison_principle(self, principle_id: str) -> ComparisonPrinciple:
        for principle in self.comparison:
            if principle.id == principle_id:
                return principle
        known = ", ".join(p.id for p in self.comparison) or "none"
        raise CaiError(f"{self.ref}: no comparison principle '{principle_id}' (known: {known})")


class ConstitutionDiff(BaseModel):
    """Principle ids (of both kinds) that differ between two constitutions."""

    old_ref: str = Field(description="name@version of the first constitution.")
    new_ref: str = Field(description="name@version of the second constitution.")
    added: list[str] = Field(description="Ids only in the second.")
    removed: list[str] = Field(description="Ids only in the first.")
    changed: list[str] = Field(description="Ids in both whose text or tags differ.")
    few_shot_changed: bool = Field(description="Whether the few-shot examples differ.")


# -- reading and writing documents ---------------------------------------------------------------


def semver_key(version: str) -> tuple:
    """Sort key of a semantic version: a release sorts after its pre-releases, build metadata is ignored."""
    match = SEMVER.match(version)
    if not match:
        raise CaiError(f"'{version}' is not a semantic version (MAJOR.MINOR.PATCH, e.g. 1.0.0)")
    major, minor, patch, pre = int(match[1]), int(match[2]), int(match[3]), match[4]
    if pre is None:
        return (major, minor, patch, 1, ())
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in pre.split("."))
    return (major, minor, patch, 0, parts)


def parse_constitution(text: str, source: str) -> Constitution:
    """Validate YAML text; errors are one line naming `source` and the line or field."""
    data = load_yaml(text.removeprefix(BOM), source)
    if not isinstance(data, dict):
        raise CaiError(f"{source}: expected a YAML mapping with name, version and critique_revision")
    if "sha256" in data:
        raise CaiError(f"{source}: field 'sha256' must not be written; the hash is computed from the content")
    try:
        return Constitution.model_validate(data)
    except ValidationError as err:
        raise CaiError(f"{source}: {_describe(err, data)}") from None


def _describe(err: ValidationError, data: dict) -> str:
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    message = first["msg"].removeprefix("Value error, ")
    if not loc:
        return message
    where = f"field '{'.'.join(loc)}'"
    if len(loc) >= 2 and loc[0] in ("critique_revision", "comparison") and loc[1].isdigit():
        entries = data.get(loc[0])
        entry = entries[int(loc[1])] if isinstance(entries, list) and int(loc[1]) < len(entries) else None
        if isinstance(entry, dict) and entry.get("id"):
            where += f" (principle '{entry['id']}')"
    return f"{where}: {message}"


class _BlockStyleDumper(yaml.SafeDumper):
    """Writes multi-line strings as `|` blocks so examples stay readable in the file."""


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockStyleDumper.add_representer(str, _represent_str)


def dump_constitution(constitution: Constitution) -> str:
    """The YAML text of a constitution; `parse_constitution` reads it back to the same sha256."""
    return yaml.dump(
        constitution.model_dump(mode="json"),
        Dumper=_BlockStyleDumper,
        sort_keys=False,
        allow_unicode=True,
        width=100,
    )


# -- the constitutions directory and its lock ---------------------------------------------------


def constitutions_dir() -> Path:
    """`$CAI_CONSTITUTIONS_DIR`, else the repository's `constitutions/` directory."""
    configured = settings().constitutions_dir
    if configured:
        return configured.expanduser().resolve()
    import cai_lib

    return Path(cai_lib.__file__).resolve().parents[1] / "constitutions"


def read_lock(root: Path) -> dict[str, str]:
    """The lock entries `name@version -> sha256` of a constitutions directory ({} without a lock)."""
    path = Path(root) / LOCK_FILE
    if not path.is_file():
        return {}
    entries: dict[str, str] = {}
    for number, line in enumerate(text_lines(read_text_file(path)), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or "@" not in fields[0] or not re.fullmatch(r"[0-9a-f]{64}", fields[1]):
            raise CaiError(f"{path}: line {number}: expected 'name@version <sha256 hex>'")
        if fields[0] in entries:
            raise CaiError(f"{path}: line {number}: {fields[0]} is listed twice")
        entries[fields[0]] = fields[1]
    return entries


def _write_lock(root: Path, entries: dict[str, str]) -> None:
    header = (
        "# sha256 of each published constitution version (canonical JSON form; see cai_lib/core/names.py).\n"
        "# Maintained by `cai constitution lock`, which adds new versions and never changes an entry:\n"
        "# to change a published constitution, write a new version.\n"
    )
    lines = [
        f"{ref} {digest}\n" for ref, digest in sorted(entries.items(), key=lambda kv: _ref_sort_key(kv[0]))
    ]
    LocalStore(str(root)).write_text(LOCK_FILE, header + "".join(lines))


def _ref_sort_key(ref: str) -> tuple:
    name, _, version = ref.partition("@")
    return (name, semver_key(version)) if SEMVER.match(version) else (name, (0,))


def _check_lock(constitution: Constitution, root: Path, source: str) -> None:
    recorded = read_lock(root).get(constitution.ref)
    if recorded is not None and recorded != constitution.sha256:
        raise CaiError(
            f"{source}: content of published version {constitution.ref} changed (sha256 {constitution.sha256[:12]}, "
            f"locked {recorded[:12]} in {Path(root) / LOCK_FILE}); publish the change as a new version"
        )


def _home_dir(path: Path, root: Path) -> Path | None:
    """The constitutions directory a file belongs to: `root`, or a `<dir>/<name>/<file>` with a lock."""
    if path.parent.parent == root:
        return root
    if (path.parent.parent / LOCK_FILE).is_file():
        return path.parent.parent
    return None


def _load_file(path: Path, root: Path) -> Constitution:
    constitution = parse_constitution(read_text_file(path), str(path))
    home = _home_dir(path, root)
    if home is not None:
        expected = (constitution.name, f"{constitution.version}.yaml")
        if (path.parent.name, path.name) != expected:
            raise CaiError(
                f"{path}: declares {constitution.ref} but lies at {path.parent.name}/{path.name}; "
                f"a constitution belongs at {expected[0]}/{expected[1]}"
            )
        if home != root:
            _check_lock(constitution, home, str(path))
    _check_lock(constitution, root, str(path))
    return constitution


def _versions(name: str, root: Path) -> list[Path]:
    files = [p for p in (root / name).glob("*.yaml") if SEMVER.match(p.stem)]
    return sorted(files, key=lambda p: semver_key(p.stem))


def load_constitution(ref: str, root: Path | None = None) -> Constitution:
    """Resolve `ref` to a validated constitution whose content matches the lock.

    `ref` is `name@version`, `name` (its newest version by semver), a YAML file path, an
    `s3://` URI of a YAML file, or inline YAML text (a string with a newline and `name:`).
    `name@version` is looked up first in the S3 registry named by `$CAI_CONSTITUTION_REGISTRY`
    (when set), then in `root` (default `constitutions_dir()`). Whatever the source, a
    document claiming a `name@version` recorded in the lock must have the recorded sha256; a
    file inside a constitutions directory must also lie at `<name>/<version>.yaml`.
    """
    root = Path(root).resolve() if root is not None else constitutions_dir()
    if "\n" in ref and "name:" in ref:
        constitution = parse_constitution(ref, "<inline YAML>")
        _check_lock(constitution, root, "<inline YAML>")
        return constitution
    if is_s3(ref):
        parent, _, key = ref.rpartition("/")
        constitution = parse_constitution(ArtifactStore.open(parent).read_text(key), ref)
        _check_lock(constitution, root, ref)
        return constitution
    path = Path(ref).expanduser()
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return _load_file(path.resolve(), root)
    published = _registry_uri(ref)
    if published:
        return load_constitution(published, root)
    return _load_by_name(ref, root)


def _registry_uri(ref: str) -> str | None:
    """The URI of `name@version` in the S3 registry named by $CAI_CONSTITUTION_REGISTRY, if it is
    published there. Pods resolve refs this way first: a version published after the image was
    built exists only there; the bundled copies are the fallback."""
    registry = settings().constitution_registry
    name, at, version = ref.partition("@")
    if not (registry and at):
        return None
    store = ArtifactStore.open(registry)
    key = f"{name}/{version}.yaml"
    return store.uri_of(key) if store.exists(key) else None


def _load_by_name(ref: str, root: Path) -> Constitution:
    name, _, version = ref.partition("@")
    if not re.match(IDENTIFIER, name):
        raise CaiError(
            f"unknown constitution ref '{ref}': expected name@version, name, a .yaml path or s3:// URI"
        )
    versions = _versions(name, root)
    if not versions:
        known = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) if root.is_dir() else ""
        raise CaiError(
            f"unknown constitution ref '{ref}': no constitution '{name}' in {root} (known: {known or 'none'})"
        )
    if not version:
        return _load_file(versions[-1], root)
    if not SEMVER.match(version):
        raise CaiError(f"unknown constitution ref '{ref}': '{version}' is not a semantic version")
    path = root / name / f"{version}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in versions)
        raise CaiError(f"unknown constitution ref '{ref}': {name} has versions {known}")
    return _load_file(path, root)


def list_constitutions(root: Path | None = None) -> list[Constitution]:
    """Every `<name>/<version>.yaml` under `root`, by name then semver; each checked against the lock."""
    root = Path(root).resolve() if root is not None else constitutions_dir()
    if not root.is_dir():
        return []
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    return [_load_file(path, root) for name in names for path in _versions(name, root)]


def lock_constitutions(root: Path | None = None) -> list[str]:
    """Record the sha256 of every version under `root` not yet in its lock; returns the refs added.

    An existing entry is never changed: a version whose content differs from its entry fails
    to load, naming the version.
    """
    root = Path(root).resolve() if root is not None else constitutions_dir()
    entries = read_lock(root)
    added = []
    for constitution in list_constitutions(root):
        if constitution.ref not in entries:
            entries[constitution.ref] = constitution.sha256
            added.append(constitution.ref)
    if added:
        _write_lock(root, entries)
    return added


def is_locked(constitution: Constitution, root: Path | None = None) -> bool:
    """Whether `root`'s lock records this exact name@version and content."""
    root = Path(root).resolve() if root is not None else constitutions_dir()
    return read_lock(root).get(constitution.ref) == constitution.sha256


# -- comparing, importing, publishing -----------------------------------------------------------


def diff_constitutions(a: Constitution, b: Constitution) -> ConstitutionDiff:
    """Principle ids added in `b`, removed from `a`, and changed between them (both kinds)."""
    old = {p.id: p.model_dump() for p in [*a.critique_revision, *a.comparison]}
    new = {p.id: p.model_dump() for p in [*b.critique_revision, *b.comparison]}
    return ConstitutionDiff(
        old_ref=a.ref,
        new_ref=b.ref,
        added=[i for i in new if i not in old],
        removed=[i for i in old if i not in new],
        changed=[i for i in new if i in old and new[i] != old[i]],
        few_shot_changed=a.few_shot != b.few_shot,
    )


_CRITIQUE_FRAME = re.compile(r"^\s*CritiqueRequest:\s*(.*?)\s*Critique:\s*$", re.DOTALL)
_REVISION_FRAME = re.compile(r"^\s*RevisionRequest:\s*(.*?)\s*Revision:\s*$", re.DOTALL)
_COMPARISON_FRAME = re.compile(r"^\s*(.*?)\s*Options:\s*$", re.DOTALL)


def _read_json(path: Path) -> object:
    try:
        return json.loads(read_text_file(path))
    except json.JSONDecodeError as err:
        raise CaiError(f"{path}: line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}") from None


def _unframe(pattern: re.Pattern, text: object, where: str, form: str) -> str:
    match = pattern.match(text) if isinstance(text, str) else None
    if not match or not match[1]:
        raise CaiError(f"{where}: expected a string of the form {form!r}")
    return match[1]


def _paper_critique_revisions(path: Path) -> list[dict]:
    data = _read_json(path)
    if not isinstance(data, dict) or not data:
        raise CaiError(
            f"{path}: expected a JSON object mapping ids to {{'prompt': [...], 'edit_request': ...}}"
        )
    principles = []
    for principle_id, entry in data.items():
        where = f"{path}: entry '{principle_id}'"
        if not isinstance(entry, dict):
            raise CaiError(f"{where}: expected an object with 'prompt' and 'edit_request'")
        prompt = entry.get("prompt")
        if not (isinstance(prompt, list) and len(prompt) == 1):
            raise CaiError(f"{where}: field 'prompt': expected a list holding one critique request")
        critique = _unframe(
            _CRITIQUE_FRAME, prompt[0], f"{where}: field 'prompt'", "\n\nCritiqueRequest: ...\n\nCritique:"
        )
        revision = _unframe(
            _REVISION_FRAME,
            entry.get("edit_request"),
            f"{where}: field 'edit_request'",
            "\n\nRevisionRequest: ...\n\nRevision:",
        )
        principles.append({"id": principle_id, "critique_request": critique, "revision_request": revision})
    return principles


def _paper_comparisons(path: Path) -> list[dict]:
    data = _read_json(path)
    if not isinstance(data, list) or not data:
        raise CaiError(f"{path}: expected a JSON list of strings '\\n<question> Options:'")
    return [
        {
            "id": f"comparison{index}",
            "question": _unframe(_COMPARISON_FRAME, item, f"{path}: item {index}", "\n... Options:"),
        }
        for index, item in enumerate(data)
    ]


def import_paper_format(
    critiques_json: Path, comparisons_json: Path | None, name: str, version: str
) -> Constitution:
    """Convert the paper authors' published JSON files into a constitution.

    Critique/revision pairs keep their ids (`harmful0`, ...); the "CritiqueRequest:",
    "Critique:", "RevisionRequest:", "Revision:" and "Options:" framing is stripped (our
    prompt builders add their own). Comparison principles, a bare list in the paper's file, get
    ids `comparison0`, `comparison1`, ... in file order.
    """
    critiques_json = Path(critiques_json)
    files = [critiques_json.name]
    document: dict = {
        "name": name,
        "version": version,
        "critique_revision": _paper_critique_revisions(critiques_json),
    }
    if comparisons_json is not None:
        document["comparison"] = _paper_comparisons(Path(comparisons_json))
        files.append(Path(comparisons_json).name)
    document["description"] = (
        f"Imported from the Constitutional AI paper's published format ({', '.join(files)})."
    )
    try:
        return Constitution.model_validate(document)
    except ValidationError as err:
        raise CaiError(f"{critiques_json}: {_describe(err, document)}") from None


def publish_constitution(constitution: Constitution, registry_uri: str) -> str:
    """Write `<registry>/<name>/<version>.yaml` once and return its URI.

    Publishing the same content again is a no-op; publishing other content under a version
    that is already there is a `CaiError` and leaves the stored file untouched.
    """
    store = ArtifactStore.open(registry_uri)
    key = f"{constitution.name}/{constitution.version}.yaml"
    uri = store.uri_of(key)
    if store.exists(key):
        stored = parse_constitution(store.read_text(key), uri)
        if stored.sha256 != constitution.sha256:
            raise CaiError(
                f"{uri}: {constitution.ref} is already published with other content (sha256 "
                f"{stored.sha256[:12]}, yours {constitution.sha256[:12]}); publish it as a new version"
            )
        return uri
    store.write_text(key, dump_constitution(constitution))
    return uri
