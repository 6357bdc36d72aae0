"""examples/kubernetes/ and examples/compose/ parse, validate, and say what operations.md says.

The Kubernetes manifests are validated against Kubernetes' JSON schemas with
kubernetes-validate (strict: unknown fields fail; kubeconform is not installable
here, kubernetes-validate is on PyPI with the schemas bundled). Then the structure
these examples rely on is checked directly: every container that reads or writes
the cache mounts the same memory-backed volume at /dev/shm, the writer's readiness
is `shmcache status NAME --json`, and `shmcache serve` accepts the flags used.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

EXAMPLES = Path(__file__).parent.parent / "examples"


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]
    return spec if doc["kind"] == "Pod" else spec["template"]["spec"]


@pytest.mark.parametrize("name", ["pod-sidecar.yaml", "daemonset.yaml"])
def test_kubernetes_manifests(name: str, tmp_path: Path) -> None:
    (doc,) = _docs(EXAMPLES / "kubernetes" / name)
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for version in ("1.28", "1.30"):
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError
    assert doc["apiVersion"] in ("v1", "apps/v1") and doc["metadata"]["name"]
    spec = _pod_spec(doc)
    volumes = {v["name"]: v for v in spec["volumes"]}
    shm = [n for n, v in volumes.items()
           if v.get("emptyDir", {}).get("medium") == "Memory"
           or v.get("hostPath", {}).get("path") == "/dev/shm"]
    assert len(shm) == 1
    if doc["kind"] == "DaemonSet":
        assert doc["spec"]["selector"]["matchLabels"] == doc["spec"]["template"]["metadata"]["labels"]
    writer = None
    for c in spec["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert mounts.get("/dev/shm") == shm[0], c["name"]  # every container shares it
        if c.get("command", [])[:2] == ["shmcache", "serve"]:
            writer = c
    assert writer is not None
    probe = writer["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["shmcache", "status"] and probe[-1] == "--json"
    _check_serve_flags(writer["command"], tmp_path)


def test_compose_file(tmp_path: Path) -> None:
    (doc,) = _docs(EXAMPLES / "compose" / "compose.yaml")
    services = doc["services"]
    writer = services["shmcache-writer"]
    assert writer["healthcheck"]["test"][1:3] == ["shmcache", "status"]
    assert doc["volumes"]["shm"]["driver_opts"]["type"] == "tmpfs"
    for name in ("shmcache-writer", "app"):
        assert "shm:/dev/shm" in services[name]["volumes"]
    assert services["app"]["depends_on"]["shmcache-writer"]["condition"] == "service_healthy"
    _check_serve_flags(writer["command"], tmp_path)


def _check_serve_flags(command: list[str], tmp: Path) -> None:
    """`shmcache serve ... --check-config` accepts the example's flags (endpoints are not
    contacted by --check-config; files the pod mounts from Secrets stand in as temp files)."""
    args = []
    for a in command[1:]:
        if a.startswith("/etc/etcd-ca/"):
            stand_in = tmp / Path(a).name
            stand_in.write_text("-----BEGIN CERTIFICATE-----\n")
            a = str(stand_in)
        args.append(a)
    out = subprocess.run([sys.executable, "-m", "shmcache", *args, "--check-config"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
