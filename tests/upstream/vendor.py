"""Make a vendored CRD of this folder from the upstream file: the one version the project renders,
with the `description` texts left out (they are most of the bytes and never change what
validates). Run from the repository root, e.g.

    python tests/upstream/vendor.py upstream/serving.kserve.io_inferenceservices.yaml v1beta1 \
        > tests/upstream/inferenceservices.serving.kserve.io.json
"""

from __future__ import annotations

import json
import sys

import yaml


def strip(node):
    if isinstance(node, dict):
        # "description" is a property *name* inside some `properties` maps: keep those.
        return {k: strip(v) for k, v in node.items() if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [strip(item) for item in node]
    return node


def vendored(crd: dict, version: str) -> dict:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return {
        "apiVersion": crd["apiVersion"],
        "kind": crd["kind"],
        "metadata": {"name": crd["metadata"]["name"]},
        "spec": {
            "group": crd["spec"]["group"],
            "names": crd["spec"]["names"],
            "scope": crd["spec"]["scope"],
            "versions": [
                {
                    "name": served["name"],
                    "served": served["served"],
                    "storage": served["storage"],
                    "schema": strip(served["schema"]),
                }
            ],
        },
    }


if __name__ == "__main__":
    path, version = sys.argv[1:3]
    with open(path) as upstream:
        (crd,) = [doc for doc in yaml.safe_load_all(upstream) if doc]
    json.dump(vendored(crd, version), sys.stdout, sort_keys=True, separators=(",", ":"))
    sys.stdout.write("\n")
