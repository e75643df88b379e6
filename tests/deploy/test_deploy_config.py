"""Bad configuration of a deployed server fails early, with one line each and exit status 1 (issue 27): no token
file on a non-loopback host, a token file that is missing or empty, a store the process cannot write (naming its
uid), a Ray address that does not answer within --ray-timeout. And ``featureviz health``, the image's health check,
against a real server. ``featureviz serve`` runs as a real subprocess; no container is needed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support.serve import ServeProcess
from support.serve import serve_failure

NOBODY = 65534


def _one_line(code: int, stderr: str) -> str:
    ours = [line for line in stderr.splitlines() if line.startswith("featureviz ")]
    assert code == 1 and len(ours) == 1, (code, stderr)
    return ours[0]


def test_a_non_loopback_host_needs_a_token_file(tmp_path):
    line = _one_line(*serve_failure(tmp_path / "store", "--host", "0.0.0.0"))
    assert "refusing to listen on '0.0.0.0' without auth" in line and "--token-file" in line


def test_a_missing_or_empty_token_file_is_named(tmp_path):
    missing = tmp_path / "secrets" / "tokens"
    line = _one_line(*serve_failure(tmp_path / "store", "--host", "0.0.0.0", "--token-file", str(missing)))
    assert str(missing) in line and "No such file or directory" in line and f"uid {os.getuid()}" in line
    empty = tmp_path / "tokens"
    empty.write_text("# nothing yet\n")
    # an operator who names a token file means auth, on loopback too: an empty one never starts a server without it
    line = _one_line(*serve_failure(tmp_path / "store", "--token-file", str(empty)))
    assert str(empty) in line and "holds no tokens" in line


def _store_problem_as_nobody(store) -> str:
    """``store_problem(store)`` as uid nobody, in a forked child (as root this test's own uid writes anywhere, and
    nobody may not be able to run this environment's interpreter, so it cannot be a fresh process)."""
    from featureviz.cli.serve import store_problem

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, check, report, leave without any cleanup of the parent's
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.write(write, (store_problem(store) or "").encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        answer = f.read().decode()
    os.waitpid(pid, 0)
    return answer


def _problem(store) -> tuple[int, str]:
    """The store check's line: through the CLI as this user (not root), or in a child as nobody (root)."""
    if os.geteuid() == 0:
        return NOBODY, f"featureviz serve: error: {_store_problem_as_nobody(store)}"
    result = subprocess.run([sys.executable, "-m", "featureviz", "serve", "--port", "0", "--store", str(store)],
                            capture_output=True, text=True, timeout=240)
    return os.getuid(), _one_line(result.returncode, result.stderr)


def test_a_store_this_user_cannot_write_names_its_uid():
    root = os.geteuid() == 0
    top = Path(tempfile.mkdtemp(prefix="featureviz-store-check-"))  # pytest's tmp_path is private to its user
    top.chmod(0o755)
    parent = top / "volume"
    parent.mkdir()
    parent.chmod(0o755 if root else 0o555)
    try:
        # a store that cannot be created (the volume's root is not this user's)
        uid, line = _problem(parent / "store")
        assert f"uid {uid}" in line and str(parent / "store") in line and "Permission denied" in line, line
        # a store that exists but is not writable (say, the volume of an earlier run as root)
        parent.chmod(0o777)
        store = parent / "store"
        (store / "models").mkdir(parents=True)
        store.chmod(0o777)
        (store / "models").chmod(0o755 if root else 0o555)
        uid, line = _problem(store)
        assert f"uid {uid}" in line and "models in it is not writable" in line, line
        assert "fsGroup" in line  # what to do about it on Kubernetes
    finally:
        parent.chmod(0o755)
        if (parent / "store" / "models").exists():
            (parent / "store" / "models").chmod(0o755)
        shutil.rmtree(top)


def test_a_ray_address_that_does_not_answer_ends_serve_within_the_timeout(tmp_path):
    """The closed port and the silent port are tests/service/test_service_quotas.py's; here the Kubernetes case of a
    head Service name that does not resolve (a typo, or the RayCluster not applied)."""
    pytest.importorskip("ray")
    line = _one_line(*serve_failure(tmp_path / "store", "--ray", "featureviz-no-such-head.invalid:6379",
                                    "--ray-timeout", "5"))
    assert "featureviz-no-such-head.invalid:6379" in line and "(--ray-timeout)" in line


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_health_command_answers_for_a_real_server(tmp_path):
    def health(address: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "featureviz", "health", "--server", address, "--timeout", "10"],
                              capture_output=True, text=True, timeout=120)

    down = health(f"127.0.0.1:{_closed_port()}")
    assert down.returncode == 1 and down.stderr.count("\n") == 1 and "UNAVAILABLE" in down.stderr, down.stderr
    tokens = tmp_path / "tokens"
    tokens.write_text("secret tenant-a\n")
    with ServeProcess(tmp_path / "store", "--token-file", str(tokens)) as server:
        up = health(server.address)  # no token: grpc.health.v1 is open, as Kubernetes' grpc probes need
        assert up.returncode == 0 and up.stdout.strip() == "SERVING", up.stdout + up.stderr
        # the health command is torch-free (a container probe runs it every 30 s)
        imported = subprocess.run([sys.executable, "-X", "importtime", "-m", "featureviz", "health", "--server",
                                   server.address], capture_output=True, text=True, timeout=120).stderr
        assert " torch" not in imported and "numpy" not in imported
        assert server.stop() == 0
