"""A control plane that fails to start says why, promptly, and leaves nothing running behind it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from _processes import assert_none_left

from cartridges.process import ServiceError
from cartridges_e2e import binaries, cluster
from cartridges_e2e.pki import Pki

pytestmark = pytest.mark.cluster

# Stands in for kube-controller-manager: serves /healthz over TLS on its --secure-port, then fails like a controller
# that cannot start (the real one exits when one does), after FAIL_AFTER_S seconds.
FAKE_KCM = """#!{python}
import http.server, ssl, sys, threading, time
flags = dict(arg[2:].split("=", 1) for arg in sys.argv[1:])

class Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

server = http.server.HTTPServer(("127.0.0.1", int(flags["secure-port"])), Healthz)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain({cert!r}, {key!r})
server.socket = context.wrap_socket(server.socket, server_side=True)
threading.Thread(target=server.serve_forever, daemon=True).start()
time.sleep({fail_after_s})
print("F0101 fake kube-controller-manager: error starting controllers", flush=True)
sys.exit(1)
"""


def fake_control_plane(tmp_path: Path, fail_after_s: float) -> dict[str, binaries.Binary]:
    """The real etcd and kube-apiserver with the fake controller manager."""
    pem = Pki(tmp_path / "fake-pki").issue("kcm", "kcm", server_names=("127.0.0.1",))
    script = tmp_path / "fake-kube-controller-manager"
    script.write_text(
        FAKE_KCM.format(python=sys.executable, cert=str(pem.cert), key=str(pem.key), fail_after_s=fail_after_s)
    )
    script.chmod(0o755)
    return {**binaries.control_plane(), "kube-controller-manager": binaries.Binary("kube-controller-manager", script)}


@pytest.mark.parametrize("fail_after_s", [0.0, 2.0], ids=["before-healthy", "after-healthy"])
def test_a_controller_manager_that_exits_fails_start_up_with_its_log_and_stops_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_after_s: float
) -> None:
    control_plane = fake_control_plane(tmp_path, fail_after_s)
    monkeypatch.setattr(binaries, "control_plane", lambda: control_plane)
    workdir = tmp_path / "k8s"

    # "exited with 1", not "not ready after": the exit was noticed, not waited out (no timed assertion needed)
    with pytest.raises(ServiceError, match="kube-controller-manager exited with 1") as failure:
        cluster.start_cluster(workdir)

    assert "error starting controllers" in str(failure.value)
    assert_none_left(workdir)
