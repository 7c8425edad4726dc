"""A STAND-IN for the Kubeflow Pipelines v2 backend's driver, the part that `kfp.local` leaves out:
how a task's parameters are typed, and which environment its pod gets.

1. The typing rule (kubeflow/pipelines 2.17.0, backend/src/v2/driver/resolve.go, `resolveInputs`:
   `handleParamTypeValidationAndConversion`; the same code since 2.14.0). For every parameter a
   component (container or DAG) declares, the driver looks at the value it resolved:
   - a STRING input accepts any value: one that is not a string becomes its text
     (backend/src/v2/metadata/converter.go `PbValueToText`: a number in shortest form, a bool as
     true/false, a list or struct as JSON);
   - every other type must receive a value of its own kind, else the task fails with
     `input parameter "NAME" type mismatch: expect TYPE, got KIND` (number for NUMBER_DOUBLE and
     NUMBER_INTEGER, bool for BOOLEAN, list for LIST, struct for STRUCT, TASK_FINAL_STATUS and
     TASK_CONFIG), and a null with `got null for input parameter "NAME"`.
   A ParallelFor iteration is a DAG of its own: the loop's item is one element of the items list,
   given to the loop component's item input and so typed by the type *the loop* declares for it
   (the iteration driver runs the same function). A STRING item turns a dict into JSON text, and
   a body task that declares STRUCT then fails.

2. The pod's environment (backend/src/v2/driver/k8s.go `extendPodSpecPatch`, 2.17.0): each
   `secretAsEnv` / `configMapAsEnv` key of the task's platform spec becomes an `env` entry with a
   `secretKeyRef` / `configMapKeyRef` carrying the `optional` flag (honoured since 2.15.0,
   kubeflow/pipelines#12216). The kubelet then sets the variable from the object's key, leaves it
   unset when an optional object or key is missing, and refuses to start the container when a
   required one is (CreateContainerConfigError). `pod_env` does the same with the rendered chart's
   ConfigMaps and the operator's Secrets.

`ir_bindings` applies rule 1 to every binding of a compiled pipeline without running it;
`cluster_rules` makes `kfp.local` apply rules 1 and 2 while it runs one, so a local run fails
where the backend would.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from kfp.pipeline_spec import pipeline_spec_pb2

from pipelines.fork_server import run_command

log = logging.getLogger(__name__)

# The value kind each declared type accepts (resolve.go's switch on the protobuf.Value kind).
ACCEPTS = {
    "NUMBER_DOUBLE": "number",
    "NUMBER_INTEGER": "number",
    "BOOLEAN": "bool",
    "LIST": "list",
    "STRUCT": "struct",
    "TASK_FINAL_STATUS": "struct",
    "TASK_CONFIG": "struct",
}
# The kind of value an output or input of each declared type holds once the driver or launcher has
# stored it (the launcher parses an output parameter by its declared type).
KIND_OF_TYPE = {"STRING": "string", **ACCEPTS}


class TypeMismatch(Exception):
    """The driver refused a task's input: the run fails at that task."""


def kind_of(value: object) -> str:
    """The protobuf.Value kind a Python value is sent as."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "struct"
    raise TypeError(f"{type(value).__name__} is not a protobuf.Value")


def as_text(value: object) -> str:
    """converter.go PbValueToText."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        # Go's strconv.FormatFloat(v, 'f', -1, 64): the shortest digits, never an exponent
        text = format(Decimal(repr(float(value))), "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def check_kind(name: str, declared: str, kind: str) -> None:
    """resolve.go's rule for a value of `kind` given to an input declared `declared`."""
    if declared == "STRING":
        return
    if kind == "null":
        raise TypeMismatch(f'got null for input parameter "{name}"')
    if ACCEPTS.get(declared) != kind:
        raise TypeMismatch(f'input parameter "{name}" type mismatch: expect {declared}, got {kind}')


def driver_input(name: str, declared: str, value: object) -> object:
    """The value a component receives for `value` given to its input `name` declared `declared`."""
    check_kind(name, declared, kind_of(value))
    return as_text(value) if declared == "STRING" and not isinstance(value, str) else value


# -- the rule on a compiled pipeline ------------------------------------------------------------


@dataclass(frozen=True)
class Binding:
    """One value handed to one declared input or output of the compiled pipeline."""

    # "pipeline input" (a default), a task's "parent input", "producer output", "constant" or
    # "final status", a "loop item", a DAG's "dag output" or a loop's "collected" result
    what: str
    where: str  # component/task/input, for messages
    declared: str
    kind: str  # the kind of value that arrives; "?" when the IR cannot tell
    error: str = ""


def _type_name(spec: dict) -> str:
    return spec.get("parameterType", "PARAMETER_TYPE_ENUM_UNSPECIFIED")


# What a return annotation's element type is sent as.
ELEMENT_KINDS = {
    "dict": "struct",
    "str": "string",
    "int": "number",
    "float": "number",
    "bool": "bool",
    "list": "list",
}


def element_kind(pipeline_spec: dict, producer_component: str, output: str) -> str:
    """The kind of the elements of a LIST output, from the return annotation of the producer's
    Python function, whose source the IR embeds: `List[dict]` -> struct; "?" when it names none
    (a bare `list`), since then the elements can be anything."""
    component = pipeline_spec["components"][producer_component]
    if output != "Output" or "executorLabel" not in component:
        return "?"
    container = pipeline_spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
    source = next((arg for arg in container.get("command", []) if "def " in arg), "")
    for node in ast.walk(ast.parse(source)) if source else ():
        if isinstance(node, ast.FunctionDef) and isinstance(node.returns, ast.Subscript):
            element = ast.unparse(node.returns.slice).split("[")[0].removeprefix("typing.").lower()
            return ELEMENT_KINDS.get(element, "?")
    return "?"


def ir_bindings(pipeline_spec: dict) -> list[Binding]:
    """Every parameter binding of `pipeline_spec` (the first document of a compiled IR YAML), each
    checked by the driver's rule: the pipeline's inputs against their defaults, each task's inputs
    against what feeds them, each loop's item against the elements of its list, and each DAG's
    outputs (a `dsl.Collected` result among them) against the producer's output."""
    components = pipeline_spec["components"]
    bindings: list[Binding] = []

    def add(what: str, where: str, declared: str, kind: str) -> None:
        error = ""
        if kind != "?":
            try:
                check_kind(where.rsplit("/", 1)[-1], declared, kind)
            except TypeMismatch as err:
                error = str(err)
        else:
            error = "" if declared == "STRING" else "the IR does not say what kind of value arrives"
        bindings.append(Binding(what, where, declared, kind, error))

    root = pipeline_spec["root"]
    for name, spec in root.get("inputDefinitions", {}).get("parameters", {}).items():
        if "defaultValue" in spec:
            add("pipeline input", f"root/{name}", _type_name(spec), kind_of(spec["defaultValue"]))

    def declared_inputs(component: dict) -> dict:
        return component.get("inputDefinitions", {}).get("parameters", {})

    def declared_outputs(component: dict) -> dict:
        return component.get("outputDefinitions", {}).get("parameters", {})

    def walk(dag_name: str, dag_component: dict) -> None:
        tasks = dag_component["dag"].get("tasks", {})
        parent_inputs = declared_inputs(dag_component)
        for task_name, task in tasks.items():
            consumer = components[task["componentRef"]["name"]]
            consumer_inputs = declared_inputs(consumer)
            iterator = task.get("parameterIterator")
            for name, source in task.get("inputs", {}).get("parameters", {}).items():
                where = f"{dag_name}/{task_name}/{name}"
                if name not in consumer_inputs:
                    bindings.append(
                        Binding("task input", where, "?", "?", "the component declares no such input")
                    )
                    continue
                declared = _type_name(consumer_inputs[name])
                if "componentInputParameter" in source:
                    what = "parent input"
                    kind = KIND_OF_TYPE.get(_type_name(parent_inputs[source["componentInputParameter"]]), "?")
                elif "taskOutputParameter" in source:
                    what = "producer output"
                    producer = tasks[source["taskOutputParameter"]["producerTask"]]
                    outputs = declared_outputs(components[producer["componentRef"]["name"]])
                    kind = KIND_OF_TYPE.get(
                        _type_name(outputs[source["taskOutputParameter"]["outputParameterKey"]]), "?"
                    )
                elif "runtimeValue" in source:
                    what, kind = "constant", kind_of(source["runtimeValue"]["constant"])
                elif "taskFinalStatus" in source:
                    what, kind = "final status", "struct"
                else:
                    what, kind = "task input", "?"
                if source.get("parameterExpressionSelector"):
                    kind = "?"  # a field of a struct: its kind is the field's
                add(what, where, declared, kind)
            if iterator:
                items_input = iterator["items"].get("inputParameter")
                source = task["inputs"]["parameters"].get(items_input, {})
                kind = "?"
                if "taskOutputParameter" in source:
                    producer = tasks[source["taskOutputParameter"]["producerTask"]]
                    kind = element_kind(
                        pipeline_spec,
                        producer["componentRef"]["name"],
                        source["taskOutputParameter"]["outputParameterKey"],
                    )
                elif "raw" in iterator["items"]:
                    elements = {kind_of(item) for item in json.loads(iterator["items"]["raw"])}
                    kind = elements.pop() if len(elements) == 1 else "?"
                item = iterator["itemInput"]
                add("loop item", f"{dag_name}/{task_name}/{item}", _type_name(consumer_inputs[item]), kind)
        for name, output in dag_component["dag"].get("outputs", {}).get("parameters", {}).items():
            declared = _type_name(declared_outputs(dag_component)[name])
            selector = output.get("valueFromParameter")
            if selector is None:
                continue
            producer = tasks[selector["producerSubtask"]]
            produced = declared_outputs(components[producer["componentRef"]["name"]])[
                selector["outputParameterKey"]
            ]
            if dag_component is not root and _is_loop(pipeline_spec, dag_name):
                # dsl.Collected: the loop's output is the list of every iteration's value
                add("collected", f"{dag_name}/{name}", declared, "list")
            else:
                add("dag output", f"{dag_name}/{name}", declared, KIND_OF_TYPE.get(_type_name(produced), "?"))
        for task in tasks.values():
            child = task["componentRef"]["name"]
            if "dag" in components[child]:
                walk(child, components[child])

    walk("root", root)
    return bindings


def _is_loop(pipeline_spec: dict, component_name: str) -> bool:
    """Whether `component_name` is a ParallelFor body (some task iterates with it)."""
    tasks = [pipeline_spec["root"]["dag"]["tasks"]] + [
        c["dag"].get("tasks", {}) for c in pipeline_spec["components"].values() if "dag" in c
    ]
    return any(
        t["componentRef"]["name"] == component_name and "parameterIterator" in t
        for ts in tasks
        for t in ts.values()
    )


# -- the pod's environment ------------------------------------------------------------------------


class ContainerConfigError(Exception):
    """The kubelet cannot start the container: a required ConfigMap/Secret key is missing."""


def pod_env(
    executor: dict, configmaps: dict[str, dict[str, str]], secrets: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The variables a step's pod gets from its kubernetes platform spec (`executor`, one entry of
    platforms.kubernetes.deploymentSpec.executors), with `configmaps` and `secrets` (name -> data)
    as what exists in the namespace. An optional object or key that is missing sets nothing; a
    required one raises `ContainerConfigError`, as the kubelet refuses the container."""
    env: dict[str, str] = {}
    for field, objects, kind, key_field in (
        ("configMapAsEnv", configmaps, "ConfigMap", "configMapKey"),
        ("secretAsEnv", secrets, "Secret", "secretKey"),
    ):
        for mapping in executor.get(field, []):
            name = mapping.get("configMapName") or mapping.get("secretName")
            data = objects.get(name)
            for pair in mapping.get("keyToEnv", []):
                if data is not None and pair[key_field] in data:
                    env[pair["envVar"]] = data[pair[key_field]]
                elif not mapping.get("optional", False):
                    missing = f"{kind} {name}" if data is None else f"key {pair[key_field]} in {kind} {name}"
                    raise ContainerConfigError(f"couldn't find {missing} (for ${pair['envVar']})")
    return env


# -- kfp.local, made to follow both rules ---------------------------------------------------------


@dataclass
class ClusterRules:
    """What `cluster_rules` saw: the driver's refusals, and each step's environment."""

    refusals: list[str]
    environments: dict[str, dict[str, str]]  # executor label -> the variables from its pod spec


@contextlib.contextmanager
def cluster_rules(
    platform_spec: dict | None = None,
    configmaps: dict[str, dict[str, str]] | None = None,
    secrets: dict[str, dict[str, str]] | None = None,
    cleared: frozenset[str] = frozenset(),
) -> Iterator[ClusterRules]:
    """While the block runs, `kfp.local` types every parameter as the driver does (a refused
    input fails its task, with the driver's message in `refusals`), and, given the compiled
    pipeline's `platform_spec`, runs each step with the environment its pod would get from
    `configmaps` and `secrets` instead of this process's: the variables in `cleared` (the ones the
    code reads) are removed first, so a setting reaches a step only through the pipeline's own
    mappings."""
    from kfp.local import status, subprocess_task_handler, task_dispatcher
    from kfp.local.orchestrator import enhanced_dag_orchestrator, task_spec_utils

    seen = ClusterRules(refusals=[], environments={})
    executors = (
        (platform_spec or {})
        .get("platforms", {})
        .get("kubernetes", {})
        .get("deploymentSpec", {})
        .get("executors", {})
    )
    # Iterations run on worker threads: the executor a thread runs is its own, the loops are shared.
    local = threading.local()
    components: dict = {}  # component name -> ComponentSpec, from the ParallelFor tasks seen
    loops: dict[str, str] = {}  # loop component name -> its items input
    originals = {
        (task_dispatcher, "run_single_task_implementation"): task_dispatcher.run_single_task_implementation,
        (task_spec_utils, "build_nested_dag_arguments"): task_spec_utils.build_nested_dag_arguments,
        (
            task_spec_utils,
            "create_parameter_loop_iteration_task_spec",
        ): task_spec_utils.create_parameter_loop_iteration_task_spec,
        (
            enhanced_dag_orchestrator,
            "_run_parallel_for_task",
        ): enhanced_dag_orchestrator._run_parallel_for_task,
        (subprocess_task_handler, "run_local_subprocess"): subprocess_task_handler.run_local_subprocess,
    }
    type_name = pipeline_spec_pb2.ParameterType.ParameterTypeEnum.Name

    def typed(component_spec, arguments: dict, what: str) -> dict:
        declared = component_spec.input_definitions.parameters
        return {
            name: driver_input(name, type_name(declared[name].parameter_type), value)
            if name in declared
            else value
            for name, value in arguments.items()
        }

    def run_single_task_implementation(**kwargs):
        try:
            kwargs["arguments"] = typed(
                kwargs["component_spec"], kwargs["arguments"], kwargs["component_name"]
            )
        except TypeMismatch as err:
            message = f"{kwargs['component_name']}: failed to resolve inputs: {err}"
            seen.refusals.append(message)
            log.error("driver (stand-in): %s", message)
            return {}, status.Status.FAILURE
        local.executor = kwargs["component_spec"].executor_label
        try:
            return originals[(task_dispatcher, "run_single_task_implementation")](**kwargs)
        finally:
            local.executor = None

    def build_nested_dag_arguments(task_name, task_spec, component_spec, io_store):
        arguments = originals[(task_spec_utils, "build_nested_dag_arguments")](
            task_name=task_name, task_spec=task_spec, component_spec=component_spec, io_store=io_store
        )
        # resolve.go: the iterator's driver skips the item input (only iterations get it), and an
        # iteration's driver the items list (kfp.local hands an iteration its item there too).
        if task_spec.HasField("parameter_iterator"):
            skipped = {task_spec.parameter_iterator.item_input}
        else:
            skipped = {loops.get(task_spec.component_ref.name, "")} if "-iteration-" in task_name else set()
        return {
            **arguments,
            **typed(component_spec, {k: v for k, v in arguments.items() if k not in skipped}, task_name),
        }

    def run_parallel_for_task(*args, **kwargs):
        components.update(kwargs.get("components", args[3] if len(args) > 3 else {}))
        return originals[(enhanced_dag_orchestrator, "_run_parallel_for_task")](*args, **kwargs)

    def create_parameter_loop_iteration_task_spec(original_task_spec, loop_item, loop_task_name):
        loop = components[original_task_spec.component_ref.name]
        item_input = original_task_spec.parameter_iterator.item_input
        loops[original_task_spec.component_ref.name] = (
            original_task_spec.parameter_iterator.items.input_parameter
        )
        declared = type_name(loop.input_definitions.parameters[item_input].parameter_type)
        try:
            loop_item = driver_input(item_input, declared, loop_item)
        except TypeMismatch as err:
            seen.refusals.append(f"{loop_task_name}: {err}")
            raise
        return originals[(task_spec_utils, "create_parameter_loop_iteration_task_spec")](
            original_task_spec, loop_item, loop_task_name
        )

    def run_local_subprocess(full_command, env_vars=None):
        env = dict(os.environ)
        label = getattr(local, "executor", None)
        if platform_spec is not None and label is not None:
            env = {k: v for k, v in env.items() if k not in cleared}
            try:
                from_pod = pod_env(executors.get(label, {}), configmaps or {}, secrets or {})
            except ContainerConfigError as err:
                # the kubelet never starts the container: the task fails
                seen.refusals.append(f"{label}: {err}")
                log.error("kubelet (stand-in): %s: %s", label, err)
                return 1
            seen.environments[label] = from_pod
            env.update(from_pod)
        env.update(env_vars or {})
        # As kfp.local's own run_local_subprocess, with the environment built above.
        return run_command(full_command, env)

    replacements = {
        (task_dispatcher, "run_single_task_implementation"): run_single_task_implementation,
        (task_spec_utils, "build_nested_dag_arguments"): build_nested_dag_arguments,
        (
            task_spec_utils,
            "create_parameter_loop_iteration_task_spec",
        ): create_parameter_loop_iteration_task_spec,
        (enhanced_dag_orchestrator, "_run_parallel_for_task"): run_parallel_for_task,
        (subprocess_task_handler, "run_local_subprocess"): run_local_subprocess,
    }
    for (module, name), replacement in replacements.items():
        setattr(module, name, replacement)
    try:
        yield seen
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)
