"""``featureviz serve`` as a real subprocess of this environment's Python: started on a free port, its stderr read
line by line (``lines``), stopped with a signal.

    server = ServeProcess(tmp_path / "store", "--max-step-images", "1")     # returns once it listens
    with Client(server.address) as fv: ...
    assert server.stop(signal.SIGTERM) == 0                            # its exit code

``ServeProcess.support_script("held_worker.py", ...)`` starts a server script of tests/support/ the same way (they
print the same ``listening on`` line). ``serve_failure`` runs one that must refuse to start (a damaged store, an unreachable Ray address) and returns its
exit code and stderr.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

__all__ = ["ServeProcess", "serve_failure", "START_SECONDS"]

START_SECONDS = 600.0  # a bound, not a timing: a loaded 2-core machine imports torch (and Ray) slowly
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")
_EXPLORER = re.compile(r"web explorer on (\S+)")


def _command(store, extra) -> list[str]:
    return [sys.executable, "-m", "featureviz", "serve", "--port", "0", "--store", str(store), *extra]


class ServeProcess:
    """A started ``featureviz serve --port 0 --store STORE --heartbeat 0.5 --grace 0 --log-level WARNING *extra``
    (a later flag in ``extra`` wins). ``address``: 127.0.0.1 and the port it printed; ``http_url``: the explorer's
    address with ``--http-port``; ``lines``: its stderr so far. A process that exits before it listens fails the
    test at once with what it printed."""

    def __init__(self, store, *extra: str, env: dict | None = None, argv: list[str] | None = None):
        args = ["--heartbeat", "0.5", "--grace", "0", "--log-level", "WARNING", *extra]
        self.proc = subprocess.Popen(argv or _command(store, args), stderr=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, text=True,
                                     env={**(env or os.environ), "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.port = 0
        self.http_url: str | None = None
        self._wants_http = "--http-port" in extra
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        if not self._ready.wait(START_SECONDS) or not self.port or (self._wants_http and not self.http_url):
            self.proc.kill()
            raise AssertionError("featureviz serve did not start:\n" + "".join(self.lines))
        self.address = f"127.0.0.1:{self.port}"

    @classmethod
    def support_script(cls, name: str, *args) -> "ServeProcess":
        """Start ``tests/support/NAME`` with ``args`` (a server built in-process there: a held or scripted worker
        behind the real servicers), with the tests folder importable."""
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")])}
        return cls(None, env=env, argv=[sys.executable, os.path.join(here, "support", name), *map(str, args)])

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            listening, explorer = _LISTENING.search(line), _EXPLORER.search(line)
            if listening:
                self.port = int(listening.group(1))
            if explorer:
                self.http_url = explorer.group(1)
            if self.port and (self.http_url or not self._wants_http):
                self._ready.set()
        self._ready.set()  # it exited: the constructor reports what it printed

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` (SIGTERM: a graceful stop; SIGKILL: a crash) and return the exit code once it exited and
        its last lines are read."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(120)
        self._reader.join(60)
        return code

    def __enter__(self) -> "ServeProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(60)


def serve_failure(store, *extra: str, timeout: float = 240, env: dict | None = None) -> tuple[int, str]:
    """Run ``featureviz serve --port 0 --store STORE *extra`` that should refuse to start: (exit code, stderr). One
    that starts listening anyway is killed at once (its stderr then says ``listening on``). ``env``: its
    environment (default: this one's)."""
    proc = subprocess.Popen(_command(store, extra), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines = []
    try:
        for line in proc.stderr:  # until it exits, or says it listens
            lines.append(line)
            if "listening on" in line:
                proc.kill()
                break
        return proc.wait(60), "".join(lines)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
