"""Every KubeRay manifest validates against the real CRD schemas; what it references exists and passes
rayquant's own validation; the 72B job's resources fit the plan. Broken variants are caught."""

from pathlib import Path

import jsonschema
import pytest

from cluster.driver import job_sizes
from cluster.plan import GB, plan_stages
from quantizer.layer_builder import padded_intermediate
from quantizer.model_io import CheckpointReader
from serving.proxy_hooks import proxy_env
from tests.k8s_checks import (REPO, broken, check_entrypoint, check_serve_config, cluster_spec, gpu_workers,
                              load_manifest, pod_containers, validate_crd)

MANIFESTS = sorted(p for p in (REPO / "k8s").rglob("*.yaml") if p.name != "pvc.yaml")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_manifest_is_valid(path: Path):
    manifest = load_manifest(path)
    validate_crd(manifest)
    assert cluster_spec(manifest)["rayVersion"] == __import__("ray").__version__
    workers = gpu_workers(manifest)
    if manifest["kind"] == "RayJob":
        job = check_entrypoint(manifest["spec"]["entrypoint"])
        assert manifest["spec"]["shutdownAfterJobFinishes"] and manifest["spec"]["backoffLimit"] >= 1
        if job.resources.gpus_per_stage:
            needed = job.resources.workers if job.resolved_schedule == "data_parallel" else job.stages
            assert sum(pods * gpus for pods, gpus in workers) >= needed * job.resources.gpus_per_stage
    if manifest["kind"] == "RayService":
        (args,) = check_serve_config(manifest["spec"]["serveConfigV2"])
        assert args["kv_cache_dtype"] == "int8" and args["engine"] == "transformers"
        assert args["autoscaling"]["max_replicas"] > args["autoscaling"]["min_replicas"] >= 1
        gpus = args["ray_actor_options"].get("num_gpus", 0)
        assert bool(gpus) == bool(workers), "replicas ask for GPUs that no worker group has (or the reverse)"
        ports = {p["port"] for p in manifest["spec"]["serveService"]["spec"]["ports"]}
        assert 9000 in ports
        check_exposed_and_locked(manifest, args)


def check_exposed_and_locked(manifest: dict, args: dict) -> None:
    """A RayService binds 0.0.0.0 on purpose (the Service routes to it): said in the app args and set on
    every pod for the gRPC proxies, with the API key from a Secret and Ray's metrics port open."""
    assert args["host"] == "0.0.0.0" and args["api_key_env"]
    assert "0.0.0.0" in manifest["spec"]["serveConfigV2"].split("http_options:")[1].split("applications:")[0]
    for container in pod_containers(manifest):
        env = {e["name"]: e for e in container.get("env", [])}
        assert {k: env[k].get("value") for k in proxy_env("0.0.0.0")} == proxy_env("0.0.0.0"), container["name"]
        assert env[args["api_key_env"]]["valueFrom"]["secretKeyRef"]["name"]
        assert 8080 in {p["containerPort"] for p in container.get("ports", [])}


def test_72b_job_resources_fit_the_plan(tmp_path):
    from tests.synthetic_checkpoint import QWEN2_72B, write_header_only_checkpoint

    manifest = load_manifest(REPO / "k8s" / "rayjob-quantize-72b.yaml")
    job = check_entrypoint(manifest["spec"]["entrypoint"])
    assert (job.resolved_schedule, job.resources.workers, job.quant.bits, job.quant.group_size) == (
        "data_parallel", 8, 4, 128)
    reader = CheckpointReader(write_header_only_checkpoint(tmp_path / "Qwen2-72B", QWEN2_72B))
    intermediate = padded_intermediate(reader.config, job.quant.pad_intermediate_to)
    assert intermediate == 29696 and intermediate // 8 % 128 == 0  # splits over 8 GPUs in g128 groups
    sizes = job_sizes(reader, job, intermediate, job.calibration.batch_size * job.calibration.max_len)
    plans = plan_stages(sizes, 1, int(job.resources.memory_per_stage_gb * GB))  # each worker: one layer at a time
    assert job.resources.workers == 8 == sum(pods * gpus for pods, gpus in gpu_workers(manifest))
    (group,) = cluster_spec(manifest)["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["cpu"]) >= job.resources.cpus_per_stage
    assert max(p.total_bytes for p in plans) <= 80 * GB  # each worker fits one 80 GB GPU
    activations = 128 * 2048 * 8192 * 2  # calibration activations at one layer boundary, bf16
    object_store = int(group["rayStartParams"]["object-store-memory"])
    assert object_store >= 2 * activations  # a layer's inputs and outputs
    assert int(limits["memory"].removesuffix("Gi")) * GB > object_store


def _raycluster():
    return load_manifest(REPO / "k8s" / "raycluster.yaml")


def test_unknown_field_is_caught():
    bad = broken(_raycluster(), lambda m: m["spec"]["workerGroupSpecs"][0].update(replica=8))
    with pytest.raises(jsonschema.ValidationError, match="'replica' was unexpected"):
        validate_crd(bad)


def test_wrong_type_is_caught():
    bad = broken(_raycluster(), lambda m: m["spec"]["workerGroupSpecs"][0].update(replicas="eight"))
    with pytest.raises(jsonschema.ValidationError, match="'eight' is not of type 'integer'"):
        validate_crd(bad)


def test_missing_gpu_resource_is_caught():
    def drop_gpu(m):
        resources = m["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
        for key in ("requests", "limits"):
            del resources[key]["nvidia.com/gpu"]

    bad = broken(_raycluster(), drop_gpu)
    validate_crd(bad)  # schema-valid, yet Ray would be told about GPUs Kubernetes never gave
    with pytest.raises(AssertionError, match="declares num-gpus=1 to Ray but requests nvidia.com/gpu=0"):
        gpu_workers(bad)


def test_bad_import_path_is_caught():
    service = load_manifest(REPO / "k8s" / "rayservice-serve.yaml")
    text = service["spec"]["serveConfigV2"].replace("serving.deployment:app_builder", "serving.deployment:app_buildr")
    with pytest.raises(AttributeError, match="app_buildr"):
        check_serve_config(text)


def test_bad_serve_config_key_is_caught():
    service = load_manifest(REPO / "k8s" / "rayservice-serve.yaml")
    text = service["spec"]["serveConfigV2"].replace("kv_cache_dtype: int8", "kv_cache_type: int8")
    with pytest.raises(Exception, match="kv_cache_type"):
        check_serve_config(text)


def test_missing_job_file_is_caught():
    with pytest.raises(AssertionError, match="is not in the repository"):
        check_entrypoint("rayquant quantize --config /home/ray/rayquant/configs/qwen2-27b.yaml")


def test_grafana_dashboard_charts_metrics_the_replicas_export():
    """k8s/grafana/rayquant-serving.json: valid JSON; every panel queries a metric the replicas define
    (serving/metrics.py: vLLM's names as Ray exports them, ray_ + histogram/counter suffixes)."""
    import json
    import re

    from serving.metrics import METRIC_NAMES

    dashboard = json.loads((REPO / "k8s" / "grafana" / "rayquant-serving.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
    charted = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = re.findall(r"\bray_(\w+)", target["expr"])
            assert names, target["expr"]
            for name in names:
                base = re.sub(r"_(bucket|sum|count|total)$", "", name)
                assert base in METRIC_NAMES, (panel["title"], name)
                charted.add(base)
    assert charted == set(METRIC_NAMES)  # every metric the replicas export has a panel
