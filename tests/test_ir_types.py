"""The committed compiled pipeline (pipelines/cai_pipeline.yaml) is typed as the KFP backend's
driver requires: every value handed to a declared input is of the declared type or goes to a
STRING input (tests/kfp_driver.py encodes the rule from kubeflow/pipelines 2.17.0,
backend/src/v2/driver/resolve.go). `kfp.local` does not check this; `kfp_driver.cluster_rules`
makes it, and the tests at the end show a local run failing where the backend would.
"""

# No `from __future__ import annotations`: KFP reads the components' annotations as types.
from collections import Counter

import pytest
import yaml
from conftest import REPO_ROOT
from kfp import compiler, dsl
from kfp_driver import TypeMismatch, cluster_rules, driver_input, ir_bindings

from cai_lib.platform.run_config import PipelineParams, load_run_config
from pipelines.cai_pipeline import compile_pipeline

COMMITTED = REPO_ROOT / "pipelines" / "cai_pipeline.yaml"


@pytest.fixture(scope="module")
def spec() -> dict:
    return next(yaml.safe_load_all(COMMITTED.read_text()))


@pytest.fixture(scope="module")
def bindings(spec):
    return ir_bindings(spec)


def all_tasks(spec: dict) -> dict:
    tasks = {("root", name): task for name, task in spec["root"]["dag"]["tasks"].items()}
    for component, body in spec["components"].items():
        tasks.update({(component, name): task for name, task in body.get("dag", {}).get("tasks", {}).items()})
    return tasks


# -- the driver's rule, on hand-written values -----------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "value", "received"),
    [
        ("STRING", {"shard": 0, "shards": 3}, '{"shard":0,"shards":3}'),
        ("STRING", [1, 2], "[1,2]"),
        ("STRING", 4.0, "4"),
        ("STRING", True, "true"),
        ("STRUCT", {"shard": 0}, {"shard": 0}),
        ("LIST", ["a"], ["a"]),
        ("NUMBER_INTEGER", 3.0, 3.0),
        ("BOOLEAN", False, False),
        ("TASK_FINAL_STATUS", {"state": "SUCCEEDED"}, {"state": "SUCCEEDED"}),
    ],
)
def test_a_string_input_takes_any_value_as_text_and_other_types_take_their_own_kind(
    declared, value, received
):
    assert driver_input("x", declared, value) == received


@pytest.mark.parametrize(
    ("declared", "value", "message"),
    [
        ("STRUCT", '{"shard": 0}', 'input parameter "x" type mismatch: expect STRUCT, got string'),
        ("LIST", {"a": 1}, 'input parameter "x" type mismatch: expect LIST, got struct'),
        ("NUMBER_INTEGER", "3", 'input parameter "x" type mismatch: expect NUMBER_INTEGER, got string'),
        ("BOOLEAN", 1, 'input parameter "x" type mismatch: expect BOOLEAN, got number'),
        ("STRUCT", None, 'got null for input parameter "x"'),
    ],
)
def test_any_other_declared_type_refuses_a_value_of_another_kind(declared, value, message):
    with pytest.raises(TypeMismatch, match=message):
        driver_input("x", declared, value)


# -- the committed IR ---------------------------------------------------------------------------------


def test_every_binding_of_the_committed_pipeline_passes_the_drivers_typing_rule(bindings):
    assert [(b.what, b.where, b.error) for b in bindings if b.error] == []


def test_the_walk_covers_pipeline_inputs_loop_items_producer_outputs_and_collected_results(bindings):
    counts = Counter(b.what for b in bindings)
    assert {
        what: counts[what]
        for what in ("pipeline input", "parent input", "producer output", "loop item", "collected")
    } == {
        # every run parameter, bound once (to the resolve step)
        "pipeline input": len(PipelineParams.model_fields),
        "parent input": counts["parent input"],
        "producer output": counts["producer output"],
        # the fan-outs over prompt generation, SL-CAI, feedback and evaluation, and the merges after
        # them (generated candidates, traces, helpful samples, labels, answers)
        "loop item": 4,
        "collected": 5,
    }
    assert counts["parent input"] > 0 and counts["producer output"] > 0


def test_every_fan_out_declares_its_items_as_the_structs_the_shard_steps_take(bindings):
    items = {b.where.rsplit("/", 1)[-1]: (b.declared, b.kind) for b in bindings if b.what == "loop item"}
    assert items == {
        "pipelinechannel--prepare-prompts-Output-loop-item": ("STRUCT", "struct"),
        "pipelinechannel--select-prompts-Output-loop-item": ("STRUCT", "struct"),
        "pipelinechannel--plan-eval-shards-Output-loop-item": ("STRUCT", "struct"),
    }


def test_every_shard_step_receives_the_loop_item_whole_in_its_struct_work_input(spec):
    work_inputs = [
        (component, name, task["inputs"]["parameters"]["work"])
        for (component, name), task in all_tasks(spec).items()
        if "work" in task.get("inputs", {}).get("parameters", {})
    ]
    # generate_prompts, critique_revise, helpful_samples, sample_pairs, label, answer_eval
    assert len(work_inputs) == 6
    for component, _, source in work_inputs:
        item = source["componentInputParameter"]
        assert item.endswith("-loop-item") and "parameterExpressionSelector" not in source
        assert (
            spec["components"][component]["inputDefinitions"]["parameters"][item]["parameterType"] == "STRUCT"
        )


# kubeflow/pipelines#13273 (open, SDK 2.14.3 - 2.17): a `ParallelFor` over dicts whose item's
# *fields* (`item.a`, compiled as `...-loop-item-param-N-subvar-a` inputs with a
# parameterExpressionSelector) are used inside a nested `dsl.If` or `dsl.ExitHandler` is wired to
# the wrong parameter. This pipeline's loops sit inside the run's ExitHandler, not around one, and
# their bodies take the item whole in plain container tasks.
def crossings(spec: dict) -> tuple[list, list, int]:
    """Loop-item fields read through a selector, loop bodies holding a nested DAG, and the loop count."""
    tasks = all_tasks(spec)
    selectors = [
        (where, name)
        for where, task in tasks.items()
        for name, source in task.get("inputs", {}).get("parameters", {}).items()
        if source.get("parameterExpressionSelector") or "-subvar-" in name
    ]
    loop_bodies = [task["componentRef"]["name"] for task in tasks.values() if "parameterIterator" in task]
    nested = [
        (body, name)
        for body in loop_bodies
        for name, task in spec["components"][body]["dag"]["tasks"].items()
        if "dag" in spec["components"][task["componentRef"]["name"]]
    ]
    return selectors, nested, len(loop_bodies)


def test_no_loop_item_field_crosses_a_control_flow_boundary_as_in_kubeflow_pipelines_13273(spec):
    assert crossings(spec) == ([], [], 4)


def test_nor_in_later_rounds_whose_loops_sit_inside_nested_dsl_ifs(tmp_path):
    # Round 2's loops run inside `dsl.If(round 1 promoted)`, and round 3's inside that one's
    # `dsl.If(round 2 promoted)`: the pattern's other boundary.
    path = tmp_path / "pipeline.yaml"
    compile_pipeline(str(path), load_run_config(overrides=["rounds=3"]).params)
    assert crossings(next(yaml.safe_load_all(path.read_text()))) == ([], [], 8)


# -- the same rule, enforced on kfp.local ---------------------------------------------------------------


@dsl.component(base_image="python:3.11")
def untyped_items() -> list:
    return [{"shard": "a"}, {"shard": "b"}]


@dsl.component(base_image="python:3.11")
def typed_items() -> list[dict]:
    return [{"shard": "a"}, {"shard": "b"}]


@dsl.component(base_image="python:3.11")
def shard(work: dict) -> str:
    return str(work["shard"])


@dsl.component(base_image="python:3.11")
def merge(parts: list) -> str:
    return ",".join(parts)


def fan_out(items_component):
    @dsl.pipeline(name="fan-out")
    def pipeline() -> str:
        items = items_component()
        with dsl.ParallelFor(items.output) as work:
            part = shard(work=work)
        return merge(parts=dsl.Collected(part.output)).output

    return pipeline


def test_the_ir_rule_flags_a_loop_over_an_untyped_list_feeding_a_struct_input(tmp_path):
    compiler.Compiler().compile(fan_out(untyped_items), str(tmp_path / "p.yaml"))
    errors = [
        b.error for b in ir_bindings(next(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))) if b.error
    ]
    assert errors == ['input parameter "work" type mismatch: expect STRUCT, got string']


@pytest.fixture
def local_runner(tmp_path):
    from kfp import local

    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=False
    )


@pytest.mark.integration
def test_kfp_local_under_the_drivers_rule_fails_the_shard_of_an_untyped_fan_out(local_runner):
    with cluster_rules() as seen:
        task = fan_out(untyped_items)()
    assert task.outputs == {}  # the run failed, so it has no output
    assert seen.refusals[0].endswith(
        'failed to resolve inputs: input parameter "work" type mismatch: expect STRUCT, got string'
    )


@pytest.mark.integration
def test_kfp_local_under_the_drivers_rule_runs_a_typed_fan_out_and_collects_its_parts(local_runner):
    with cluster_rules() as seen:
        task = fan_out(typed_items)()
    assert (task.output, seen.refusals) == ("a,b", [])
