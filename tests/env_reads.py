"""Which environment variables the project's code reads, found in its source without running it.

A read is `os.environ[NAME]`, `os.environ.get(NAME)`, `os.getenv(NAME)` or `NAME in os.environ`,
with NAME a string literal or a module-level constant (also one imported from another module, or
an element of a constant tuple), or `settings().FIELD`: the platform's settings
(`cai_lib.core.settings`), which read `CAI_<FIELD>` (or the variables a field's alias names);
`variable("field")` stands for that variable's name. A read whose key is a loop variable counts every variable name
its function mentions. What a module's code can read is its own reads plus those of every module
of the project it imports, at module level or inside a function, transitively: an
over-approximation, so a variable is never missed because a call went through a helper.
Only the installation's variables count: CAI_*, MLFLOW_*, AWS_*, HF_*.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from conftest import REPO_ROOT

PACKAGES = ("cai_lib", "components", "pipelines")
SETTING = re.compile(r"^(CAI|MLFLOW|AWS|HF)_[A-Z0-9_]+$")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, ast.Module]:
    """Module name -> parsed source, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            found[_module_name(path)] = ast.parse(path.read_text(), str(path))
    return found


@functools.cache
def packages() -> frozenset[str]:
    """The modules that are packages (an __init__.py): a relative import in one starts from it."""
    return frozenset(
        _module_name(path) for package in PACKAGES for path in (REPO_ROOT / package).rglob("__init__.py")
    )


def _is_environ(node: ast.AST) -> bool:
    """`os.environ` or a bare `environ`."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _imports(module: str, tree: ast.Module) -> dict[str, tuple[str, str | None]]:
    """Local name -> (module, attribute or None) for every import in `tree`, at any depth."""
    names = {}
    package = module if module in packages() else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (alias.name, None)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                names[alias.asname or alias.name] = (base, alias.name)
    return names


@functools.cache
def constants(module: str) -> dict[str, tuple[str, ...]]:
    """Module-level constant name -> the setting names it holds (one for a string, several for a tuple)."""
    tree = modules()[module]
    found: dict[str, tuple[str, ...]] = {}
    imported = _imports(module, tree)
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if isinstance(node, ast.AnnAssign):
            target = node.target
        if isinstance(target, ast.Name) and node.value is not None:
            values = _strings(node.value, found, imported)
            if values:
                found[target.id] = values
    return found


@functools.cache
def settings_variables() -> dict[str, tuple[str, ...]]:
    """Settings field -> the environment variables it reads (`cai_lib.core.settings.Settings`)."""
    from pydantic import AliasChoices

    from cai_lib.core.settings import PREFIX, Settings

    found = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        found[field] = tuple(alias.choices) if isinstance(alias, AliasChoices) else (PREFIX + field.upper(),)
    return found


def _is_settings_call(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "settings"


def _settings_field(node: ast.AST) -> str | None:
    """FIELD of `settings().FIELD`, or of `variable("FIELD")`; None for anything else."""
    if isinstance(node, ast.Attribute) and _is_settings_call(node.value):
        return node.attr
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "variable"
        and node.args
        and isinstance(node.args[0], ast.Constant)
    ):
        return node.args[0].value
    return None


def _strings(node: ast.AST, local: dict, imported: dict) -> tuple[str, ...]:
    """The setting names `node` (a literal, a constant's name, or a tuple/list of them) stands for."""
    if (field := _settings_field(node)) is not None:
        return settings_variables().get(field, ())
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return (node.value,) if SETTING.match(node.value) else ()
    if isinstance(node, ast.Name):
        if node.id in local:
            return local[node.id]
        source = imported.get(node.id)
        if source and source[1] and source[0] in modules():
            return constants(source[0]).get(source[1], ())
        return ()
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        source = imported.get(node.value.id)
        if source and source[1] is None and source[0] in modules():
            return constants(source[0]).get(node.attr, ())
        if source and source[1] and f"{source[0]}.{source[1]}" in modules():
            return constants(f"{source[0]}.{source[1]}").get(node.attr, ())
        return ()
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return tuple(name for element in node.elts for name in _strings(element, local, imported))
    return ()


def _key_of_read(node: ast.AST) -> ast.AST | None:
    """The key expression of an environment read, or None if `node` is not one."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
        if node.func.attr == "get" and _is_environ(node.func.value):
            return node.args[0]
        if (
            node.func.attr == "getenv"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "os"
        ):
            return node.args[0]
    if isinstance(node, ast.Subscript) and _is_environ(node.value) and isinstance(node.ctx, ast.Load):
        return node.slice
    if (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.ops[0], ast.In | ast.NotIn)
        and _is_environ(node.comparators[0])
    ):
        return node.left
    return None


@functools.cache
def own_reads(module: str) -> frozenset[str]:
    """The settings `module`'s own code reads."""
    tree = modules()[module]
    local, imported = constants(module), _imports(module, tree)
    reads: set[str] = set()
    scopes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)] + [tree]
    # names bound to `settings()` (e.g. `environment = settings()`): their attributes are reads too
    holders = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and _is_settings_call(node.value)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    for scope in scopes:
        for node in ast.walk(scope):
            if isinstance(node, ast.Attribute) and _settings_field(node) is not None:
                reads.update(_strings(node, local, imported))
                continue
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in holders:
                reads.update(settings_variables().get(node.attr, ()))
                continue
            key = _key_of_read(node)
            if key is None:
                continue
            names = _strings(key, local, imported)
            if not names and scope is not tree:
                # a key computed in the function (a loop over names): every setting it mentions
                names = tuple(
                    name
                    for inner in ast.walk(scope)
                    if isinstance(inner, ast.Constant | ast.Name | ast.Attribute | ast.Tuple)
                    for name in _strings(inner, local, imported)
                )
            reads.update(names)
    return frozenset(reads)


@functools.cache
def imported_modules(module: str) -> frozenset[str]:
    """The project's modules `module` imports directly (at any depth of its code)."""
    found = set()
    for source, attribute in _imports(module, modules()[module]).values():
        for candidate in (f"{source}.{attribute}" if attribute else None, source):
            if candidate in modules():
                found.add(candidate)
                break
        # a package import also runs the package's __init__
        parts = source.split(".")
        found.update(
            ".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in modules()
        )
    found.discard(module)
    return frozenset(found)


def reachable(module: str) -> frozenset[str]:
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(imported_modules(current))
    return frozenset(seen)


def reads_from(module: str) -> frozenset[str]:
    """Every setting the code `module` can run reads."""
    return frozenset(name for found in reachable(module) for name in own_reads(found))


def _component_starts(function: str, module: str) -> set[str]:
    """The project's modules the body of component `function` imports (KFP runs only the body)."""
    tree = modules()[module]
    body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
    starts = set()
    for source, attribute in _imports(module, ast.Module(body=body.body, type_ignores=[])).values():
        for candidate in (f"{source}.{attribute}" if attribute else None, source):
            if candidate in modules():
                starts.add(candidate)
                break
    return starts


def component_reads(function: str, module: str = "components.stages") -> frozenset[str]:
    """What the project's code run by KFP component `function` (of components/stages.py) can read."""
    return frozenset(name for start in _component_starts(function, module) for name in reads_from(start))


# Settings the libraries the code imports read on their own, per top-level package:
# mlflow/environment_variables.py (3.x): the tracking client's basic auth;
# huggingface_hub/utils/_auth.py (transformers downloads through it): a token for gated models;
# botocore's credential chain (boto3): the S3 key pair.
LIBRARY_READS = {
    "mlflow": frozenset({"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}),
    "transformers": frozenset({"HF_TOKEN"}),
    "huggingface_hub": frozenset({"HF_TOKEN"}),
    "boto3": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}),
}


def libraries_of(module: str) -> frozenset[str]:
    """The third-party packages (among LIBRARY_READS) the code `module` can run imports."""
    found = set()
    for reached in reachable(module):
        for source, _ in _imports(reached, modules()[reached]).values():
            if source.split(".")[0] in LIBRARY_READS:
                found.add(source.split(".")[0])
    return frozenset(found)


def step_reads(function: str, module: str = "components.stages") -> frozenset[str]:
    """What the step running component `function` can read: its code's reads and its libraries'."""
    libraries = {lib for start in _component_starts(function, module) for lib in libraries_of(start)}
    return component_reads(function, module) | frozenset(
        name for lib in libraries for name in LIBRARY_READS[lib]
    )
