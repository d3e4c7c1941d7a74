"""Offline checks of the KubeRay manifests: CRD schemas (strict about unknown fields, as
`kubectl apply --validate=strict`), the Serve config schema, and that what they reference exists."""

from __future__ import annotations

import copy
import importlib
import shlex
from functools import lru_cache
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGE_REPO_DIR = "/home/ray/rayquant/"  # where the Dockerfile puts the repo
CRDS = Path(__file__).parent / "data" / "kuberay-crds"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}


def _strict(schema: dict) -> dict:
    """Forbid properties a schema does not declare, unless it preserves unknown fields."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@lru_cache(maxsize=None)
def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load((CRDS / CRD_FILES[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(version["schema"]["openAPIV3Schema"])


def validate_crd(manifest: dict) -> None:
    assert manifest["apiVersion"] == "ray.io/v1", manifest["apiVersion"]
    jsonschema.validate(manifest, crd_schema(manifest["kind"]))


def cluster_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
            "RayService": spec.get("rayClusterConfig")}[manifest["kind"]]


def gpu_workers(manifest: dict) -> list[tuple[int, int]]:
    """(pods, GPUs per pod) of each worker group that requests GPUs; checks limits match rayStartParams."""
    out = []
    for group in cluster_spec(manifest)["workerGroupSpecs"]:
        declared = int(group.get("rayStartParams", {}).get("num-gpus", "0"))
        container = group["template"]["spec"]["containers"][0]
        limit = int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        if declared != limit:
            raise AssertionError(f"worker group {group['groupName']} declares num-gpus={declared} to Ray but "
                                 f"requests nvidia.com/gpu={limit} from Kubernetes")
        if limit:
            out.append((int(group["replicas"]), limit))
    return out


def pod_containers(manifest: dict) -> list[dict]:
    """Every container of the head and worker pod templates."""
    spec = cluster_spec(manifest)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def check_serve_config(text: str) -> list[dict]:
    """serveConfigV2 against Ray Serve's own schema; import paths resolve; app args validate."""
    from ray.serve.schema import ServeDeploySchema

    from serving.config import ServeConfig

    config = ServeDeploySchema.model_validate(yaml.safe_load(text)) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(yaml.safe_load(text))
    for path in config.grpc_options.grpc_servicer_functions:
        module, _, name = path.rpartition(".")
        getattr(importlib.import_module(module), name)
    args = []
    for app in config.applications:
        module, _, attr = app.import_path.partition(":")
        getattr(importlib.import_module(module), attr)
        args.append(ServeConfig.from_dict(app.args).__dict__)
    return args


def check_entrypoint(entrypoint: str):
    """The entrypoint parses with rayquant's CLI and its job file exists and validates; returns the job."""
    from cluster.cli import _overrides
    from cluster.job import load_job
    from rayquant.cli import parser

    argv = shlex.split(entrypoint)
    assert argv[0] == "rayquant", f"entrypoint must run rayquant, not {argv[0]}"
    args = parser().parse_args(argv[1:])
    config = Path(str(args.config).replace(IMAGE_REPO_DIR, str(REPO) + "/")) if args.config else None
    assert config is None or config.is_file(), f"job file {args.config} is not in the repository"
    return load_job(config, _overrides(args))


def load_manifest(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def broken(manifest: dict, edit) -> dict:
    copy_ = copy.deepcopy(manifest)
    edit(copy_)
    return copy_
