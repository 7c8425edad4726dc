"""A STAND-IN for the Kubeflow Pipelines API server (`ml-pipeline`), not a real KFP installation.

A real HTTP server on 127.0.0.1 that answers the v2beta1 REST calls the `kfp` 2.17 SDK's
`kfp.Client` makes when `cai submit` runs: healthz, pipelines (list, create, get, multipart
upload), pipeline versions (list, multipart upload), experiments (create, list, get) and runs
(create, get, list: `cai retrain` looks a claim's run up by its display name). It keeps everything in memory and records every pipeline version created
(`versions`) and every request (`requests`), so tests can count what a submit did.

What it enforces is what KFP's API server (kubeflow/pipelines 2.17, backend/src/apiserver) does:

- Multi-user mode (`multi_user=True`, KFP's `MULTIUSER`): every list and create of pipelines,
  experiments and runs belongs to a namespace. An experiment without one is a 400 ("An experiment
  cannot have an empty namespace in multi-user mode", experiment_server.go `canAccessExperiment`),
  a run without an experiment id is a 400 (resource_manager.go `GetValidExperimentNamespacePair`),
  and a pipeline list/create/upload without one is a 400 ("Namespace is required for pipeline
  operations", validation/namespace.go) when `require_namespace_for_pipelines` is on (KFP's
  `REQUIRE_NAMESPACE_FOR_PIPELINES`, kubeflow/pipelines#12202). With it off (KFP's default) a
  pipeline without a namespace is a *shared* pipeline: listed only by requests without a
  namespace, readable by everyone, and created through POST /pipelines only by a user who may
  write in KFP's own namespace (`kfp_namespace`), through upload by anyone (pipeline_server.go
  `canAccessPipeline`, pipeline_upload_server.go `canUploadVersionedPipeline`).
- Lists return only the requested namespace's objects; an object in another namespace is
  invisible to them. Reaching one by id (a pipeline's versions, a run) checks the caller's access
  to its namespace.
- Authentication, when `users` is given (bearer token -> the namespaces that user may use, as a
  Kubeflow Profile's contributors): a namespaced call without a known token is a 401, one for a
  namespace the user may not use a 403 (resource_manager.go `IsAuthorized`), except on the two
  upload endpoints, which answer authorization failures with 400 like the real ones. Without
  `users` every caller may use every namespace.
- Names: a pipeline name is unique within its namespace (unique index `namespace_name`) and a
  version name within its pipeline (`idx_pipelineid_name`); a duplicate is a 409 conflict.
- An upload (POST /pipelines/upload) creates the pipeline *and* a first version named after the
  pipeline (pipeline_upload_server.go); POST /pipelines creates a pipeline with no version.
- Single-user mode ignores namespaces (resource_manager.go `ReplaceNamespace`).

GET /apis/v2beta1/healthz answers as the real server's HTTP handler does (backend/src/apiserver/
main.go `healthzResponse`, 2.17.0): `commit_sha`, `tag_name` (the release the API server was built
as, `tag_name=` here; "unknown" for a build that sets none), `multi_user`, `pipeline_store`.

Errors carry the JSON body of the real server: grpc-gateway's `{"code", "message", ...}` on the
generated endpoints, `{"error_message", "error_details"}` on the upload endpoints.

Not modelled: run execution (a run stays PENDING), the v1beta1 API, archived/deleted objects,
recurring runs, filters other than EQUALS on name/display_name, and checks of the pipeline spec
beyond "a YAML/JSON document with pipelineInfo".
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import datetime, timezone
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"
# google.rpc codes grpc-gateway puts beside the HTTP status.
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13}
# Fields a v2beta1 filter may compare, per kind (model/*.go APIToModelFieldMap, the ones used here).
FILTER_KEYS = {"name", "display_name"}


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _public(record: dict, hidden: tuple[str, ...] = ()) -> dict:
    """The record as the API returns it: protojson leaves out empty fields."""
    return {k: v for k, v in record.items() if k not in hidden and v not in ("", None)}


class KfpStandin:
    """In-memory KFP API server; `start()` serves it on 127.0.0.1 at `url`."""

    def __init__(
        self,
        multi_user: bool = False,
        require_namespace_for_pipelines: bool = True,
        users: dict[str, set[str]] | None = None,
        kfp_namespace: str = "kubeflow",
        tag_name: str = "2.17.0",
    ):
        self.tag_name = tag_name
        self.multi_user = multi_user
        self.require_namespace_for_pipelines = require_namespace_for_pipelines
        self.users = users
        self.kfp_namespace = kfp_namespace
        self.pipelines: list[dict] = []
        self.versions: list[dict] = []  # every version ever created, in order; "package" holds its text
        self.experiments: list[dict] = []
        self.runs: list[dict] = []  # "namespace" is the run's (from its experiment), not an API field
        self.requests: list[dict] = []  # method, path, query (first value of each), token, status
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                standin._serve(self, "GET")

            def do_POST(self):
                standin._serve(self, "POST")

            def do_DELETE(self):
                standin._serve(self, "DELETE")

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the stand-in first"
        return f"http://127.0.0.1:{self._server.server_port}"

    # --- what tests read ---------------------------------------------------------------------

    def pipelines_in(self, namespace: str) -> list[dict]:
        return [p for p in self.pipelines if p["namespace"] == namespace]

    def versions_of(self, pipeline_id: str) -> list[dict]:
        return [v for v in self.versions if v["pipeline_id"] == pipeline_id]

    def runs_in(self, namespace: str) -> list[dict]:
        return [r for r in self.runs if r["namespace"] == namespace]

    def package_of(self, version_id: str) -> str:
        return next(v["package"] for v in self.versions if v["pipeline_version_id"] == version_id)

    def pipeline_of_version(self, version_id: str) -> dict:
        version = next(v for v in self.versions if v["pipeline_version_id"] == version_id)
        return next(p for p in self.pipelines if p["pipeline_id"] == version["pipeline_id"])

    # --- HTTP --------------------------------------------------------------------------------

    def _serve(self, request: BaseHTTPRequestHandler, method: str) -> None:
        parsed = urlparse(request.path)
        query = {k: v[0] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()}
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        token = (request.headers.get("Authorization") or "").removeprefix("Bearer ").strip() or None
        upload = parsed.path in (f"{API}/pipelines/upload", f"{API}/pipelines/upload_version")
        try:
            with self._lock:
                status, payload = 200, self._route(method, parsed.path, query, token, request.headers, body)
        except ApiError as err:
            status = err.status
            if upload:
                payload = {"error_message": err.message, "error_details": err.message}
            else:
                payload = {
                    "error": err.message,
                    "code": GRPC_CODES.get(status, 2),
                    "message": err.message,
                    "details": [],
                }
        with self._lock:
            self.requests.append(
                {"method": method, "path": parsed.path, "query": query, "token": token, "status": status}
            )
        data = json.dumps(payload).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def _route(self, method: str, path: str, query: dict, token: str | None, headers, body: bytes) -> dict:
        if not path.startswith(API + "/"):
            raise ApiError(404, "Not Found")
        parts = path[len(API) + 1 :].split("/")
        match method, parts:
            case "GET", ["healthz"]:
                return {
                    "commit_sha": "0000000000000000000000000000000000000000",
                    "tag_name": self.tag_name,
                    "multi_user": self.multi_user,
                    "pipeline_store": "database",
                }
            case "GET", ["pipelines"]:
                return self._list_pipelines(query, token)
            case "POST", ["pipelines"]:
                return self._create_pipeline(json.loads(body or b"{}"), token)
            case "POST", ["pipelines", "upload"]:
                return self._upload_pipeline(query, token, self._uploaded_file(headers, body, "pipeline"))
            case "POST", ["pipelines", "upload_version"]:
                return self._upload_version(
                    query, token, self._uploaded_file(headers, body, "pipeline version")
                )
            case "GET", ["pipelines", pipeline_id]:
                pipeline = self._pipeline(pipeline_id)
                self._authorize_pipeline(token, pipeline["namespace"], write=False)
                return _public(pipeline)
            case "GET", ["pipelines", pipeline_id, "versions"]:
                return self._list_versions(pipeline_id, query, token)
            case "GET", ["experiments"]:
                return self._list_experiments(query, token)
            case "POST", ["experiments"]:
                return self._create_experiment(json.loads(body or b"{}"), token)
            case "GET", ["experiments", experiment_id]:
                experiment = self._experiment(experiment_id)
                self._authorize(token, experiment["namespace"])
                return _public(experiment)
            case "POST", ["runs"]:
                return self._create_run(json.loads(body or b"{}"), token)
            case "GET", ["runs"]:
                return self._list_runs(query, token)
            case "GET", ["runs", run_id]:
                run = next((r for r in self.runs if r["run_id"] == run_id), None)
                if run is None:
                    raise ApiError(404, f"Run {run_id} not found")
                self._authorize(token, run["namespace"])
                return _public(run, hidden=("namespace",))
        raise ApiError(404, "Not Found")

    # --- namespaces and authorization ----------------------------------------------------------

    def _namespace(self, given: str | None) -> str:
        """ReplaceNamespace: single-user mode has no namespaces."""
        return (given or "") if self.multi_user else ""

    def _pipeline_namespace(self, given: str | None) -> str:
        namespace = self._namespace(given)
        if self.multi_user and self.require_namespace_for_pipelines and not namespace:
            raise ApiError(400, "Invalid input error: Namespace is required for pipeline operations")
        return namespace

    def _authorize(self, token: str | None, namespace: str) -> None:
        """IsAuthorized (SubjectAccessReview) for `namespace`: 401 without a known user, 403 outside
        the user's namespaces."""
        if not self.multi_user:
            return
        if not namespace:
            raise ApiError(
                400, "Invalid input error: a resource cannot have an empty namespace in multi-user mode"
            )
        if self.users is None:
            return
        if token not in self.users:
            raise ApiError(401, "Failed to check authorization. User identity is empty in the request header")
        if namespace not in self.users[token]:
            raise ApiError(
                403, f"User is not authorized to access namespace {namespace}: Unauthorized access"
            )

    def _authorize_pipeline(self, token: str | None, namespace: str, write: bool) -> None:
        """canAccessPipeline: shared pipelines (no namespace) are readable by all; writing them needs
        rights in KFP's own namespace."""
        if not self.multi_user:
            return
        if not namespace:
            if write:
                self._authorize(token, self.kfp_namespace)
            return
        self._authorize(token, namespace)

    def _authorize_upload(self, token: str | None, namespace: str) -> None:
        """canUploadVersionedPipeline: skipped for shared pipelines; failures are 400s."""
        if not namespace:
            return
        try:
            self._authorize(token, namespace)
        except ApiError as err:
            raise ApiError(
                400, f"Failed to create a pipeline due to authorization error: {err.message}"
            ) from None

    # --- lists ---------------------------------------------------------------------------------

    @staticmethod
    def _filtered(records: list[dict], filter_json: str | None) -> list[dict]:
        """The records a v2beta1 filter (JSON `{"predicates": [...]}`) selects; a 400 for a filter
        the stand-in does not know, whether or not there is anything to filter."""
        wanted: dict[str, str] = {}
        try:
            predicates = json.loads(filter_json).get("predicates", []) if filter_json else []
        except (ValueError, AttributeError):
            raise ApiError(400, f"Invalid input error: invalid filter {filter_json!r}") from None
        for predicate in predicates:
            key, operation = predicate.get("key"), predicate.get("operation")
            if key not in FILTER_KEYS or operation not in ("EQUALS", 1):  # the enum by name or number
                raise ApiError(400, f"Invalid input error: unsupported filter {predicate}")
            wanted[key] = predicate.get("stringValue", predicate.get("string_value"))
        return [r for r in records if all(r.get(key) == value for key, value in wanted.items())]

    @staticmethod
    def _page(records: list[dict], key: str, query: dict, hidden: tuple[str, ...] = ()) -> dict:
        size = int(query.get("page_size") or 0) or 20
        start = int(query.get("page_token") or 0)
        page = records[start : start + size]
        response: dict = {}
        if page:
            response[key] = [_public(r, hidden) for r in page]
        if records:
            response["total_size"] = len(records)
        if start + size < len(records):
            response["next_page_token"] = str(start + size)
        return response

    # --- pipelines -----------------------------------------------------------------------------

    def _pipeline(self, pipeline_id: str) -> dict:
        pipeline = next((p for p in self.pipelines if p["pipeline_id"] == pipeline_id), None)
        if pipeline is None:
            raise ApiError(404, f"Pipeline {pipeline_id} not found")
        return pipeline

    def _list_pipelines(self, query: dict, token: str | None) -> dict:
        namespace = self._pipeline_namespace(query.get("namespace"))
        self._authorize_pipeline(token, namespace, write=False)
        found = self._filtered(self.pipelines_in(namespace), query.get("filter"))
        return self._page(found, "pipelines", query)

    def _add_pipeline(self, name: str, display_name: str, description: str, namespace: str) -> dict:
        if any(p["namespace"] == namespace and p["name"] == name for p in self.pipelines):
            raise ApiError(
                409, f"Already exist error: Failed to create a new pipeline. The name {name} already exist."
            )
        pipeline = {
            "pipeline_id": str(uuid.uuid4()),
            "name": name,
            "display_name": display_name,
            "description": description,
            "created_at": _now(),
            "namespace": namespace,
        }
        self.pipelines.append(pipeline)
        return pipeline

    def _add_version(
        self, pipeline: dict, name: str, display_name: str, description: str, package: str
    ) -> dict:
        pipeline_id = pipeline["pipeline_id"]
        if any(v["pipeline_id"] == pipeline_id and v["name"] == name for v in self.versions):
            raise ApiError(
                409,
                f"Already exist error: Failed to create a new pipeline version. The name {name} already exist.",
            )
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "name": name,
            "display_name": display_name,
            "description": description,
            "created_at": _now(),
            "package": package,
        }
        self.versions.append(version)
        return version

    def _create_pipeline(self, body: dict, token: str | None) -> dict:
        name = body.get("name") or body.get("display_name") or ""
        namespace = self._pipeline_namespace(body.get("namespace"))
        if not name:
            raise ApiError(400, "Invalid input error: name is required")
        self._authorize_pipeline(token, namespace, write=True)
        pipeline = self._add_pipeline(
            name, body.get("display_name") or name, body.get("description") or "", namespace
        )
        return _public(pipeline)

    @staticmethod
    def _uploaded_file(headers, body: bytes, what: str) -> tuple[str, str]:
        """(file name, text) of the multipart form's `uploadfile`, checked to be a pipeline spec."""
        content_type = headers.get("Content-Type") or ""
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        parts = [
            p
            for p in message.iter_parts()
            if p.get_param("name", header="content-disposition") == "uploadfile"
        ]
        if not parts:
            raise ApiError(400, f"Failed to create a {what}: failed to read pipeline from file")
        text = parts[0].get_payload(decode=True).decode()
        try:
            spec = next(yaml.safe_load_all(text))
        except (yaml.YAMLError, StopIteration):
            spec = None
        if not isinstance(spec, dict) or not spec.get("pipelineInfo", {}).get("name"):
            raise ApiError(400, f"Failed to create a {what}: failed to read a pipeline spec file")
        return parts[0].get_filename() or "pipeline.yaml", text

    def _upload_pipeline(self, query: dict, token: str | None, upload: tuple[str, str]) -> dict:
        filename, package = upload
        namespace = self._pipeline_namespace(query.get("namespace"))
        self._authorize_upload(token, namespace)
        name = query.get("name") or query.get("display_name") or filename
        display_name = query.get("display_name") or name
        description = query.get("description") or ""
        pipeline = self._add_pipeline(name, display_name, description, namespace)
        # The upload's package becomes the pipeline's first version, named as the pipeline.
        self._add_version(pipeline, name, display_name, description, package)
        return _public(pipeline)

    def _upload_version(self, query: dict, token: str | None, upload: tuple[str, str]) -> dict:
        filename, package = upload
        pipeline_id = query.get("pipelineid")
        if not pipeline_id:
            raise ApiError(400, "Failed to create a pipeline version: pipeline id is missing")
        name = query.get("name") or query.get("display_name") or filename
        try:
            pipeline = self._pipeline(pipeline_id)
        except ApiError:
            raise ApiError(400, "Failed to create a pipeline version: unknown pipeline") from None
        self._authorize_upload(token, pipeline["namespace"])
        version = self._add_version(
            pipeline, name, query.get("display_name") or name, query.get("description") or "", package
        )
        return _public(version, hidden=("package",))

    def _list_versions(self, pipeline_id: str, query: dict, token: str | None) -> dict:
        pipeline = self._pipeline(pipeline_id)
        self._authorize_pipeline(token, pipeline["namespace"], write=False)
        found = self._filtered(self.versions_of(pipeline_id), query.get("filter"))
        return self._page(found, "pipeline_versions", query, hidden=("package",))

    # --- experiments ---------------------------------------------------------------------------

    def _experiment(self, experiment_id: str) -> dict:
        experiment = next((e for e in self.experiments if e["experiment_id"] == experiment_id), None)
        if experiment is None:
            raise ApiError(404, f"Experiment {experiment_id} not found")
        return experiment

    def _experiment_namespace(self, given: str | None) -> str:
        namespace = self._namespace(given)
        if self.multi_user and not namespace:
            raise ApiError(
                400, "Invalid input error: An experiment cannot have an empty namespace in multi-user mode"
            )
        return namespace

    def _list_experiments(self, query: dict, token: str | None) -> dict:
        namespace = self._experiment_namespace(query.get("namespace"))
        self._authorize(token, namespace)
        found = self._filtered(
            [e for e in self.experiments if e["namespace"] == namespace], query.get("filter")
        )
        return self._page(found, "experiments", query)

    def _add_experiment(self, name: str, description: str, namespace: str) -> dict:
        if any(e["namespace"] == namespace and e["display_name"] == name for e in self.experiments):
            raise ApiError(
                409,
                f"Already exist error: Failed to create a new experiment. The name {name} already exists.",
            )
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": name,
            "description": description,
            "created_at": _now(),
            "namespace": namespace,
            "storage_state": "AVAILABLE",
        }
        self.experiments.append(experiment)
        return experiment

    def _create_experiment(self, body: dict, token: str | None) -> dict:
        namespace = self._experiment_namespace(body.get("namespace"))
        self._authorize(token, namespace)
        name = body.get("display_name") or ""
        if not name:
            raise ApiError(
                400, "Invalid input error: Experiment name is empty. Please specify a valid experiment name"
            )
        return _public(self._add_experiment(name, body.get("description") or "", namespace))

    # --- runs ----------------------------------------------------------------------------------

    def _list_runs(self, query: dict, token: str | None) -> dict:
        """ListRuns (run_server.go): the runs of a namespace (single-user: all), or of one
        experiment; filtered by display_name as `model/run.go`'s APIToModelFieldMap allows."""
        namespace = self._namespace(query.get("namespace"))
        experiment_id = query.get("experiment_id") or ""
        if experiment_id:
            namespace = self._experiment(experiment_id)["namespace"]
        elif self.multi_user and not namespace:
            raise ApiError(400, "Invalid input error: ListRuns must filter by resource reference in multi-user mode")
        self._authorize(token, namespace)
        runs = [
            r
            for r in self.runs
            if r["namespace"] == namespace and (not experiment_id or r["experiment_id"] == experiment_id)
        ]
        return self._page(self._filtered(runs, query.get("filter")), "runs", query, hidden=("namespace",))

    def _create_run(self, body: dict, token: str | None) -> dict:
        if not body.get("display_name"):
            raise ApiError(400, "Invalid input error: The run name is empty. Please specify a valid name")
        experiment_id = body.get("experiment_id") or ""
        if self.multi_user and not experiment_id:
            raise ApiError(400, "Invalid input error: Experiment id can not be empty in multi-user mode")
        if experiment_id:
            experiment = self._experiment(experiment_id)
        else:  # single-user: the default experiment, created when missing
            default = [e for e in self.experiments if e["display_name"] == "Default"]
            experiment = default[0] if default else self._add_experiment("Default", "", "")
        namespace = experiment["namespace"]
        self._authorize(token, namespace)
        reference = body.get("pipeline_version_reference") or {}
        if reference:
            version_id = reference.get("pipeline_version_id")
            if not any(v["pipeline_version_id"] == version_id for v in self.versions):
                raise ApiError(500, "Failed to create a run due to error fetching manifest")
        elif not body.get("pipeline_spec"):
            raise ApiError(400, "Invalid input error: a run needs a pipeline spec or a pipeline version")
        run = {
            "run_id": str(uuid.uuid4()),
            "display_name": body["display_name"],
            "description": body.get("description") or "",
            "experiment_id": experiment["experiment_id"],
            "pipeline_version_reference": reference or None,
            "pipeline_spec": body.get("pipeline_spec"),
            "runtime_config": body.get("runtime_config") or {},
            "service_account": body.get("service_account") or "",
            "storage_state": "AVAILABLE",
            "state": "PENDING",
            "created_at": _now(),
            "namespace": namespace,
        }
        self.runs.append(run)
        return _public(run, hidden=("namespace",))
