"""deploy/: every Kubernetes manifest validates offline against the Kubernetes schemas (kubernetes-validate ships
them), in strict mode (unknown fields fail), for the oldest and newest Kubernetes versions we target; the
kustomizations list exactly their folders' files; the pieces fit together (selectors, ports, HPA metrics that
the adapter rules define, grace periods above the drain times); the commands parse with canary-trt's own
argument parsers; the Dockerfiles copy what exists. The images themselves are not built here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (extra test)")

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
DOCKER = ROOT / "deploy" / "docker"
VERSIONS = ("1.30.0", kv.latest_version())  # oldest Kubernetes still commonly run; the newest schemas shipped


def documents() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBE.rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def resources(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == kind}


def test_manifests_validate_against_the_kubernetes_schemas():
    checked = set()
    for path, doc in documents():
        if doc["kind"] == "Kustomization":
            continue
        for version in VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{path.relative_to(ROOT)} ({doc['kind']}) against Kubernetes {version}: {e.message}")
        checked.add(doc["kind"])
    assert checked == {"Namespace", "PersistentVolumeClaim", "Deployment", "Service", "PodDisruptionBudget",
                       "HorizontalPodAutoscaler", "ConfigMap"}


def test_the_validator_rejects_a_wrong_manifest():
    """The check above can fail: a misspelt field and a wrong type are caught."""
    pdb = resources("PodDisruptionBudget")["canary-trt-serve"]
    with pytest.raises(kv.ValidationError):
        kv.validate({**pdb, "spec": {**pdb["spec"], "maxUnavailabel": 1}}, VERSIONS[0], strict=True)
    with pytest.raises(kv.ValidationError):
        kv.validate({**pdb, "spec": {**pdb["spec"], "selector": "app"}}, VERSIONS[0], strict=True)


def test_kustomizations_list_exactly_their_folders():
    for k in sorted(KUBE.rglob("kustomization.yaml")):
        listed = set(yaml.safe_load(k.read_text())["resources"])
        present = {p.name for p in k.parent.iterdir() if p.name != "kustomization.yaml"
                   and (p.suffix == ".yaml" or (p / "kustomization.yaml").exists())}
        if k.parent == KUBE:
            present.discard("prometheus-adapter")  # applied into the adapter's own namespace
        assert listed == present, k


def test_services_pdbs_and_hpas_point_at_the_deployments():
    deployments = resources("Deployment")
    assert set(deployments) == {"canary-trt-triton", "canary-trt-serve"}
    rules = yaml.safe_load(resources("ConfigMap")["adapter-config"]["data"]["config.yaml"])["rules"]
    adapter_metrics = {r["name"]["as"] for r in rules}
    for name, dep in deployments.items():
        pod = dep["spec"]["template"]
        labels = pod["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"] for c in pod["spec"]["containers"] for p in c.get("ports", [])}
        service = resources("Service")[name]
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
        assert resources("PodDisruptionBudget")[name]["spec"]["selector"]["matchLabels"].items() <= labels.items()
        hpa = resources("HorizontalPodAutoscaler")[name]
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        for metric in hpa["spec"]["metrics"]:
            assert metric["pods"]["metric"]["name"] in adapter_metrics
        assert hpa["spec"]["minReplicas"] >= 2  # the PDB's maxUnavailable 1 then leaves one serving
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims <= set(resources("PersistentVolumeClaim"))
    assert any("nv_inference_queue_duration_us" in r["seriesQuery"] for r in rules)


def _flag(command: list[str], name: str) -> float:
    for i, arg in enumerate(command):
        if arg == name:
            return float(command[i + 1])
        if arg.startswith(name + "="):
            return float(arg.split("=", 1)[1])
    raise AssertionError(f"{name} not in {command}")


def _main_container(name: str) -> tuple[dict, dict]:
    spec = resources("Deployment")[name]["spec"]["template"]["spec"]
    return spec, spec["containers"][0]


def test_triton_pod_probes_gpus_and_drain():
    spec, c = _main_container("canary-trt-triton")
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    drain = _flag(c["command"], "--exit-timeout-secs") + float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > drain
    # the init container's command is a real `canary-trt triton-repo` command line, one GPU per visible GPU
    from runtime.triton import repository

    (init,) = spec["initContainers"]
    assert init["command"][:2] == ["canary-trt", "triton-repo"]
    parser = argparse.ArgumentParser()
    repository.add_arguments(parser)
    args = parser.parse_args(init["command"][2:])
    assert len(args.gpus.split(",")) == c["resources"]["limits"]["nvidia.com/gpu"]
    assert args.output == next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == "repository")


def test_serve_pod_probes_secret_and_drain():
    from runtime import server

    spec, c = _main_container("canary-trt-serve")
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert set(server.OPEN_PATHS) == {"/ready", "/health"}  # the probes need no API key
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    (key,) = [e for e in c["env"] if e["name"] == server.API_KEY_ENV]
    assert set(key["valueFrom"]["secretKeyRef"]) == {"name", "key"}  # from a Secret, never a literal
    assert c["command"][:2] == ["canary-trt", "serve"]
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    args = parser.parse_args(c["command"][2:])
    assert args.api_key is None  # not on the command line, where the process list shows it
    port = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert args.port == port and args.host == "0.0.0.0"
    drain = args.drain_timeout + float(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > drain


@pytest.mark.parametrize("name", ["triton.Dockerfile", "serve.Dockerfile"])
def test_dockerfiles_name_their_base_and_copy_what_exists(name):
    text = (DOCKER / name).read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, re.M)
    assert ":" in base and not base.endswith(":latest")
    if name.startswith("triton"):
        # the TensorRT-LLM (C++) backend: a -trtllm-python-py3 image of the TensorRT-LLM 1.0-1.2 era
        assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-trtllm-python-py3", base)
    for src in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / src).exists(), src
    image = {"triton.Dockerfile": "canary-trt-triton", "serve.Dockerfile": "canary-trt-serve"}[name]
    used = {c["image"].split(":")[0] for d in resources("Deployment").values()
            for c in d["spec"]["template"]["spec"]["containers"]}
    assert image in used
