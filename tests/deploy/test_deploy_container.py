"""The container image (deploy/Containerfile), built and run for real with podman.

No registry is reachable from CI, so the test makes its own base image: debootstrap of the Debian release in the
host's apt sources (python3 and venv), imported into podman, passed as BASE_IMAGE. The Python packages come from a
wheel folder the host's pip fills (its own index, mirror and cache settings) and the build mounts read-only
(``podman build -v``): no second download, nothing of it left in the image. Then, with the server in the image:

- it refuses to start without the token file (the image's default command), and names uid 10001 for a store
  volume it cannot write, one line each;
- with a token file and a volume it serves: the HEALTHCHECK (``featureviz health``) passes, the Python client on
  the host uploads the tiny model and renders a job; it runs as uid 10001, with no compiler or pip in the image;
- SIGTERM stops it cleanly; a new container on the same volume still has the model and the finished job.

Runs where podman, runc and debootstrap are installed and this is root (debootstrap, rootful podman; .ci/run
installs them), else skips with one line. Everything it makes (images, containers, the volume, the base) is removed
afterwards. FEATUREVIZ_DEPLOY_CACHE=DIR keeps the base's root filesystem and the wheels there between runs.
Its figures (image size, time, disk) are printed at the end and quoted in the README's Deploy section.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UID = 10001
TOKEN = "deploy-test-token"
SECRET = "/run/secrets/featureviz/tokens"
NEEDS_DISK = 24 << 30  # at the peak: the build's working copy, its layer tar and the image (6.5 GB each), the wheels (3 GB)
STORE = "/var/lib/featureviz"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


# ---------------------------------------------------------------------------------------------------- environment


def _apt_mirror() -> tuple[str, str] | None:
    """(mirror URL, suite) of the first Debian source in the host's apt configuration (deb822 or one-line)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + [Path("/etc/apt/sources.list")]
    sources += sorted(Path("/etc/apt/sources.list.d").glob("*.list"))
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, re.M))
                uris, suites = fields.get("URIs", "").split(), fields.get("Suites", "").split()
                if "deb" in fields.get("Types", "").split() and uris and suites and "security" not in uris[0] \
                        and "debian" in uris[0]:
                    return uris[0], suites[0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb" and "debian" in parts[1] and "security" not in parts[1]:
                    return parts[1], parts[2]
    return None


def _unusable() -> str | None:
    missing = [tool for tool in ("podman", "runc", "debootstrap") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install podman runc debootstrap; .ci/run does, as root)"
    if os.geteuid() != 0:
        return "building the base image needs root (debootstrap) and rootful podman"
    if _apt_mirror() is None:
        return "no Debian mirror in the apt sources to debootstrap a base image from"
    free = shutil.disk_usage(_storage()).free
    if free < NEEDS_DISK:
        return f"{free >> 30} GiB free for podman's storage; the image, the wheels and the build need {NEEDS_DISK >> 30}"
    return None


def _storage() -> str:
    return "/var/lib/containers" if Path("/var/lib/containers").exists() else "/"


class Podman:
    """podman with the settings that work on this machine: a containers.conf without default ulimits (setting
    rlimits is not permitted here), chroot isolation for builds, runc and the host network for runs."""

    def __init__(self, workdir: Path):
        conf = workdir / "containers.conf"
        conf.write_text("[containers]\ndefault_ulimits = []\n")
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def __call__(self, *args: str, check: bool = True, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
        result = subprocess.run(["podman", *args], env=self.env, text=True, capture_output=True, timeout=timeout,
                                **kwargs)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args[:3])} ... exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def run_args(self, name: str) -> list[str]:
        return ["run", "--name", name, "--runtime", "runc", "--network=host"]


def _disk_used() -> int:
    """Bytes used on the file system of podman's storage (other processes' files count too)."""
    return shutil.disk_usage(_storage()).used


def _requirements() -> list[str]:
    """The image's Python requirements as pip strings: featureviz's own, the server and ray extras (EXTRAS'
    default), and the build backend of its wheel."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = project["project"]["optional-dependencies"]
    return [*project["project"]["dependencies"], *extras["server"], *extras["ray"],
            *project["build-system"]["requires"]]


class Built:
    def __init__(self, podman: Podman, tag: str, timings: dict, workdir: Path):
        self.podman, self.tag, self.timings, self.workdir = podman, tag, timings, workdir


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    reason = _unusable()
    if reason:
        pytest.skip(f"container test: {reason}")
    workdir = tmp_path_factory.mktemp("deploy")
    podman = Podman(workdir)
    info = podman("info", "--format", "{{.Host.OCIRuntime.Name}}", check=False)
    if info.returncode != 0:
        pytest.skip(f"container test: podman does not work here: {(info.stderr.strip().splitlines() or ['?'])[-1]}")
    cache = Path(os.environ["FEATUREVIZ_DEPLOY_CACHE"]) if os.environ.get("FEATUREVIZ_DEPLOY_CACHE") else workdir
    cache.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:10]
    base, tag = f"localhost/featureviz-test-base-{run_id}:1", f"localhost/featureviz-test-{run_id}:1"
    timings: dict[str, float] = {}
    disk0, peak = _disk_used(), [0]
    stop_watch = threading.Event()

    def watch_disk() -> None:  # the disk the test takes at its peak (other processes' writes count too)
        while not stop_watch.wait(2):
            peak[0] = max(peak[0], _disk_used() - disk0)

    watcher = threading.Thread(target=watch_disk, daemon=True)
    watcher.start()
    started = time.monotonic()
    try:
        # 1. the base: Debian's python3 and venv, nothing else
        mirror, suite = _apt_mirror()
        rootfs_tar = cache / f"base-{suite}.tar"
        t = time.monotonic()
        if not rootfs_tar.exists():
            rootfs = workdir / "rootfs"
            subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                            suite, str(rootfs), mirror], check=True, capture_output=True, timeout=1200)
            with tarfile.open(workdir / "base.tar.part", "w") as tar:
                tar.add(rootfs, arcname=".")
            shutil.rmtree(rootfs)
            (workdir / "base.tar.part").rename(rootfs_tar)
        with rootfs_tar.open("rb") as f:
            podman("import", "-", base, stdin=f)
        timings["base_s"] = time.monotonic() - t
        python = podman("run", "--rm", "--runtime", "runc", "--network=none", base, "python3", "-c",
                        "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')").stdout.strip()
        # 2. the wheels, through the host's pip (its index, mirror and cache); binary wheels for the base's Python
        t = time.monotonic()
        wheels = cache / f"wheels-py{python}"
        wheels.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "-d",
                        str(wheels), "--only-binary=:all:", "--python-version", python, *_requirements()],
                       check=True, capture_output=True, timeout=1800)
        timings["wheels_s"] = time.monotonic() - t
        # 3. the image: --layers=false keeps no intermediate image of the build stage
        t = time.monotonic()
        podman("build", "--isolation=chroot", "--layers=false", "--format", "docker", "-f",
               str(REPO / "deploy" / "Containerfile"), "--build-arg", f"BASE_IMAGE={base}",
               "--build-arg", "PIP_FIND_LINKS=/wheels", "--build-arg", "PIP_NO_INDEX=1",
               "-v", f"{wheels}:/wheels:ro", "-t", tag, str(REPO), timeout=1800)
        timings["build_s"] = time.monotonic() - t
        size = json.loads(podman("image", "inspect", tag).stdout)[0]["Size"]
        timings["image_bytes"] = size
        yield Built(podman, tag, timings, workdir)
    finally:
        for name in podman("ps", "-a", "--format", "{{.Names}}", check=False).stdout.split():
            if run_id in name:
                podman("rm", "-f", "-t", "0", name, check=False)
        for volume in podman("volume", "ls", "--format", "{{.Name}}", check=False).stdout.split():
            if run_id in volume:
                podman("volume", "rm", "-f", volume, check=False)
        podman("rmi", "-f", tag, base, check=False)
        if cache == workdir:  # nothing kept: the base's tar and the wheels (3 GB) go too
            shutil.rmtree(workdir, ignore_errors=True)
        stop_watch.set()
        watcher.join()
        timings["total_s"] = time.monotonic() - started
        timings["peak_disk_bytes"] = peak[0]
        timings["left_disk_bytes"] = _disk_used() - disk0
        print(f"\ncontainer test figures: {json.dumps({k: round(v, 1) for k, v in timings.items()})}",
              file=sys.stderr)


# ------------------------------------------------------------------------------------------------------- helpers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _name(built: Built, what: str) -> str:
    return f"{what}-{built.tag.split('featureviz-test-')[1].split(':')[0]}"


def _wait_listening(built: Built, name: str, timeout: float = 600) -> str:
    """Follow the container's log until the server says it listens (or the container ends: fail with its log);
    -> that line."""
    follow = subprocess.Popen(["podman", "logs", "-f", name], env=built.podman.env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    timer = threading.Timer(timeout, follow.kill)
    timer.start()
    lines = []
    try:
        for line in follow.stdout:
            lines.append(line)
            if "featureviz serve: listening on" in line:
                return line
        raise AssertionError(f"the server in {name} did not start:\n" + "".join(lines[-40:]))
    finally:
        timer.cancel()
        follow.kill()
        follow.wait()


def _one_line_failure(built: Built, *args: str) -> str:
    """Run the image to a refusal: exit status 1 and exactly one line of its own on stderr; that line."""
    result = built.podman("run", "--rm", "--runtime", "runc", "--network=host", *args, check=False, timeout=300)
    ours = [line for line in result.stderr.splitlines() if line.startswith("featureviz ")]
    assert result.returncode == 1 and len(ours) == 1, (result.returncode, result.stderr[-3000:])
    return ours[0]


# --------------------------------------------------------------------------------------------------------- tests


def test_image_refuses_bad_configuration_with_one_line(image, tmp_path):
    # the default command listens on 0.0.0.0 and reads the token file from the secret path: none mounted
    line = _one_line_failure(image, image.tag)
    assert SECRET in line and f"uid {UID}" in line, line
    # a store volume this uid cannot write (a host folder of root's, mode 0755)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} tenant-a\n")
    tokens.chmod(0o644)
    store = tmp_path / "root-store"
    store.mkdir(mode=0o755)
    line = _one_line_failure(image, "-v", f"{tokens}:{SECRET}:ro", "-v", f"{store}:{STORE}", image.tag,
                             "serve", "--host", "0.0.0.0", "--port", str(_free_port()), "--token-file", SECRET)
    assert f"uid {UID}" in line and "not writable" in line and STORE in line, line


def test_image_serves_persists_across_a_restart_and_runs_as_non_root(image, tmp_path):
    import torch

    from featureviz.client import Client
    from featureviz.client import FeaturevizClientError
    from featureviz.client import pb
    from support.models import TinyNet
    from support.models import export_onnx

    podman = image.podman
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} tenant-a\n")
    tokens.chmod(0o644)
    volume = _name(image, "featureviz-test-store")
    podman("volume", "create", volume)
    port = _free_port()

    def start(name: str) -> None:
        t = time.monotonic()
        # as the Kubernetes manifests run it: a read-only root filesystem (podman adds tmpfs on /tmp and /run; the
        # home gets its own, like the emptyDir there), no capabilities, no privilege escalation
        podman(*podman.run_args(name), "-d", "--read-only", "--tmpfs", "/home/featureviz:rw,mode=1777",
               "--cap-drop=ALL", "--security-opt", "no-new-privileges",
               "-v", f"{volume}:{STORE}", "-v", f"{tokens}:{SECRET}:ro",
               "-e", f"FEATUREVIZ_SERVER=127.0.0.1:{port}", image.tag,
               "serve", "--host", "0.0.0.0", "--port", str(port), "--token-file", SECRET, "--grace", "30")
        line = _wait_listening(image, name)
        assert "event loop uvloop)" in line, line  # the image has the server extra's uvloop, and serve uses it
        image.timings.setdefault("start_s", time.monotonic() - t)

    def stop(name: str) -> str:
        podman("kill", "--signal", "TERM", name)
        code = podman("wait", name, timeout=300).stdout.strip()
        log = podman("logs", name).stderr
        assert code == "0" and "featureviz serve: stopped" in log, (code, log[-3000:])
        return log

    first = _name(image, "featureviz-test-1")
    start(first)
    # the image's HEALTHCHECK: featureviz health, torch-free, against grpc.health.v1
    check = podman("healthcheck", "run", first, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # the server (PID 1) runs as the image's non-root user; the image has no compiler and no pip
    status = podman("exec", first, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, re.M)
    assert uids and uids.groups() == (str(UID), str(UID)), status
    assert "featureviz" in podman("exec", first, "cat", "/proc/1/cmdline").stdout
    tools = podman("exec", first, "sh", "-c", "command -v gcc cc make g++ pip pip3 || true").stdout.split()
    assert tools == [], tools
    assert podman("exec", first, "python3", "-c", "import pip", check=False).returncode != 0

    torch.manual_seed(0)
    onnx = export_onnx(TinyNet())
    with Client(f"127.0.0.1:{port}", token=TOKEN) as fv:
        fv.wait_ready(60)
        with Client(f"127.0.0.1:{port}", token="wrong") as stranger, pytest.raises(FeaturevizClientError) as no:
            stranger.info()
        assert no.value.code == "UNAUTHENTICATED"
        model = fv.upload(onnx, name="tiny.onnx")
        assert model.state == pb.MODEL_STATE_READY, model
        t = time.monotonic()
        job = fv.wait(fv.submit(model.sha256, {"channel": {"layer": "/Relu_1", "channel": 3}}, steps=8, size=32,
                                seed=1).id, timeout=600)
        image.timings["render_s"] = time.monotonic() - t
        assert job.state == pb.JOB_STATE_SUCCEEDED, job
        png = job.result.images[0].png
        assert png.startswith(b"\x89PNG")

    stop(first)
    # a new container on the same volume: the model and the finished job are still there
    second = _name(image, "featureviz-test-2")
    start(second)
    with Client(f"127.0.0.1:{port}", token=TOKEN) as fv:
        fv.wait_ready(60)
        again = fv.model(model.sha256)
        assert again.state == pb.MODEL_STATE_READY and again.display_name == "tiny.onnx", again
        kept = fv.job(job.id)
        assert kept.state == pb.JOB_STATE_SUCCEEDED and kept.result.images[0].png == png, kept.state
    stop(second)
