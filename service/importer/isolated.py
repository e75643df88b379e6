"""Imports in a separate process: defence in depth for the server's uploads.

    parent (server worker)                               child: python -I -m featureviz.importer.isolated
    cache hit? -> done                                   imports its modules, (root only) drops to nobody,
    spawn (no fork of the threaded server), empty        waits for the request (a spare started ahead waits
      0700 temp dir as cwd and HOME, a small env,   -->  here), sets rlimits (address space, CPU seconds,
      no inherited descriptors, own session              file size, no core), reads the file's bytes; parse,
                                                         checks, safe names, clean-up, convert, verify
    JSON and bytes checked: every name a safe id    <--  one JSON line (input spec, check report, the file's
    onnx2torch on the sanitized graph, catalog,          names by safe id) and the cleaned ONNX bytes; or
    cache (featureviz.importer.model.assemble)           {"error", "reason"}

Each child imports one file and is killed; with ``Isolation.warm`` the next one is started at once, so that an
import does not wait for python, torch, onnx and onnxruntime to load.

What comes back is data, never code: the parent parses JSON and an ONNX protobuf and refuses a graph holding any
name that is not a safe identifier before it converts it (no unpickling). A child that crashes, hits a limit or
runs past ``timeout_seconds`` is killed with its session and the import fails with one line:
``IMPORT_CRASHED``, ``IMPORT_TIMEOUT``, ``MODEL_TOO_LARGE`` (out of memory).

What it holds: a hole in onnx, onnxsim, onnxruntime, onnx2torch or torch reached while parsing, cleaning,
converting or verifying the file runs in the child, bounded in memory, CPU time and file size, without the
server's descriptors or environment and, when the server runs as root, as ``nobody``, which cannot write the
store or its database (files of root, mode 0644 or stricter). What it does not: the parent still parses the
sanitized ONNX protobuf, runs onnx2torch on it and runs the result (the renders do), so a hole reachable from a
graph of safe names and standard ops stays in the server; the child can read what its user can read and reach
the network; no seccomp, namespace or container sandbox; a server that does not run as root keeps its uid in
the child (the child can then write what the server can); the verification figures are the child's word.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from dataclasses import fields
from dataclasses import replace

from featureviz.errors import ModelImportError
from featureviz.importer import load
from featureviz.importer.cache import ImportCache
from featureviz.importer.limits import ImportLimits
from featureviz.importer.model import ImportedModel
from featureviz.importer.model import Prepared
from featureviz.importer.model import assemble
from featureviz.importer.inputs import InputSpec
from featureviz.importer.inputs import Preprocess
from featureviz.importer.verify import DEFAULT_TOLERANCE
from featureviz.importer.verify import CheckReport

__all__ = ["Isolation", "import_isolated", "FAULT_ENV"]

_LOG = logging.getLogger(__name__)
GiB = 1 << 30
# tests only, read by the parent at each import: "crash" | "hang" | "memory" make the child misbehave;
# "write:PATH" makes it report whether it may write PATH
FAULT_ENV = "FEATUREVIZ_FAULT_IMPORT"
_MAX_REPORT_BYTES = 64 << 20


@dataclass(frozen=True)
class Isolation:
    """Bounds of the import process."""

    timeout_seconds: float = 600.0
    # RLIMIT_AS, at least 3 x the import's max_activation_bytes + 4 GiB; the process maps about 3.7 GiB before any
    # model (torch, onnxruntime) and 4.2 GiB after EfficientNet-Lite0
    memory_bytes: int = 16 * GiB
    cpu_seconds: int = 1200
    file_bytes: int = 1 * GiB  # RLIMIT_FSIZE: the largest file it may write (its temp dir is its cwd)
    user: str | None = "nobody"  # the child's user when the server runs as root; None: keep the uid
    # keep one child started ahead (its imports done, waiting for a file): an import then skips the ~3 s start,
    # for about 1 GB of memory held while idle
    warm: bool = True


def import_isolated(source, *, cache_dir=None, limits: ImportLimits | None = None,
                    tolerance: float = DEFAULT_TOLERANCE, isolation: Isolation | None = None) -> ImportedModel:
    """:func:`featureviz.importer.import_model` (verified, cached) with everything that reads the file in a child
    process. ``source``: bytes or a path (an upload is one file: external data is refused)."""
    isolation = isolation or Isolation()
    data = source if isinstance(source, (bytes, bytearray, memoryview)) else load.read_source(source)[0]
    data = bytes(data)
    sha = load.sha256_of(data)
    cache = ImportCache(cache_dir)
    start = time.perf_counter()
    cached = cache.get(sha)
    if cached is not None and cached.check.verified:
        cached.check = cached.check.with_tolerance(tolerance)
        if cached.check.passed:
            cached.timings = {"cache": time.perf_counter() - start}
            return cached
    limits = limits or ImportLimits()
    # the catalog pass holds every activation of one image, the check a batch of two: room for the limit's worth
    memory = max(isolation.memory_bytes, min(3 * limits.max_activation_bytes + 4 * GiB, 1 << 46))
    isolation = replace(isolation, memory_bytes=memory)
    start = time.perf_counter()
    prepared = _run_child(data, limits, tolerance, isolation)
    # what the process costs: its start (python, torch, onnx, onnxruntime imports) and the answer's transfer
    prepared.timings["isolation"] = max(0.0, time.perf_counter() - start - sum(prepared.timings.values()))
    imported = assemble(sha, prepared)
    cache.put(sha, imported)
    return imported


def _child_user(isolation: Isolation):
    if isolation.user is None or os.name != "posix" or os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(isolation.user)
    except KeyError:
        _LOG.warning("import isolation: no user %r; the import process keeps the server's uid", isolation.user)
        return None
    return entry.pw_uid, entry.pw_gid


def _env(workdir: str) -> dict[str, str]:
    env = {"HOME": workdir, "TMPDIR": workdir, "PYTHONDONTWRITEBYTECODE": "1", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for name in ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


@dataclass
class _Child:
    process: subprocess.Popen
    workdir: str
    user: tuple[int, int] | None

    def close(self) -> None:
        _kill(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _spawn(user) -> _Child:
    """Start a child. It drops to ``user`` itself, after importing its (trusted) modules and before reading the
    request: ``Popen(user=...)`` forks the threaded server and calls setuid before exec, which crashed now and
    then here, and the interpreter may live where that user cannot read (pyenv under /root)."""
    workdir = tempfile.mkdtemp(prefix="featureviz-import-")
    uid, gid = user if user is not None else (-1, -1)
    if user is not None:
        os.chown(workdir, uid, gid)
    argv = [sys.executable, "-I", "-m", "featureviz.importer.isolated", str(uid), str(gid)]
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=workdir, env=_env(workdir), close_fds=True, start_new_session=True)
    return _Child(process, workdir, user)


_SPARE: list[_Child] = []  # at most one child started ahead
_SPARE_LOCK = threading.Lock()


def _take_child(isolation: Isolation) -> _Child:
    """The spare child if it suits (same user, still alive), else a new one; with ``warm``, start the next spare."""
    user = _child_user(isolation)
    with _SPARE_LOCK:
        spare = _SPARE.pop() if _SPARE else None
        if isolation.warm:
            _SPARE.append(_spawn(user))  # starts importing now, in its own process
    if spare is not None and (spare.user != user or spare.process.poll() is not None):
        spare.close()
        spare = None
    return spare or _spawn(user)


@atexit.register
def _close_spare() -> None:
    with _SPARE_LOCK:
        while _SPARE:
            _SPARE.pop().close()


def _run_child(data: bytes, limits: ImportLimits, tolerance: float, isolation: Isolation) -> Prepared:
    request = json.dumps({"limits": {f.name: getattr(limits, f.name) for f in fields(limits)},
                          "tolerance": tolerance, "fault": os.environ.get(FAULT_ENV, ""),
                          "rlimits": [isolation.memory_bytes, isolation.cpu_seconds, isolation.file_bytes]})
    child = _take_child(isolation)
    try:
        out, err = child.process.communicate(request.encode() + b"\n" + data, timeout=isolation.timeout_seconds)
    except subprocess.TimeoutExpired:
        raise ModelImportError(f"the import did not finish within {isolation.timeout_seconds:g} s (the import "
                               "time limit); simplify the model or export it at a smaller size",
                               reason="IMPORT_TIMEOUT") from None
    finally:
        child.close()
    return _parse_result(child.process.returncode, out, err, isolation)


def _kill(process: subprocess.Popen) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: threads and any process it started
        except ProcessLookupError:
            pass
        process.wait()


def _parse_result(returncode: int, out: bytes, err: bytes, isolation: Isolation) -> Prepared:
    header, _, body = out.partition(b"\n")
    try:
        report = json.loads(header) if header else None
    except ValueError:
        report = None
    if not isinstance(report, dict):
        raise ModelImportError(_crash_message(returncode, err, isolation), reason="IMPORT_CRASHED")
    if "error" in report:
        reason = report.get("reason")
        reason = reason if isinstance(reason, str) and reason.isidentifier() and reason.isupper() else "IMPORT_FAILED"
        message = str(report["error"]).replace("\n", " ")[:1000]
        raise ModelImportError(message, reason=reason)
    if returncode != 0 or len(body) != report.get("model_bytes") or len(out) > _MAX_REPORT_BYTES + len(body):
        raise ModelImportError(_crash_message(returncode, err, isolation), reason="IMPORT_CRASHED")
    try:
        return _prepared(report, body)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelImportError(f"the import process answered something malformed ({type(exc).__name__}: "
                               f"{str(exc)[:200]}); the model is refused", reason="IMPORT_CRASHED") from None


def _crash_message(returncode: int, err: bytes, isolation: Isolation) -> str:
    if returncode is not None and returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        if -returncode == signal.SIGXCPU:
            return (f"the import used more than {isolation.cpu_seconds} s of CPU time (the import limit); "
                    "simplify the model")
        what = f"was killed by {name}"
    else:
        what = f"exited with status {returncode}"
    last = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    if last:
        _LOG.warning("the import process %s; its last output: %s", what, last[-1][:500])
    return f"the import process {what} before answering; the model is refused (a bug or a hostile file)"


def _prepared(report: dict, body: bytes) -> Prepared:
    """The child's answer as a Prepared, every part checked (types, safe names); the model is converted later."""
    import onnx

    from featureviz.importer.names import SAFE_NAME
    from featureviz.importer.names import Names
    from featureviz.importer.names import check_safe

    model = onnx.ModelProto()
    model.ParseFromString(body)
    check_safe(model)
    names = Names(original=_str_map(report["names"]["original"]), nodes=_str_map(report["names"]["nodes"]))
    if not all(SAFE_NAME.match(key) for key in (*names.original, *names.nodes)):
        raise ValueError("a name map key is not a safe identifier")
    spec = _spec(report["spec"])
    check = _check(report["check"])
    timings = {str(k): float(v) for k, v in dict(report.get("timings", {})).items()}
    return Prepared(model, names, spec, check, timings=timings)


def _str_map(value) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise TypeError("a name map is not {str: str}")
    return dict(value)


MAX_LATENT = 1 << 20  # a child's answer with a longer latent is not believed (the server's limit is far lower)


def _int_or_none(value):
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise TypeError(f"not a size: {value!r}"[:100])
    return value


def _spec(d: dict) -> InputSpec:
    pre = d["preprocess"]
    latent = _int_or_none(d.get("latent", 0)) or 0
    if latent:  # a generator's latent input (issue 25): (N, Z) or (N, Z, 1, 1), float32
        if d["layout"] not in ("NC", "NCHW") or d["channels"] != latent or d["dtype"] != "float32" \
                or latent > MAX_LATENT or tuple(d["default_size"]) != (1, 1):
            raise ValueError("bad latent input spec")
    elif d["layout"] not in ("NCHW", "NHWC") or d["channels"] not in (1, 3) or d["dtype"] not in ("float32", "uint8"):
        raise ValueError("bad input spec")
    size = tuple(_int_or_none(v) for v in d["default_size"])
    if len(size) != 2 or not all(size):
        raise ValueError("bad default size")
    return InputSpec(name=str(d["name"]), layout=d["layout"], channels=d["channels"], height=_int_or_none(d["height"]),
                     width=_int_or_none(d["width"]), batch=_int_or_none(d["batch"]), default_size=size,
                     preprocess=Preprocess(mean=tuple(float(v) for v in pre["mean"]),
                                           std=tuple(float(v) for v in pre["std"]),
                                           channel_order=str(pre["channel_order"])),
                     dtype=d["dtype"], latent=latent)


def _check(d: dict) -> CheckReport:
    def number(v):
        return None if v is None else float(v)

    if d["batch_mode"] not in ("native", "per-image"):
        raise ValueError("bad batch mode")
    return CheckReport(number(d["max_rel_err"]), number(d["max_rel_err_batch1"]), number(d["max_rel_err_batch"]),
                       int(d["batch"]), float(d["tolerance"]), bool(d["passed"]), bool(d["verified"]),
                       str(d["reference"])[:200], bool(d["batch_rewritten"]), d["batch_mode"])


# ------------------------------------------------------------------------------------------------ the child


# imported before the child drops its privileges: afterwards the interpreter's files may be out of reach
_PRELOAD = ("resource", "tempfile", "onnx", "onnx.checker", "onnx.inliner", "onnx.external_data_helper",
            "onnx.shape_inference", "onnx.version_converter", "onnx.numpy_helper", "onnxsim", "onnxscript.optimizer",
            "onnxruntime", "onnx2torch", "featureviz.importer.clean", "featureviz.importer.converters",
            "featureviz.importer.names", "featureviz.importer.portable", "featureviz.importer.verify",
            "featureviz.importer.catalog")


def _preload() -> None:
    import importlib

    for name in _PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional one (onnxscript): its fallback then fails in one line
            pass


def _drop_privileges(uid: int, gid: int) -> None:
    if uid < 0:
        return
    for entry in os.listdir("."):  # what the imports wrote as root (a ~/.cache): the new user could not remove it
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            os.unlink(entry)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != gid:
        raise SystemExit("the import process could not drop its privileges")


def _limit_self(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
    import resource

    os.umask(0o077)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file size limit fails instead of killing
    for limit, value in ((resource.RLIMIT_AS, memory_bytes), (resource.RLIMIT_CPU, cpu_seconds),
                         (resource.RLIMIT_FSIZE, file_bytes), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))


def _probe_write(path: str) -> None:
    try:
        with open(path, "w"):
            pass
    except OSError as exc:
        raise ModelImportError(f"write to {path} refused: {exc.strerror}", reason="FAULT_WRITE_DENIED") from None
    raise ModelImportError(f"wrote {path}", reason="FAULT_WRITE_ALLOWED")


def _answer(out, report: dict, body: bytes = b"") -> None:
    out.write(json.dumps(report).encode() + b"\n")
    out.write(body)
    out.flush()


def _child(argv: list[str]) -> int:
    # the answer goes to a private copy of stdout; whatever a library prints goes to stderr
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    _preload()
    _drop_privileges(int(argv[0]), int(argv[1]))
    line = sys.stdin.buffer.readline()  # the parent's request (it may come much later: a spare waits here)
    if not line:  # the parent closed the pipe (it exited): a spare that was never used
        shutil.rmtree(os.getcwd(), ignore_errors=True)
        return 0
    request = json.loads(line)
    memory = int(request["rlimits"][0])
    _limit_self(*(int(v) for v in request["rlimits"]))  # before a byte of the file is read
    data = sys.stdin.buffer.read()
    fault = str(request.get("fault", ""))
    try:
        if fault == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if fault == "hang":
            time.sleep(3600)
        if fault == "memory":
            bytearray(memory)
        if fault.startswith("write:"):  # may the import process write there?
            _probe_write(fault[len("write:"):])
        from featureviz.importer.model import prepare

        prepared = prepare(data, None, verify=True, tolerance=float(request["tolerance"]),
                           limits=ImportLimits(**request["limits"]))
    except ModelImportError as exc:
        _answer(out, {"error": exc.message, "reason": exc.reason})
        return 0
    except MemoryError:
        _answer(out, {"error": f"the import needs more than {memory / GiB:.3g} GiB of memory (the import "
                               "memory limit); export the model at a smaller size", "reason": "MODEL_TOO_LARGE"})
        return 0
    except Exception as exc:  # a converter bug: one line, the model refused
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        _answer(out, {"error": f"the model could not be converted ({type(exc).__name__}: {first})",
                      "reason": "CONVERSION_FAILED"})
        return 0
    body = prepared.model.SerializeToString()
    names = prepared.names
    _answer(out, {"spec": prepared.spec.to_dict(), "check": prepared.check.to_dict(), "timings": prepared.timings,
                  "names": {"original": names.original, "nodes": names.nodes}, "model_bytes": len(body)}, body)
    return 0


if __name__ == "__main__":
    code = _child(sys.argv[1:])
    sys.stderr.flush()
    os._exit(code)  # the answer is written and flushed: skip the interpreter's teardown (a second with torch)
