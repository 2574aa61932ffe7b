"""Kubernetes manifests: the core kinds validate against the Kubernetes schemas
(kubernetes-validate, strict); the KServe custom resources, which have no bundled schema, are
checked for the fields KServe needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from .conftest import ROOT

K8S = ROOT / "deploy" / "k8s"


def test_core_manifests_validate_strictly() -> None:
    tool = shutil.which("kubernetes-validate", path=str(Path(sys.executable).parent)) or "kubernetes-validate"
    files = [K8S / name for name in ("deployment.yaml", "service.yaml", "hpa.yaml")]
    result = subprocess.run([tool, "--strict", *map(str, files)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 3, result.stdout


def test_deployment_probes_the_v2_health_endpoints() -> None:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):  # fmt: skip
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
    service = yaml.safe_load((K8S / "service.yaml").read_text())
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert len(env) == len(container["env"]), "a variable is set twice"
    assert grace > float(env["MODELHUB_SHUTDOWN_GRACE"])
    assert env["MODELHUB_HOST"] == "0.0.0.0"  # a bare serve binds loopback, which no probe reaches
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "modelhub_queue_depth"


def test_kserve_resources() -> None:
    runtime = yaml.safe_load((K8S / "kserve-servingruntime.yaml").read_text())
    assert runtime["kind"] == "ServingRuntime" and runtime["apiVersion"].startswith("serving.kserve.io/")
    assert runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    container = runtime["spec"]["containers"][0]
    assert [p["containerPort"] for p in container["ports"]] == [8080]  # serverless KServe routes one port
    args = container["args"]
    assert args[args.index("--http-port") + 1] == "8080"
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    service = yaml.safe_load((K8S / "kserve-inferenceservice.yaml").read_text())
    assert service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
