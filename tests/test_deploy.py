"""Multi-node configs: the launcher YAML against Ray's own JSON schema; the KubeRay manifests against the real
RayCluster / RayJob CRDs of KubeRay v1.6.2 (vendored in tests/schemas/, unknown fields refused as the API server
would prune them); token auth everywhere; every pod meeting the "restricted" Pod Security Standard (the RayJob
submitter and MLflow included); GPU workers requesting, tolerating and selecting GPU nodes whose NVIDIA driver suits
the pinned torch; the Dockerfile and the launcher's node image agreeing with that pin; secrets only from Secrets;
worker pods big enough for the training they are given; and job entrypoints that our CLI accepts."""
import copy
import functools
import hashlib
import importlib.metadata
import json
import math
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from service.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCHEMAS = ROOT / "tests" / "schemas"
DOC = ROOT / "docs" / "cluster.md"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~2 MB of YAML

# The KubeRay release whose CRDs are vendored (tests/schemas/README.md): copied from ray-project/kuberay at tag
# v1.6.2, checked here by their git blob ids so that nobody edits them by hand.
KUBERAY_VERSION = "v1.6.2"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CRD_BLOBS = {"ray.io_rayclusters.yaml": "2f432d40d9cc90132d6107264260e966f503ceb7",
             "ray.io_rayjobs.yaml": "3faf478c0ac3cec0d2cea389ac9182c5adb9c464"}
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # KubeRay v1.6.2 utils/constant.go: Max{RayCluster,RayJob}NameLength

# torch major.minor (pinned in pyproject.toml) -> (CUDA of its default PyPI wheels for Linux x86_64, the oldest NVIDIA
# driver branch that runs that CUDA).  torch 2.11's wheels bring the CUDA 13.0 libraries (nvidia-*-cu13); CUDA 13.x
# needs a driver of the r580 series or newer (CUDA 13.0 release notes: >= 580.65.06, minor-version compatibility
# within 13.x).  A new pin needs a new row, and the Dockerfile, cluster/ and docs/cluster.md checked against it.
TORCH_CUDA = {"2.11": ("13.0", 580)}

# Node images the launcher may name -> the oldest NVIDIA driver branch they ship.  The AWS "Deep Learning Base OSS
# Nvidia Driver GPU AMI (Ubuntu 24.04)" ships the r580 series or newer in its releases since late 2025; `latest`
# resolves at launch to the newest.  Ray's default AMI (what a node type without ImageId gets: Deep Learning AMI
# Ubuntu 18.04 V71, CUDA 11.2) is far older and deliberately not listed.
NODE_IMAGES = {
    "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id": 580,
}
GPU_INSTANCE = re.compile(r"^(g\d|p\d)[a-z0-9-]*\.")  # EC2 GPU families: g4dn, g5, g6e, p4d, p5, …

# The GPU node contract of the KubeRay manifests (docs/cluster.md): GPU Feature Discovery's labels and the
# nvidia.com/gpu:NoSchedule taint that GPU node pools carry.
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}
GPU_DRIVER_LABEL = "nvidia.com/cuda.driver-version.major"
GPU_TAINT = ("nvidia.com/gpu", "NoSchedule")

SECRET_VARS = {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
               "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "RAY_AUTH_TOKEN"}


def kuberay(name: str) -> dict:
    return yaml.safe_load((ROOT / "cluster" / "kuberay" / name).read_text())


def mlflow_docs() -> dict:
    return {d["kind"]: d for d in yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "mlflow.yaml").read_text())}


def launcher() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())


# --- the CRD schemas, as the API server applies them ---------------------------------------------------------------

def git_blob(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@functools.cache
def crd(kind: str) -> tuple[dict, dict]:
    """(the CRD document, its served `v1` openAPIV3Schema)."""
    doc = yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=YAML_LOADER)
    v1 = next(v for v in doc["spec"]["versions"] if v["name"] == "v1")
    assert v1["served"] and doc["spec"]["names"]["kind"] == kind
    return doc, v1["schema"]["openAPIV3Schema"]


def structural(schema: dict) -> dict:
    """A Kubernetes structural schema as plain JSON Schema: `x-kubernetes-int-or-string` accepts an int or a string,
    `nullable` accepts null, and an object refuses fields it does not declare unless it has
    `x-kubernetes-preserve-unknown-fields` (the API server silently prunes them: a misspelt field just vanishes)."""
    out = {}
    for key, value in schema.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: structural(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural(sub) for sub in value]
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (out.get("type") == "object" and "additionalProperties" not in out
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    """listType set / map: no two items alike (map: by their key fields, a missing key taking its default)."""
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    if list_type == "set":
        keys = [json.dumps(item, sort_keys=True) for item in instance]
    else:
        props = schema.get("items", {}).get("properties", {})
        names = schema["x-kubernetes-list-map-keys"]
        keys = [tuple(item.get(k, props.get(k, {}).get("default")) for k in names) for item in instance]
    dupes = sorted({str(k) for k in keys if keys.count(k) > 1})
    if dupes:
        yield jsonschema.ValidationError(f"duplicate items in a listType={list_type} list: {', '.join(dupes)}")


def _cel_not_evaluated(validator, rules, instance, schema):
    """CEL rules (x-kubernetes-validations) are not evaluated here: a manifest that sets such a field fails until
    someone checks the rules by hand and teaches this test about them."""
    yield jsonschema.ValidationError("this field carries CEL rules tests/test_deploy.py does not evaluate: "
                                     + "; ".join(r["rule"] for r in rules))


K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {
    "x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel_not_evaluated})


@functools.cache
def spec_validator(kind: str, *path: str):
    """A validator for the CRD's `spec` (or for a sub-schema of it, by property names)."""
    schema = crd(kind)[1]["properties"]["spec"]
    for name in path:
        schema = schema["items"] if name == "[]" else schema["properties"][name]
    return K8sValidator(structural(schema))


def crd_errors(validator, instance, where: str) -> list[str]:
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{where}.{'.'.join(map(str, e.absolute_path))}: {e.message}".replace(".:", ":") for e in errors]


def assert_valid_resource(manifest: dict) -> None:
    """What `kubectl apply` against KubeRay v1.6.2 would accept and keep: apiVersion/kind of the CRD, a name
    KubeRay takes, and a `spec` with no unknown, mistyped or duplicate fields."""
    kind = manifest["kind"]
    doc, _ = crd(kind)
    assert manifest["apiVersion"] == f"{doc['spec']['group']}/v1", manifest["apiVersion"]
    assert set(manifest) <= {"apiVersion", "kind", "metadata", "spec"}, set(manifest)
    name = manifest["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= MAX_NAME[kind], name
    errors = crd_errors(spec_validator(kind), manifest["spec"], "spec")
    assert not errors, f"{kind} {name} does not match the KubeRay {KUBERAY_VERSION} CRD:\n" + "\n".join(errors)


# --- pods ---------------------------------------------------------------------------------------------------------

def pod_specs(spec):
    yield spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield g["template"]["spec"]


def containers(spec):
    for pod in pod_specs(spec):
        yield from pod["containers"]


def all_pods() -> dict[str, tuple[dict, list[dict]]]:
    """Every pod the manifests make -> (its pod spec, the containers KubeRay adds to it): the autoscaler sidecar
    (autoscalerOptions.securityContext) and the workers' wait-gcs-ready init container (a copy of the Ray
    container's securityContext)."""
    pods = {}
    for label, spec in (("raycluster", kuberay("raycluster.yaml")["spec"]),
                        ("rayjob", kuberay("rayjob.yaml")["spec"]["rayClusterSpec"])):
        head = spec["headGroupSpec"]["template"]["spec"]
        added = []
        if spec.get("enableInTreeAutoscaling"):
            added.append({"name": "autoscaler", "securityContext": spec.get("autoscalerOptions", {}).get(
                "securityContext")})
        pods[f"{label} head"] = (head, added)
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            pods[f"{label} worker group {g['groupName']}"] = (
                pod, [{"name": "wait-gcs-ready", "securityContext": pod["containers"][0].get("securityContext")}])
    pods["rayjob submitter"] = (kuberay("rayjob.yaml")["spec"]["submitterPodTemplate"]["spec"], [])
    pods["mlflow"] = (mlflow_docs()["Deployment"]["spec"]["template"]["spec"], [])
    return pods


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {None, "", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(pod: dict, added: list[dict] = ()) -> list[str]:
    """The Kubernetes Pod Security Standard "restricted" (baseline included), as the PodSecurity admission
    controller checks it: host namespaces, privileged, capabilities, volume types, hostPorts, AppArmor, SELinux,
    /proc mount, sysctls, privilege escalation, non-root, seccomp."""
    bad = []
    psc = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            bad.append(f"{field}: true")
    for v in pod.get("volumes", []):
        if not set(v) - {"name"} <= RESTRICTED_VOLUMES:
            bad.append(f"volume {v['name']}: {sorted(set(v) - {'name'})}")
    for s in psc.get("sysctls", []):
        if s["name"] not in SAFE_SYSCTLS:
            bad.append(f"sysctl {s['name']}")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if psc.get("runAsUser") == 0:
        bad.append("pod runAsUser: 0")
    se = psc.get("seLinuxOptions") or {}
    if se.get("type") not in SELINUX_TYPES or se.get("user") or se.get("role"):
        bad.append(f"pod seLinuxOptions {se}")
    if (psc.get("appArmorProfile") or {}).get("type") == "Unconfined":
        bad.append("pod appArmorProfile Unconfined")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        bad.append("pod hostProcess")
    everyone = [*pod.get("initContainers", []), *pod["containers"], *pod.get("ephemeralContainers", []), *added]
    for c in everyone:
        sc, name = c.get("securityContext") or {}, c["name"]
        caps = sc.get("capabilities") or {}
        if sc.get("privileged"):
            bad.append(f"{name}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{name}: capabilities.drop must include ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{name}: capabilities.add {caps['add']}")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{name}: runAsNonRoot must be true")
        if sc.get("runAsUser") == 0:
            bad.append(f"{name}: runAsUser 0")
        if ((sc.get("seccompProfile") or {}).get("type") or pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{name}: seccompProfile must be RuntimeDefault (or Localhost)")
        se = sc.get("seLinuxOptions") or {}
        if se.get("type") not in SELINUX_TYPES or se.get("user") or se.get("role"):
            bad.append(f"{name}: seLinuxOptions {se}")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            bad.append(f"{name}: appArmorProfile Unconfined")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{name}: procMount {sc['procMount']}")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            bad.append(f"{name}: hostProcess")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{name}: hostPort")
    return bad


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


# --- torch pin -> CUDA -> NVIDIA driver ----------------------------------------------------------------------------

def torch_pin() -> Version:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert len(reqs) == 1, "pyproject.toml must list torch once"
    specs = list(reqs[0].specifier)
    assert len(specs) == 1 and specs[0].operator == "==", \
        f"pin torch exactly (torch==X.Y.Z), not torch{reqs[0].specifier}: the node images depend on its CUDA"
    return Version(specs[0].version)


def torch_cuda_requirement() -> tuple[str, int]:
    """(CUDA of the pinned torch's wheels, minimum NVIDIA driver branch), failing on a pin TORCH_CUDA does not know."""
    pin = torch_pin()
    key = f"{pin.major}.{pin.minor}"
    assert not pin.local, f"pyproject pins torch=={pin}: TORCH_CUDA describes PyPI's default wheels, not +{pin.local}"
    assert key in TORCH_CUDA, (
        f"pyproject.toml pins torch=={pin}, which TORCH_CUDA in tests/test_deploy.py does not know: add the CUDA of "
        f"torch {key}'s default wheels and the oldest NVIDIA driver for it, then check the Dockerfile "
        f"(NVIDIA_REQUIRE_CUDA), cluster/ray-cluster.yaml (node image, driver check), cluster/kuberay/ "
        f"({GPU_DRIVER_LABEL}) and docs/cluster.md")
    return TORCH_CUDA[key]


def dockerfile() -> tuple[str, dict]:
    """(base image, ENV of the Dockerfile)."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    base = next(line for line in lines if line.startswith("FROM")).split()[1]
    env = {}
    for line in lines:
        if line.startswith("ENV "):
            env.update(dict(word.split("=", 1) for word in shlex.split(line[4:])))
    return base, env


def gpu_node_types(cfg: dict) -> dict:
    return {name: t for name, t in cfg["available_node_types"].items()
            if GPU_INSTANCE.match(t["node_config"]["InstanceType"])}


def driver_floor(pod: dict) -> int | None:
    """The NVIDIA driver branch every node a pod may land on has, from its required node affinity (every
    nodeSelectorTerm, since they are ORed) on GPU Feature Discovery's driver label."""
    terms = (((pod.get("affinity") or {}).get("nodeAffinity") or {})
             .get("requiredDuringSchedulingIgnoredDuringExecution") or {}).get("nodeSelectorTerms") or []
    floors = []
    for term in terms:
        found = [int(e["values"][0]) + 1 if e["operator"] == "Gt" else int(e["values"][0])
                 for e in term.get("matchExpressions", [])
                 if e["key"] == GPU_DRIVER_LABEL and e["operator"] in ("Gt", "In") and len(e["values"]) == 1]
        floors.append(max(found) if found else None)
    return None if not floors or None in floors else min(floors)


# --- tests ---------------------------------------------------------------------------------------------------------

def test_launcher_config_matches_rays_schema():
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = launcher()
    jsonschema.validate(cfg, schema)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert not [o for o in cfg["docker"]["run_options"] if any(v + "=" in o for v in SECRET_VARS)], \
        "secrets on the docker command line show in `docker inspect`"
    assert cfg["docker"]["image"].rpartition(":")[2] not in ("", "latest")
    commands = [*cfg["initialization_commands"],
                *(c for t in cfg["available_node_types"].values() for c in t.get("initialization_commands", []))]
    for cmd in commands:
        assert "chmod" not in cmd and (">" not in cmd or cmd.startswith("umask 077")), \
            f"secret files must be created 0600, not chmod-ed after: {cmd}"
    # a node type's own initialization_commands replace the global ones: it must still fetch the secrets
    for name, t in cfg["available_node_types"].items():
        own = t.get("initialization_commands")
        assert own is None or own[:len(cfg["initialization_commands"])] == cfg["initialization_commands"], name


def test_vendored_crds_are_kuberay_release():
    for name, blob in CRD_BLOBS.items():
        assert git_blob(SCHEMAS / name) == blob, f"tests/schemas/{name} is not KubeRay {KUBERAY_VERSION}'s"
    readme = (SCHEMAS / "README.md").read_text()
    assert f"KubeRay {KUBERAY_VERSION}" in readme and all(b in readme for b in CRD_BLOBS.values())
    assert "Apache License" in (SCHEMAS / "LICENSE").read_text()
    # the version is named the same everywhere a user reads it
    for path in [*(ROOT / "cluster" / "kuberay").glob("ray*.yaml"), DOC]:
        assert f"KubeRay {KUBERAY_VERSION}" in path.read_text(), \
            f"{path.relative_to(ROOT)} must name KubeRay {KUBERAY_VERSION}"


def test_crd_validation_refuses_what_the_api_server_would_drop_or_refuse():
    """The point of validating against the real CRDs: a misspelt field is pruned silently by Kubernetes (a
    `nodeSelecter` would schedule GPU pods anywhere, a `seccompProfle` would leave the pod refused), so the
    schema must refuse it at every depth; wrong types, enums and duplicate keys too."""
    rc, rj = kuberay("raycluster.yaml"), kuberay("rayjob.yaml")
    assert_valid_resource(rc)
    assert_valid_resource(rj)

    def worker(m):
        return m["spec"]["workerGroupSpecs"][0]["template"]["spec"]

    def job_worker(m):
        return m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]

    broken = {
        "misspelt spec field": (rc, lambda m: m["spec"].update(enableInTreeAutoScaling=True)),
        "misspelt pod field": (rc, lambda m: worker(m).update(nodeSelecter=worker(m).pop("nodeSelector"))),
        "misspelt toleration field": (rj, lambda m: job_worker(m)["tolerations"][0].update(efect="NoSchedule")),
        "misspelt securityContext field": (rj, lambda m: m["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
                                           ["securityContext"].update(seccompProfle={"type": "RuntimeDefault"})),
        "misspelt template metadata": (rj, lambda m: m["spec"]["submitterPodTemplate"].update(
            metadata={"lables": {"a": "b"}})),
        "field in the wrong place": (rc, lambda m: m["spec"]["headGroupSpec"].update(tolerations=[])),
        "wrong type": (rc, lambda m: m["spec"]["workerGroupSpecs"][0].update(replicas="one")),
        "bad enum": (rc, lambda m: m["spec"]["authOptions"].update(mode="tokens")),
        "duplicate env name": (rc, lambda m: worker(m)["containers"][0]["env"].append(
            {"name": "MLFLOW_TRACKING_URI", "value": "x"})),
        "CEL-guarded field": (rj, lambda m: m["spec"].update(managedBy="ray.io/kuberay-operator")),
    }
    for what, (manifest, breaks) in broken.items():
        m = copy.deepcopy(manifest)
        breaks(m)
        try:
            assert_valid_resource(m)
        except AssertionError as e:
            assert "does not match the KubeRay" in str(e), f"{what}: {e}"
        else:
            pytest.fail(f"{what}: accepted")
    # int-or-string quantities take both forms, as the API server does
    m = copy.deepcopy(rc)
    worker(m)["containers"][0]["resources"]["limits"].update(cpu=40, memory="160Gi")
    assert_valid_resource(m)


def test_kuberay_manifests():
    rc, rj = kuberay("raycluster.yaml"), kuberay("rayjob.yaml")
    assert_valid_resource(rc)
    assert_token_auth_and_private(rc["spec"])
    assert rc["spec"]["authOptions"]["secretName"] == "audio-jepa-ray-token"
    assert_valid_resource(rj)
    assert_token_auth_and_private(rj["spec"]["rayClusterSpec"])
    assert rc["spec"]["rayVersion"] == rj["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    # the submitter (a Kubernetes Job): our image, hardened, never restarted in place; KubeRay adds the command
    # (`ray job submit …`) and the token to its first container
    submitter = rj["spec"]["submitterPodTemplate"]["spec"]
    assert_hardened_pod(submitter)
    assert submitter["restartPolicy"] == "Never"
    assert not submitter["containers"][0].get("command"), "leave the command to KubeRay"
    assert submitter["containers"][0]["image"] == \
        rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    # the job's entrypoint is a valid pretraining command line
    argv = shlex.split(rj["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.pretrain"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    cfg = load_config(argv[argv.index("--config") + 1], sets)
    assert cfg.train.use_gpu and cfg.data.source.startswith("s3://")
    # the run's identity is a visible choice, not the config's default name (every job would be run "base")
    assert any(s.startswith("run_name=") for s in sets) and cfg.run_name != load_config("base").run_name


def test_every_pod_meets_the_restricted_pod_security_standard():
    pods = all_pods()
    assert len(pods) == 6
    for where, (pod, added) in pods.items():
        assert (pod.get("securityContext") or {}).get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert not restricted_violations(pod, added), f"{where}: {restricted_violations(pod, added)}"
    # the MLflow pod template is a PodTemplateSpec like KubeRay's: same schema, same pruning
    errors = crd_errors(spec_validator("RayCluster", "headGroupSpec", "template"),
                        mlflow_docs()["Deployment"]["spec"]["template"], "mlflow template")
    assert not errors, "\n".join(errors)
    # and the checker does catch each kind of violation
    pod, added = pods["raycluster head"]
    for breaks in (lambda p: p["securityContext"].pop("seccompProfile"),
                   lambda p: p["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True),
                   lambda p: p["containers"][0]["securityContext"]["capabilities"].update(drop=[]),
                   lambda p: p["containers"][0]["securityContext"].update(runAsNonRoot=False),
                   lambda p: p["securityContext"].update(runAsUser=0),
                   lambda p: p.update(volumes=[{"name": "h", "hostPath": {"path": "/"}}]),
                   lambda p: p.update(hostNetwork=True)):
        p = copy.deepcopy(pod)
        breaks(p)
        assert restricted_violations(p, added)
    assert restricted_violations(pod, [{"name": "autoscaler", "securityContext": None}])


def test_kuberay_gpu_workers_land_on_gpu_nodes_with_a_driver_for_the_torch_pin():
    cuda, min_driver = torch_cuda_requirement()
    doc = DOC.read_text()
    for label, spec in (("raycluster", kuberay("raycluster.yaml")["spec"]),
                        ("rayjob", kuberay("rayjob.yaml")["spec"]["rayClusterSpec"])):
        for g in spec["workerGroupSpecs"]:
            where, pod = f"{label} {g['groupName']}", g["template"]["spec"]
            res = pod["containers"][0]["resources"]
            assert int(res["limits"]["nvidia.com/gpu"]) > 0, f"{where}: request nvidia.com/gpu"
            assert res["requests"].get("nvidia.com/gpu", res["limits"]["nvidia.com/gpu"]) == \
                res["limits"]["nvidia.com/gpu"], f"{where}: extended resources need requests == limits"
            key, effect = GPU_TAINT
            assert any(t.get("key") == key and t.get("effect", effect) == effect
                       and (t.get("operator") == "Exists" or "value" in t) for t in pod.get("tolerations", [])), \
                f"{where}: tolerate the {key}:{effect} taint of GPU nodes"
            assert pod.get("nodeSelector") == GPU_NODE_SELECTOR, f"{where}: nodeSelector {GPU_NODE_SELECTOR}"
            floor = driver_floor(pod)
            assert floor is not None and floor >= min_driver, \
                f"{where}: torch {torch_pin()} (CUDA {cuda}) needs nodes with {GPU_DRIVER_LABEL} >= {min_driver}"
    # the contract is documented where users read it
    for text in (*GPU_NODE_SELECTOR, GPU_DRIVER_LABEL, GPU_TAINT[0], f"r{min_driver}", f"CUDA {cuda.split('.')[0]}",
                 "restricted"):
        assert text in doc, f"docs/cluster.md should say {text!r}"


def test_images_and_node_images_agree_with_the_torch_pin():
    """torch's CUDA 13 wheels run on any image, but only on a host driver of r580+: the Dockerfile states the CUDA
    it needs, and every launcher node boots an image whose driver has it (GPU nodes check it before Ray starts)."""
    cuda, min_driver = torch_cuda_requirement()
    base, env = dockerfile()
    assert re.search(r"-(gpu|cu\d+)$", base), f"{base}: use a GPU variant of the Ray image"
    assert env.get("NVIDIA_REQUIRE_CUDA") == f"cuda>={cuda}", \
        f"Dockerfile: ENV NVIDIA_REQUIRE_CUDA=\"cuda>={cuda}\" (torch {torch_pin()}'s wheels are CUDA {cuda})"
    cfg = launcher()
    gpus = gpu_node_types(cfg)
    assert gpus, "the launcher has no GPU node type"
    for name, t in cfg["available_node_types"].items():
        image = t["node_config"].get("ImageId", "")
        assert image in NODE_IMAGES, (f"{name}: name an ImageId from NODE_IMAGES, not {image or 'Ray default AMI'} "
                                      f"(Ray's default AMI has a CUDA 11 era driver)")
        if name in gpus:
            assert NODE_IMAGES[image] >= min_driver, f"{name}: {image} ships r{NODE_IMAGES[image]} < r{min_driver}"
            guards = [c for c in t.get("initialization_commands", []) if "nvidia-smi" in c]
            assert len(guards) == 1 and f"-ge {min_driver}" in guards[0] and "exit 1" in guards[0], \
                f"{name}: check the driver is r{min_driver}+ before the container starts"
    # the installed torch (where it is the pinned one, built for CUDA) agrees with the table
    try:
        dist = importlib.metadata.distribution("torch")
    except importlib.metadata.PackageNotFoundError:
        return
    installed = Version(dist.version)
    found = re.search(r"^cuda: .*?= '([\d.]+)'", Path(dist.locate_file("torch/version.py")).read_text(), re.M)
    if installed.release == torch_pin().release and found:
        assert found.group(1) == cuda, f"torch {installed} is built for CUDA {found.group(1)}, TORCH_CUDA says {cuda}"


def test_kuberay_worker_pods_fit_the_training_they_get():
    rj = kuberay("rayjob.yaml")
    argv = shlex.split(rj["spec"]["entrypoint"])
    cfg = load_config(argv[argv.index("--config") + 1], [argv[i + 1] for i, a in enumerate(argv) if a == "--set"])
    assert_fits(cfg, rj["spec"]["rayClusterSpec"], "replicas")  # a RayJob's cluster does not scale
    assert_fits(load_config("base", []), kuberay("raycluster.yaml")["spec"], "maxReplicas")


def test_kuberay_mlflow_runs_basic_auth_inside_the_cluster():
    docs = mlflow_docs()
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
