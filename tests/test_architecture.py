"""The layout is the architecture: layers that import downwards only, no import cycles, one
place for every name, and the old module paths that registered models and old pipelines name."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import grimp
import pytest

from cai_lib.core import names

REPO = Path(__file__).resolve().parents[1]


def test_the_layer_contract_holds():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "Contracts: 1 kept, 0 broken." in done.stdout


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("cai_lib", "components", "pipelines")
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="a")
    graph.add_import(importer="b", imported="c")
    assert cycles(graph) == [["a", "b"]]


def string_constants(module) -> dict[str, str]:
    tree = ast.parse(Path(module.__file__).read_text())
    found = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant) and isinstance(value.value, str):
            found[target.id] = value.value
    return found


# Literals of names.py that are also ordinary keys elsewhere: a run summary lists its "stages",
# a run config file may name its "base" file, and "cai-platform" (the creator the registry's
# tags name) is also the distribution whose version stage_table reads.
ORDINARY_WORDS = {"stages", "base", "cai-platform"}


def test_every_name_of_names_py_is_spelled_only_there():
    literals = {value for value in string_constants(names).values() if value not in ORDINARY_WORDS}
    offenders = []
    for path in sorted((REPO / "cai_lib").rglob("*.py")):
        if path.name == "names.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in literals:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_the_names_check_sees_a_literal_spelled_again(tmp_path):
    tree = ast.parse('TAG = "cai.gate.decision"\n')
    spelled = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)]
    assert names.GATE_DECISION_TAG in spelled


def test_the_old_pyfunc_loader_path_still_loads_with_a_warning():
    sys.modules.pop("cai_lib.pyfunc_model", None)
    with pytest.warns(DeprecationWarning, match="cai_lib.platform.pyfunc_model"):
        import cai_lib.pyfunc_model as old
    from cai_lib.platform import pyfunc_model

    assert old._load_pyfunc is pyfunc_model._load_pyfunc


def test_an_old_component_body_calls_its_step_through_the_package_with_a_warning():
    # What a component compiled before the layered layout runs: `from cai_lib import steps` and one
    # call, in a fresh process.
    body = (
        "import json, warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "from cai_lib import steps\n"
        "try:\n"
        "    steps.fan_out\n"
        "except DeprecationWarning as warning:\n"
        "    print(json.dumps(str(warning)))\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "context = {'params': {'num_shards': 2}, 'run_id': 'r', 'run_name': 'r', 'artifact_root': '/tmp', "
        "'tracking_uri': 'sqlite:///x.db', 'parent_run_id': 'p'}\n"
        "print(json.dumps([item['shard'] for item in steps.fan_out(context, 10)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", body], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    warning, shards = done.stdout.splitlines()
    assert "cai_lib.steps.prepare_prompts.fan_out" in warning
    assert shards == "[0, 1]"


def test_a_name_the_old_steps_module_never_had_is_an_attribute_error():
    from cai_lib import steps

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(AttributeError):
            steps.no_such_step  # noqa: B018
