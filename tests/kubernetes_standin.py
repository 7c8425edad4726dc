"""A STAND-IN for the Kubernetes API server with Kubeflow Trainer v2 and KServe installed (not a real cluster).

It answers the HTTP calls the `kubeflow` SDK's `TrainerClient` makes (TrainJobs, training runtimes,
pods, pod logs, events) and enforces what the real server does for them: objects live in their
namespace (another namespace does not see them), a second create of one name is a 409 conflict,
and a missing object is a 404 `Status`. Its "controller" plays the Trainer's part: for each
TrainJob it starts one node per `numNodes`, running the job's own command for real as a local
process with the `PET_*` environment the torch-distributed runtime sets (one process per node, on
the CPU), reports the nodes as pods, node 0's output as its log, and the job Complete or Failed
by the nodes' exit codes. `schedulable=False` leaves every pod Pending with a FailedScheduling
event, as a cluster without free GPUs does.

KServe InferenceServices (serving.kserve.io/v1beta1) and LLMInferenceServices (v1alpha2, the
storage version from KServe 0.17) are stored objects (no controller serves them): get, create
(409 when the name exists in the namespace) and JSON merge patches, which bump `resourceVersion`
and are refused with 409 when they carry a `resourceVersion` that is no longer current, as the
real server's optimistic concurrency does. A kind asked for at a version its CRD does not serve
is a 404, as on the real server.

OpenAPI v3, for what a client may learn of the installed CRDs (`crds`, files of tests/upstream):
`GET /openapi/v3` lists a document per group-version, `{"paths": {"apis/G/V": {"serverRelativeURL":
"/openapi/v3/apis/G/V?hash=..."}}}` (k8s.io/kube-openapi pkg/handler3, as kube-apiserver 1.27+
serves it), and each document holds the CRD's schema under components.schemas, named by the
reversed group, version and kind, marked with `x-kubernetes-group-version-kind`
(apiextensions-apiserver's OpenAPI builder).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self
from urllib.parse import parse_qs, urlparse

TRAINER = "/apis/trainer.kubeflow.org/v1alpha1"
# plural -> the version its CRD serves here (KServe 0.17: config/crd/full)
SERVING_VERSIONS = {"inferenceservices": "v1beta1", "llminferenceservices": "v1alpha2"}
SERVING_PATH = re.compile(
    r"/apis/serving\.kserve\.io/(?P<version>[^/]+)/namespaces/(?P<namespace>[^/]+)/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?"
)
JOBSET_NAME = "jobset.sigs.k8s.io/jobset-name"
RJOB_NAME = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX = "batch.kubernetes.io/job-completion-index"

TORCH_DISTRIBUTED = {
    "apiVersion": "trainer.kubeflow.org/v1alpha1",
    "kind": "ClusterTrainingRuntime",
    "metadata": {"name": "torch-distributed", "labels": {"trainer.kubeflow.org/framework": "torch"}},
    "spec": {
        "mlPolicy": {"numNodes": 1, "torch": {"numProcPerNode": "auto"}},
        "template": {
            "spec": {
                "replicatedJobs": [
                    {
                        "name": "node",
                        "template": {
                            "metadata": {
                                "labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
                            },
                            "spec": {
                                "template": {
                                    "spec": {
                                        "containers": [{"name": "node", "image": "pytorch/pytorch:2.7.1"}]
                                    }
                                }
                            },
                        },
                    }
                ]
            }
        },
    },
}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Node:
    """One TrainJob node: a local process running the job's command, or a pod never scheduled."""

    def __init__(self, job: dict, index: int, master_port: int, log_dir: Path, schedulable: bool):
        self.name = f"{job['metadata']['name']}-node-0-{index}-x{index}"
        self.index = index
        self.log = log_dir / f"{self.name}.log"
        self.process = None
        if schedulable:
            trainer = job["spec"]["trainer"]
            env = {
                **os.environ,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                "PET_NNODES": str(trainer["numNodes"]),
                "PET_NPROC_PER_NODE": "1",
                "PET_NODE_RANK": str(index),
                "PET_MASTER_ADDR": "127.0.0.1",
                "PET_MASTER_PORT": str(master_port),
                **{e["name"]: e["value"] for e in trainer.get("env", []) if "value" in e},
            }
            with self.log.open("w") as out:
                self.process = subprocess.Popen(
                    trainer["command"], env=env, stdout=out, stderr=subprocess.STDOUT
                )

    @property
    def phase(self) -> str:
        if self.process is None:
            return "Pending"
        code = self.process.poll()
        return "Running" if code is None else "Succeeded" if code == 0 else "Failed"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class KubernetesStandIn:
    """The stand-in server; `url` is its address. Use as a context manager."""

    def __init__(self, log_dir: Path, schedulable: bool = True, crds: tuple[str, ...] = ()):
        self.log_dir = log_dir
        self.schedulable = schedulable
        self.openapi = openapi_documents(crds)
        self.trainjobs: dict[tuple[str, str], dict] = {}
        self.nodes: dict[tuple[str, str], list[Node]] = {}
        self.events: dict[str, list[dict]] = {}
        self.deleted: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.inference_services: dict[tuple[str, str], dict] = {}
        self.llm_inference_services: dict[tuple[str, str], dict] = {}
        self.serving = {
            "inferenceservices": self.inference_services,
            "llminferenceservices": self.llm_inference_services,
        }
        self.patches: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> Self:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        for nodes in self.nodes.values():
            for node in nodes:
                node.stop()

    # -- the controller ------------------------------------------------------------------------

    def create_trainjob(self, namespace: str, body: dict) -> tuple[int, dict]:
        name = body["metadata"]["name"]
        with self.lock:
            if (namespace, name) in self.trainjobs:
                return 409, status(
                    409, "AlreadyExists", f'trainjobs.trainer.kubeflow.org "{name}" already exists'
                )
            job = json.loads(json.dumps(body))
            job["metadata"].update(namespace=namespace, creationTimestamp=now(), uid=f"uid-{name}")
            self.trainjobs[(namespace, name)] = job
            self.created.append(job)
            port = free_port()
            self.nodes[(namespace, name)] = [
                Node(job, i, port, self.log_dir, self.schedulable)
                for i in range(job["spec"]["trainer"]["numNodes"])
            ]
            if not self.schedulable:
                self.events.setdefault(namespace, []).extend(
                    event(namespace, "Pod", node.name, "FailedScheduling",
                          "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
                    for node in self.nodes[(namespace, name)]
                )  # fmt: skip
            return 201, job

    def observed(self, namespace: str, name: str) -> dict:
        """The TrainJob with the status the Trainer controller would give it now."""
        job = self.trainjobs[(namespace, name)]
        phases = [node.phase for node in self.nodes[(namespace, name)]]
        if all(phase in ("Succeeded", "Failed") for phase in phases) and "conditions" not in job.get(
            "status", {}
        ):
            failed = [node for node in self.nodes[(namespace, name)] if node.phase == "Failed"]
            kind = "Failed" if failed else "Complete"
            message = f"{len(failed)} node(s) failed" if failed else "all nodes succeeded"
            job["status"] = {"conditions": [condition(kind, message)]}
            for node in failed:
                self.events.setdefault(namespace, []).append(
                    event(namespace, "Pod", node.name, "BackoffLimitExceeded",
                          f"container node exited with code {node.process.returncode}")
                )  # fmt: skip
        return job

    def pods(self, namespace: str, job_name: str) -> list[dict]:
        return [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": node.name,
                    "namespace": namespace,
                    "creationTimestamp": now(),
                    "labels": {JOBSET_NAME: job_name, RJOB_NAME: "node", JOB_INDEX: str(node.index)},
                },
                "spec": {"containers": [{"name": "node", "image": "cai"}]},
                "status": {"phase": node.phase},
            }
            for node in self.nodes.get((namespace, job_name), [])
        ]

    # -- KServe ------------------------------------------------------------------------------------

    def create_inference_service(
        self, namespace: str, body: dict, plural: str = "inferenceservices"
    ) -> tuple[int, dict]:
        name = body["metadata"]["name"]
        store = self.serving[plural]
        with self.lock:
            if (namespace, name) in store:
                return 409, status(
                    409, "AlreadyExists", f'{plural}.serving.kserve.io "{name}" already exists'
                )
            obj = json.loads(json.dumps(body))
            obj["metadata"].update(namespace=namespace, resourceVersion="1", creationTimestamp=now())
            store[(namespace, name)] = obj
            return 201, obj

    def patch_inference_service(
        self, namespace: str, name: str, patch: dict, plural: str = "inferenceservices"
    ) -> tuple[int, dict]:
        store = self.serving[plural]
        with self.lock:
            current = store.get((namespace, name))
            if current is None:
                return 404, status(404, "NotFound", f'{plural}.serving.kserve.io "{name}" not found')
            wanted = patch.get("metadata", {}).get("resourceVersion")
            if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
                return 409, status(409, "Conflict", f'Operation cannot be fulfilled on {plural} "{name}": '
                                   "the object has been modified; please apply your changes to the latest version")  # fmt: skip
            merged = merge_patch(current, patch)
            merged["metadata"]["resourceVersion"] = str(int(current["metadata"]["resourceVersion"]) + 1)
            store[(namespace, name)] = merged
            self.patches.append(patch)
            return 200, merged

    # -- HTTP ------------------------------------------------------------------------------------

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, code: int, body: object, content_type: str = "application/json") -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self.reply(*standin.get(urlparse(self.path)))

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if serving := standin.serving_path(urlparse(self.path).path):
                    if serving["name"]:
                        self.reply(405, status(405, "MethodNotAllowed", self.path))
                        return
                    self.reply(
                        *standin.create_inference_service(serving["namespace"], body, serving["plural"])
                    )
                    return
                match = re.fullmatch(rf"{TRAINER}/namespaces/([^/]+)/trainjobs", urlparse(self.path).path)
                if not match:
                    self.reply(404, status(404, "NotFound", self.path))
                    return
                self.reply(*standin.create_trainjob(match.group(1), body))

            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                match = standin.serving_path(urlparse(self.path).path)
                if (
                    not match
                    or not match["name"]
                    or self.headers["Content-Type"] != "application/merge-patch+json"
                ):
                    self.reply(415 if match else 404, status(415 if match else 404, "Unsupported", self.path))
                    return
                self.reply(
                    *standin.patch_inference_service(match["namespace"], match["name"], body, match["plural"])
                )

            def do_DELETE(self):
                match = re.fullmatch(
                    rf"{TRAINER}/namespaces/([^/]+)/trainjobs/([^/]+)", urlparse(self.path).path
                )
                key = match and (match.group(1), match.group(2))
                with standin.lock:
                    if not key or key not in standin.trainjobs:
                        self.reply(404, status(404, "NotFound", self.path))
                        return
                    standin.trainjobs.pop(key)
                    for node in standin.nodes.pop(key):
                        node.stop()
                    standin.deleted.append(key)
                self.reply(200, status(200, "Success", "deleted"))

        return Handler

    @staticmethod
    def serving_path(path: str) -> dict | None:
        """version, namespace, plural and name (or None) of a KServe object path this server
        serves; None for any other path, and for a kind asked for at a version its CRD lacks."""
        match = SERVING_PATH.fullmatch(path)
        if not match or SERVING_VERSIONS.get(match["plural"]) != match["version"]:
            return None
        return match.groupdict()

    def get(self, url) -> tuple[int, object]:
        path, query = url.path, parse_qs(url.query)
        if path == "/openapi/v3":
            return 200, {
                "paths": {
                    group_version: {"serverRelativeURL": f"/openapi/v3/{group_version}?hash=0123ABCD"}
                    for group_version in ("api/v1", *self.openapi)
                }
            }
        if path.startswith("/openapi/v3/apis/") and path.removeprefix("/openapi/v3/") in self.openapi:
            return 200, self.openapi[path.removeprefix("/openapi/v3/")]
        if path == "/api/v1/namespaces/kubeflow-system/configmaps/kubeflow-trainer-public":
            return 200, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kubeflow-trainer-public"},
                         "data": {"kubeflow_trainer_version": "v2.1.0"}}  # fmt: skip
        if (serving := self.serving_path(path)) and serving["name"]:
            key, store = (serving["namespace"], serving["name"]), self.serving[serving["plural"]]
            with self.lock:
                if key not in store:
                    return 404, status(404, "NotFound", f'{serving["plural"]} "{serving["name"]}" not found')
                return 200, store[key]
        if path == f"{TRAINER}/clustertrainingruntimes/torch-distributed":
            return 200, TORCH_DISTRIBUTED
        if match := re.fullmatch(rf"{TRAINER}/namespaces/([^/]+)/trainjobs", path):
            wanted = dict(
                item.split("=", 1) for item in query.get("labelSelector", [""])[0].split(",") if item
            )
            with self.lock:
                items = [
                    self.observed(ns, name)
                    for (ns, name), job in self.trainjobs.items()
                    if ns == match.group(1) and wanted.items() <= job["metadata"].get("labels", {}).items()
                ]
            return 200, {
                "apiVersion": "trainer.kubeflow.org/v1alpha1",
                "kind": "TrainJobList",
                "items": items,
            }
        if match := re.fullmatch(rf"{TRAINER}/namespaces/([^/]+)/trainjobs/([^/]+)", path):
            with self.lock:
                if match.groups() not in self.trainjobs:
                    return 404, status(404, "NotFound", f'trainjobs "{match.group(2)}" not found')
                return 200, self.observed(*match.groups())
        if match := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path):
            selector = query.get("labelSelector", [""])[0]
            job_name = re.search(rf"{re.escape(JOBSET_NAME)}=([^,]+)", selector)
            pods = self.pods(match.group(1), job_name.group(1)) if job_name else []
            return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods}
        if match := re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path):
            for (ns, _), nodes in self.nodes.items():
                for node in nodes:
                    if ns == match.group(1) and node.name == match.group(2):
                        if query.get("follow", [""])[0].lower() == "true" and node.process is not None:
                            node.process.wait()
                        return 200, node.log.read_text(), "text/plain"
            return 404, status(404, "NotFound", path)
        if match := re.fullmatch(r"/api/v1/namespaces/([^/]+)/events", path):
            return 200, {"apiVersion": "v1", "kind": "EventList", "metadata": {},
                         "items": self.events.get(match.group(1), [])}  # fmt: skip
        return 404, status(404, "NotFound", path)


def openapi_documents(crds: tuple[str, ...]) -> dict[str, dict]:
    """The OpenAPI v3 document of each group-version ("apis/G/V") the CRDs (files of tests/upstream) serve."""
    documents: dict[str, dict] = {}
    for filename in crds:
        crd = json.loads((Path(__file__).parent / "upstream" / filename).read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            name = ".".join([*reversed(group.split(".")), version["name"], kind])
            schema = {
                **version["schema"]["openAPIV3Schema"],
                "x-kubernetes-group-version-kind": [
                    {"group": group, "kind": kind, "version": version["name"]}
                ],
            }
            document = documents.setdefault(
                f"apis/{group}/{version['name']}",
                {
                    "openapi": "3.0.0",
                    "info": {"title": "Kubernetes", "version": "v1.31.0"},
                    "paths": {},
                    "components": {"schemas": {}},
                },
            )
            document["components"]["schemas"][name] = schema
    return documents


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    merged = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = merge_patch(merged.get(key), value)
    return merged


def status(code: int, reason: str, message: str) -> dict:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure" if code >= 400 else "Success",
            "code": code, "reason": reason, "message": message, "metadata": {}}  # fmt: skip


def condition(kind: str, message: str) -> dict:
    return {"type": kind, "status": "True", "reason": kind, "message": message, "lastTransitionTime": now()}


def event(namespace: str, kind: str, name: str, reason: str, message: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{name}.{reason.lower()}", "namespace": namespace},
        "involvedObject": {"kind": kind, "name": name, "namespace": namespace},
        "reason": reason,
        "message": message,
        "firstTimestamp": now(),
        "type": "Warning",
    }
