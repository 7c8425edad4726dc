"""Validation of custom objects against the upstream CRDs vendored in tests/upstream/ (see its
README for where each came from), strict: a field the schema does not define is an error.

The API server prunes unknown fields of a structural schema (apiextensions.k8s.io/v1), and with
`kubectl --validate=strict` (server-side field validation) refuses them; either way a field the
CRD lacks never reaches the controller. So an object is checked as JSON Schema built from the
CRD's `openAPIV3Schema`, with `additionalProperties: false` on every object that lists its
`properties` and does not say `x-kubernetes-preserve-unknown-fields: true`,
`x-kubernetes-int-or-string` read as integer-or-string and `nullable` as allowing null. The
object's `metadata` is checked as the ObjectMeta fields a manifest sets. Not modelled: CEL rules
(`x-kubernetes-validations`) and formats.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema

UPSTREAM = Path(__file__).resolve().parent / "upstream"
# kind -> (vendored CRD, apiVersion it serves)
CRDS = {
    "InferenceService": ("inferenceservices.serving.kserve.io.json", "serving.kserve.io/v1beta1"),
    "LLMInferenceService": ("llminferenceservices.serving.kserve.io.json", "serving.kserve.io/v1alpha2"),
    "ServingRuntime": ("servingruntimes.serving.kserve.io.json", "serving.kserve.io/v1alpha1"),
    "ClusterServingRuntime": ("clusterservingruntimes.serving.kserve.io.json", "serving.kserve.io/v1alpha1"),
    "TrainJob": ("trainjobs.trainer.kubeflow.org.json", "trainer.kubeflow.org/v1alpha1"),
    "TrainingRuntime": ("trainingruntimes.trainer.kubeflow.org.json", "trainer.kubeflow.org/v1alpha1"),
    "ClusterTrainingRuntime": (
        "clustertrainingruntimes.trainer.kubeflow.org.json",
        "trainer.kubeflow.org/v1alpha1",
    ),
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "namespace": {"type": "string"},
        "labels": STRING_MAP,
        "annotations": STRING_MAP,
        # what the API server adds to an object it stores (the Kubernetes stand-in does too)
        "resourceVersion": {"type": "string"},
        "creationTimestamp": {"type": "string"},
        "uid": {"type": "string"},
    },
}


def strict(schema: dict) -> dict:
    """The CRD's structural schema as a JSON Schema that refuses unknown fields."""
    if not isinstance(schema, dict):
        return schema
    out = {key: value for key, value in schema.items() if not key.startswith("x-kubernetes-")}
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {name: strict(sub) for name, sub in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [strict(sub) for sub in out[key]]
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable"):
        out["type"] = [out["type"], "null"] if isinstance(out.get("type"), str) else out.get("type")
        out.pop("nullable")
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def validator(kind: str, filename: str | None = None) -> jsonschema.Draft7Validator:
    """The strict validator of `kind` under its vendored CRD (or under the CRD file `filename`)."""
    crd = json.loads((UPSTREAM / (filename or CRDS[kind][0])).read_text())
    (version,) = crd["spec"]["versions"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = OBJECT_META
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict, filename: str | None = None) -> list[str]:
    """Why the API server would refuse or prune `obj` under its vendored CRD, or the one in
    tests/upstream/`filename` ([] when it would not)."""
    kind = obj.get("kind")
    if kind not in CRDS:
        return [f"no vendored CRD for kind {kind}"]
    if obj.get("apiVersion") != CRDS[kind][1]:
        return [
            f"{kind} {obj['metadata'].get('name')}: apiVersion {obj.get('apiVersion')}, the CRD serves {CRDS[kind][1]}"
        ]
    return [
        f"{kind} {obj['metadata'].get('name')}: {'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in sorted(
            validator(kind, filename).iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))
        )
    ]
