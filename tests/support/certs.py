"""Certificates for the TLS and mTLS tests, made with the openssl command: a CA, and a server and a client
certificate it signed, each valid for 127.0.0.1 and localhost for one day (the ``certs`` fixture of
``tests/conftest.py`` makes them once per session)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

__all__ = ["make_certs", "openssl_missing"]

SUBJECT_ALT_NAME = "subjectAltName=IP:127.0.0.1,DNS:localhost"


def openssl_missing() -> str | None:
    return None if shutil.which("openssl") else "openssl is not installed (apt-get install -y openssl)"


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_certs(d: Path) -> Path:
    """Into ``d``: ``ca.pem``/``ca.key``, ``server.pem``/``server.key``, ``client.pem``/``client.key``. Returns d."""
    d = Path(d)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "ca.key"), "-out", str(d / "ca.pem"),
             "-days", "1", "-subj", "/CN=featureviz test CA")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / f"{name}.key"), "-out",
                 str(d / f"{name}.csr"), "-subj", f"/CN={name}", "-addext", SUBJECT_ALT_NAME)
        _openssl("x509", "-req", "-in", str(d / f"{name}.csr"), "-CA", str(d / "ca.pem"), "-CAkey", str(d / "ca.key"),
                 "-CAcreateserial", "-out", str(d / f"{name}.pem"), "-days", "1", "-copy_extensions", "copy")
    return d
