"""``featureviz serve``: the gRPC service on grpc.aio (models, jobs, info, health, reflection on one port)."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["register", "run", "store_problem"]

DEFAULT_PORT = 50051


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="run the gRPC service",
                              description="Run the featureviz gRPC service. Stop with Ctrl-C or SIGTERM: the "
                                          "running job finishes within --grace seconds or is re-queued.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (0: a free one; default: %(default)s)")
    p.add_argument("--store", default=os.environ.get("FEATUREVIZ_STORE", "featureviz-store"),
                   help="store directory: model files and the SQLite metadata (default: %(default)s)")
    p.add_argument("--token-file", help="bearer tokens, one 'TOKEN TENANT [read|write]' per line (or "
                                        "FEATUREVIZ_TOKENS='tok=tenant,tok2=tenant read,...'); read: a read-only "
                                        "token; without tokens there is no auth")
    p.add_argument("--allow-insecure-remote", action="store_true",
                   help="allow a non-loopback --host without auth")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA: require client certificates signed by it (mTLS)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0: a free port; default: off)")
    p.add_argument("--http-port", type=int, default=None, metavar="P",
                   help="serve the web explorer on http://HOST:P/ (0: a free port; default: off)")
    p.add_argument("--http-host", default=None, help="address of the web explorer (default: --host)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--ray", nargs="?", const="auto", default=None, metavar="auto|ADDRESS",
                   help="run the workers as Ray actors (featureviz[ray]): 'auto' (the default with --ray) starts "
                        "a local Ray on loopback, ADDRESS joins a cluster; one actor per GPU, or --workers N CPU "
                        "actors (default: the embedded in-process worker)")
    p.add_argument("--ray-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="with --ray ADDRESS: give up joining the cluster after this long and exit (default: "
                        "%(default)s)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="with --ray: N CPU worker actors (default: one per GPU of the cluster, else 1)")
    p.add_argument("--worker-process", action="store_true",
                   help="run the worker (the device loop, everything torch) in a child process: the server's "
                        "gRPC, store and events do not share its GIL; a child that dies is started again and its "
                        "jobs run again (default: in the server's process)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of the compute worker (default: torch's, one per core)")
    p.add_argument("--max-step-images", type=int, default=None, metavar="N",
                   help="most images in one device step, over all the jobs sharing it (1: one job at a time; "
                        "default: 64 on CUDA, 4 on a CPU, see the README)")
    p.add_argument("--max-batch", type=int, dest="max_step_images", metavar="N",
                   help="deprecated alias of --max-step-images")
    p.add_argument("--progress-interval", type=float, default=0.25,
                   help="at most one progress event per job every so many seconds, plus the last step "
                        "(0: every step; default: %(default)s)")
    p.add_argument("--max-progress-rate", type=float, default=256.0, metavar="N",
                   help="at most N progress events a second from a worker over all its jobs: with many jobs running, "
                        "each job's interval grows to jobs / N seconds (0: no bound; not with --progress-interval 0, "
                        "every step; default: %(default)s)")
    p.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats on idle watch streams")
    p.add_argument("--grace", type=float, default=5.0, help="seconds a running job may finish on shutdown")
    p.add_argument("--max-upload-mb", type=int, default=1024, help="largest model upload (default: %(default)s)")
    p.add_argument("--upload-idle-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="end an upload stream that sends nothing for this long, releasing its lock; the client "
                        "resumes from what the server holds (default: %(default)s)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default: %(default)s)")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace):
    from featureviz.server import Limits
    from featureviz.server import ServerConfig
    from featureviz.server import parse_tokens

    text = os.environ.get("FEATUREVIZ_TOKENS", "")
    if args.token_file:
        text += "\n" + _read_token_file(args.token_file)
    tokens, read_only = parse_tokens(text)
    return ServerConfig(
        store_dir=args.store, host=args.host, port=args.port, tokens=tokens, read_only=read_only,
        allow_insecure_remote=args.allow_insecure_remote, device=args.device, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, metrics_port=args.metrics_port,
        heartbeat_seconds=args.heartbeat, grace_seconds=args.grace, upload_idle_timeout_seconds=args.upload_idle_timeout,
        threads=args.threads, max_step_images=args.max_step_images, progress_interval=args.progress_interval,
        max_progress_rate=args.max_progress_rate, http_port=args.http_port, http_host=args.http_host, ray=args.ray,
        workers=args.workers,
        ray_timeout_seconds=args.ray_timeout, worker_process=args.worker_process,
        limits=Limits(max_upload_bytes=args.max_upload_mb << 20),
    )


def _read_token_file(path: str) -> str:
    """The token file's text; one line naming the file and the problem when it is missing, unreadable or empty (an
    operator who names a token file means auth: an empty one never starts a server without it)."""
    from featureviz.errors import InvalidSpec
    from featureviz.server import parse_tokens

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except OSError as exc:
        raise InvalidSpec("token_file", f"cannot read {path} as uid {os.getuid()}: {exc.strerror}; mount the "
                                        "token file there (one 'TOKEN TENANT [read|write]' a line)") from None
    except UnicodeDecodeError:
        raise InvalidSpec("token_file", f"{path} is not UTF-8 text") from None
    if not parse_tokens(text)[0]:
        raise InvalidSpec("token_file", f"{path} holds no tokens (one 'TOKEN TENANT [read|write]' a line)")
    return text


def _user() -> str:
    """``uid N (name)`` of this process, the name when the passwd database has one."""
    import pwd

    uid = os.getuid()
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def store_problem(path: str | os.PathLike) -> str | None:
    """Why this process cannot keep its store at ``path`` (one line naming the uid), or None.

    Checked before anything starts: the directory is created if missing, a file is created and removed in it, and
    every entry already at its top (the SQLite file and its folders, say from a run as another user) must be
    writable. A volume mounted with the wrong owner fails here rather than at the first upload."""
    import tempfile
    from pathlib import Path

    store = Path(path)
    who = _user()
    fix = f"give it to {who} (Kubernetes: securityContext.fsGroup {os.getgid()}) or pass another --store"
    try:
        store.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--store {store}: cannot create it as {who}: {exc.strerror}; {fix}"
    if not store.is_dir():
        return f"--store {store} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=".featureviz-write-check-", dir=store)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"--store {store} is not writable by {who}: {exc.strerror}; {fix}"
    try:
        entries = sorted(store.iterdir())
    except OSError as exc:
        return f"--store {store} cannot be listed by {who}: {exc.strerror}; {fix}"
    for entry in entries:
        if not os.access(entry, os.W_OK) or (entry.is_dir() and not os.access(entry, os.X_OK)):
            return f"--store {store}: {entry.name} in it is not writable by {who}; {fix}"
    return None


def run(args: argparse.Namespace) -> int:
    import logging

    from featureviz.errors import FeaturevizError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, value in (("--threads", args.threads), ("--max-step-images", args.max_step_images),
                        ("--workers", args.workers)):
        if value is not None and value < 1:
            print(f"featureviz serve: {name} must be a positive integer, got {value}", file=sys.stderr)
            return 2
    if not args.ray_timeout > 0:
        print(f"featureviz serve: --ray-timeout must be > 0 seconds, got {args.ray_timeout}", file=sys.stderr)
        return 2
    if args.progress_interval < 0:
        print(f"featureviz serve: --progress-interval must be >= 0, got {args.progress_interval}", file=sys.stderr)
        return 2
    if not args.max_progress_rate >= 0:  # NaN too
        print(f"featureviz serve: --max-progress-rate must be >= 0, got {args.max_progress_rate}", file=sys.stderr)
        return 2
    if args.worker_process and args.ray is not None:
        print("featureviz serve: --worker-process and --ray exclude each other (the workers are either Ray actors "
              "or one child process)", file=sys.stderr)
        return 2
    if args.workers is not None and args.ray is None:
        print("featureviz serve: --workers needs --ray", file=sys.stderr)
        return 2
    if args.ray is not None:
        import importlib.util

        from featureviz.worker.ray_pool import RAY_MISSING

        if importlib.util.find_spec("ray") is None:
            print(RAY_MISSING, file=sys.stderr)
            return 2
    config = _config(args)  # token file, auth on a non-loopback --host: FeaturevizError, one line (cli.main)
    problem = store_problem(config.store_dir)
    if problem:
        print(f"featureviz serve: error: {problem}", file=sys.stderr)
        return 1
    from featureviz.server.loop import run as run_loop

    try:
        code = run_loop(_serve(config))  # on uvloop's loop where it is installed (featureviz.server.loop)
    except FeaturevizError as err:  # e.g. --ray ADDRESS did not answer: a thread may still wait in ray.init
        print(f"featureviz serve: error: {err}", file=sys.stderr, flush=True)
        code = 1
    # The server has stopped: every call has its status, the jobs are done or re-queued, the store is closed.
    # Leave without the interpreter's teardown of torch and the other extensions (1-3 s), so a SIGTERM ends the
    # process within --grace.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _serve(config) -> int:
    import asyncio
    import signal

    from featureviz.server import create_server
    from featureviz.server.loop import loop_name

    from featureviz.heap import WORKER_PRELOAD
    from featureviz.heap import settle

    server, port = create_server(config)
    await server.start()
    # this process's heap frozen before any call (featureviz.heap); the in-process worker's imports first
    settle(() if config.worker_process or config.ray is not None else WORKER_PRELOAD)
    tls = "mTLS" if config.tls_client_ca else ("TLS" if config.tls_cert else "plaintext")
    print(f"featureviz serve: listening on {config.host}:{port} ({tls}, store {config.store_dir}, "
          f"token auth {'on' if config.tokens else 'off'}, images per step {server.scheduler.max_step_images}, "
          f"event loop {loop_name(asyncio.get_running_loop())})",
          file=sys.stderr, flush=True)
    if config.ray is not None:
        workers = server.scheduler.worker.workers()
        print(f"featureviz serve: {len(workers)} Ray worker(s): " + ", ".join(
            f"{w.id} ({w.device.kind}, pid {w.pid} on {w.node})" for w in workers), file=sys.stderr, flush=True)
    if config.worker_process:
        print(f"featureviz serve: worker process pid {server.scheduler.worker.pid}", file=sys.stderr, flush=True)
    if server.metrics_port is not None:
        print(f"featureviz serve: metrics on http://{config.host}:{server.metrics_port}/metrics", file=sys.stderr,
              flush=True)
    if server.web is not None:
        print(f"featureviz serve: web explorer on {server.web.url}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("featureviz serve: stopping", file=sys.stderr, flush=True)
        await server.stop()
        print("featureviz serve: stopped", file=sys.stderr, flush=True)
    return 0
