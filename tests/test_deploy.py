"""Multi-node configs: the launcher YAML against Ray's own JSON schema, the KubeRay manifests against
the CRD fields they use (KubeRay v1.6: authOptions, autoscalerOptions, serviceType), token auth everywhere,
hardened pods (non-root, no privilege escalation, pinned images, ClusterIP only), secrets only from Secrets,
worker pods big enough for the training they are given, and job entrypoints that our CLI accepts."""
import json
import math
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml

from service.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# The KubeRay v1 fields our manifests use (from the RayCluster / RayJob CRDs, KubeRay v1.6.2).
SECURITY = {"type": "object", "additionalProperties": False, "properties": {
    "runAsNonRoot": {"type": "boolean"}, "runAsUser": {"type": "integer"}, "runAsGroup": {"type": "integer"},
    "fsGroup": {"type": "integer"}, "allowPrivilegeEscalation": {"type": "boolean"},
    "capabilities": {"type": "object", "properties": {"drop": {"type": "array", "items": {"type": "string"}}},
                     "additionalProperties": False}}}
CONTAINER = {"type": "object", "required": ["name", "image"], "properties": {
    "name": {"type": "string"}, "image": {"type": "string"}, "env": {"type": "array"},
    "securityContext": SECURITY,
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
    "resources": {"type": "object", "properties": {"limits": {"type": "object"}, "requests": {"type": "object"}}}}}
POD = {"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object", "required": ["containers"],
       "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}, "securityContext": SECURITY}}}}
START = {"type": "object", "additionalProperties": {"type": "string"}}
AUTH = {"type": "object", "required": ["mode"], "additionalProperties": False, "properties": {
    "mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
    "enableK8sTokenAuth": {"type": "boolean"}}}
CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec", "workerGroupSpecs"], "properties": {
    "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"}, "authOptions": AUTH,
    "autoscalerOptions": {"type": "object", "properties": {"securityContext": SECURITY}, "additionalProperties": False},
    "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                      "properties": {"serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                     "rayStartParams": START, "template": POD}, "additionalProperties": False},
    "workerGroupSpecs": {"type": "array", "items": {"type": "object", "required": ["groupName", "template"],
                         "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer"},
                                        "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
                                        "rayStartParams": START, "template": POD}, "additionalProperties": False}}},
    "additionalProperties": False}
RAYCLUSTER = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"}, "spec": CLUSTER_SPEC}}
RAYJOB = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
    "spec": {"type": "object", "required": ["entrypoint", "rayClusterSpec"], "additionalProperties": False,
             "properties": {"entrypoint": {"type": "string"}, "shutdownAfterJobFinishes": {"type": "boolean"},
                            "ttlSecondsAfterFinished": {"type": "integer"}, "backoffLimit": {"type": "integer"},
                            "rayClusterSpec": CLUSTER_SPEC}}}}


SECRET_VARS = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
               "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "RAY_AUTH_TOKEN"}


def kuberay(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())


def pod_specs(spec):
    yield spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield g["template"]["spec"]


def containers(spec):
    for pod in pod_specs(spec):
        yield from pod["containers"]


def assert_hardened_pod(pod: dict) -> None:
    """Non-root, no privilege escalation, no capabilities, a pinned image, secrets only from Secrets."""
    for c in pod["containers"]:
        sc = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
        assert sc.get("runAsNonRoot") is True and c["securityContext"].get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("runAsUser", 0) != 0 and c["securityContext"]["capabilities"]["drop"] == ["ALL"], c["name"]
        tag = c["image"].rpartition("/")[2].partition(":")[2]
        assert "@sha256:" in c["image"] or (tag and tag != "latest"), f"{c['image']}: pin the image tag"
        for e in c.get("env", []):
            if e["name"] in SECRET_VARS:
                assert "secretKeyRef" in e.get("valueFrom", {}), f"{e['name']} must come from a Secret"


def assert_token_auth_and_private(spec):
    """Token auth through authOptions (KubeRay then gives the token to every Ray container and to a RayJob's
    submitter; a token only in the containers' env leaves the submitter without one), ClusterIP only."""
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    for pod in pod_specs(spec):
        assert_hardened_pod(pod)
        for c in pod["containers"]:
            assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & {e["name"] for e in c.get("env", [])}, \
                "KubeRay sets the token variables from authOptions"
            assert c["image"].split(":")[-1] == "0.1.0"
            assert 10001 not in [p["containerPort"] for p in c.get("ports", [])], "no Ray Client port"
    if "autoscalerOptions" in spec:
        assert spec["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False


def quantity(q) -> float:
    """A Kubernetes CPU quantity: "40", "500m", 4."""
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def ray_resources(group: dict) -> tuple[float, float]:
    """(CPUs, GPUs) Ray gets on one pod of a group: rayStartParams if set, else the container limits, as KubeRay
    passes them to `ray start`."""
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    params = group.get("rayStartParams", {})
    return (float(params.get("num-cpus", quantity(limits["cpu"]))),
            float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))))


def assert_fits(cfg, spec, replicas_key: str) -> None:
    """Every Train worker (cpus_per_worker CPUs, + 1 GPU with use_gpu) fits in one worker pod, all of them fit
    the group's pods, and at least one CPU is left for Ray Data (the head declares none: drivers only)."""
    assert ray_resources({"template": spec["headGroupSpec"]["template"],
                          "rayStartParams": spec["headGroupSpec"]["rayStartParams"]})[0] == 0
    need_cpu, slots, spare = cfg.train.cpus_per_worker, 0, 0.0
    for g in spec["workerGroupSpecs"]:
        cpus, gpus = ray_resources(g)
        per_pod = math.floor(cpus / need_cpu)
        if cfg.train.use_gpu:
            per_pod = min(per_pod, int(gpus))
        slots += per_pod * g[replicas_key]
        spare += (cpus - per_pod * need_cpu) * g[replicas_key]
    assert slots >= cfg.train.workers, (f"{cfg.train.workers} workers x {need_cpu} CPUs"
                                        f"{' + 1 GPU' if cfg.train.use_gpu else ''} do not fit the worker pods")
    assert spare >= 1, "no CPU left for Ray Data next to the Train workers"


def test_launcher_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert not [o for o in cfg["docker"]["run_options"] if any(v + "=" in o for v in SECRET_VARS)], \
        "secrets on the docker command line show in `docker inspect`"
    assert cfg["docker"]["image"].rpartition(":")[2] not in ("", "latest")
    for cmd in cfg["initialization_commands"]:
        assert "chmod" not in cmd and (">" not in cmd or cmd.startswith("umask 077")), \
            f"secret files must be created 0600, not chmod-ed after: {cmd}"


def test_kuberay_manifests():
    rc, rj = kuberay("raycluster.yaml"), kuberay("rayjob.yaml")
    jsonschema.validate(rc, RAYCLUSTER)
    assert_token_auth_and_private(rc["spec"])
    assert rc["spec"]["authOptions"]["secretName"] == "audio-jepa-ray-token"
    jsonschema.validate(rj, RAYJOB)
    assert_token_auth_and_private(rj["spec"]["rayClusterSpec"])
    assert rc["spec"]["rayVersion"] == rj["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    # the job's entrypoint is a valid pretraining command line
    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pretrain"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(argv[argv.index("--config") + 1], sets)
    assert cfg.train.use_gpu and cfg.data.source.startswith("s3://")


def test_kuberay_worker_pods_fit_the_training_they_get():
    rj = kuberay("rayjob.yaml")
    argv = shlex.split(rj["spec"]["entrypoint"])
    cfg = load_config(argv[argv.index("--config") + 1], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    assert_fits(cfg, rj["spec"]["rayClusterSpec"], "replicas")  # a RayJob's cluster does not scale
    assert_fits(load_config("base", []), kuberay("raycluster.yaml")["spec"], "maxReplicas")


def test_kuberay_mlflow_runs_basic_auth_inside_the_cluster():
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "mlflow.yaml").read_text())}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    assert_hardened_pod(pod)
    server = pod["containers"][0]
    assert server["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    env = {e["name"]: e for e in server["env"]}
    assert {"MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"} <= set(env)
    ini = docs["ConfigMap"]["data"]["basic_auth.ini"]
    assert "admin_password" not in ini and env["MLFLOW_AUTH_CONFIG_PATH"]["value"].endswith("basic_auth.ini")
    assert docs["Service"]["spec"]["type"] == "ClusterIP"
    # the Ray pods reach it under the name the manifests use, with a login from a Secret
    svc = docs["Service"]["metadata"]
    for spec in (kuberay("raycluster.yaml")["spec"], kuberay("rayjob.yaml")["spec"]["rayClusterSpec"]):
        for c in containers(spec):
            e = {v["name"]: v for v in c["env"]}
            assert e["MLFLOW_TRACKING_URI"]["value"] == f"http://{svc['name']}.{svc['namespace']}.svc:5000"
            assert "secretKeyRef" in e["MLFLOW_TRACKING_USERNAME"]["valueFrom"]


def test_dockerfile_uses_matching_ray_image_and_non_root_user():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    base = next(line for line in lines if line.startswith("FROM")).split()[1]
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311")
    users = [line.split()[1] for line in lines if line.startswith("USER")]
    assert users and users[-1] not in ("root", "0")
