"""Multi-node configs: the launcher YAML against Ray's own JSON schema, the KubeRay manifests against
the CRD fields they use, token auth everywhere, and job entrypoints that our CLI accepts."""
import json
import shlex
from pathlib import Path

import jsonschema
import ray
import yaml

from service.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# The KubeRay v1 fields our manifests use (from the RayCluster / RayJob CRDs).
CONTAINER = {"type": "object", "required": ["name", "image"], "properties": {
    "name": {"type": "string"}, "image": {"type": "string"}, "env": {"type": "array"},
    "ports": {"type": "array", "items": {"type": "object", "required": ["containerPort"]}},
    "resources": {"type": "object", "properties": {"limits": {"type": "object"}, "requests": {"type": "object"}}}}}
POD = {"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object", "required": ["containers"],
       "properties": {"containers": {"type": "array", "minItems": 1, "items": CONTAINER}}}}}
START = {"type": "object", "additionalProperties": {"type": "string"}}
CLUSTER_SPEC = {"type": "object", "required": ["headGroupSpec", "workerGroupSpecs"], "properties": {
    "rayVersion": {"type": "string"}, "enableInTreeAutoscaling": {"type": "boolean"},
    "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                      "properties": {"rayStartParams": START, "template": POD}, "additionalProperties": False},
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


def containers(spec):
    yield from spec["headGroupSpec"]["template"]["spec"]["containers"]
    for g in spec["workerGroupSpecs"]:
        yield from g["template"]["spec"]["containers"]


def assert_token_auth(spec):
    for c in containers(spec):
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], "token must come from a Secret"
        assert c["image"].split(":")[-1] == "0.1.0"


def test_launcher_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]


def test_kuberay_manifests():
    rc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text())
    jsonschema.validate(rc, RAYCLUSTER)
    assert_token_auth(rc["spec"])
    rj = yaml.safe_load((ROOT / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    jsonschema.validate(rj, RAYJOB)
    assert_token_auth(rj["spec"]["rayClusterSpec"])
    assert rc["spec"]["rayVersion"] == rj["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    # the job's entrypoint is a valid pretraining command line
    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pretrain"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(argv[argv.index("--config") + 1], sets)
    assert cfg.train.use_gpu and cfg.data.source.startswith("s3://")


def test_dockerfile_uses_matching_ray_image_and_non_root_user():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    base = next(line for line in lines if line.startswith("FROM")).split()[1]
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py311")
    users = [line.split()[1] for line in lines if line.startswith("USER")]
    assert users and users[-1] not in ("root", "0")
