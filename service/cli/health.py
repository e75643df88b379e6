"""``featureviz health``: a grpc.health.v1 Check of a server, for container health checks and scripts.

Torch-free and quick: it imports grpc and grpc_health only. Exit status 0 when the service answers SERVING, 1 with
one line otherwise (NOT_SERVING while it drains on shutdown, unreachable, or no answer within --timeout).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["register", "run"]


def register(subparsers) -> None:
    from featureviz.cli.remote import DEFAULT_SERVER

    p = subparsers.add_parser("health", help="check that a server answers SERVING (grpc.health.v1)",
                              description="Ask a featureviz server's grpc.health.v1 service whether it serves. "
                                          "Exit status 0: SERVING; 1: anything else, with one line.")
    p.add_argument("--server", default=os.environ.get("FEATUREVIZ_SERVER", DEFAULT_SERVER), metavar="ADDR",
                   help="host:port of the server (env FEATUREVIZ_SERVER; default: %(default)s)")
    p.add_argument("--service", default="", help="the service name to check (default: the whole server)")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="give up after this long (default: %(default)s)")
    p.add_argument("--tls-ca", default=os.environ.get("FEATUREVIZ_TLS_CA"), metavar="PEM",
                   help="connect with TLS, trusting this CA (env FEATUREVIZ_TLS_CA)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2
    from grpc_health.v1 import health_pb2_grpc

    from featureviz.errors import echo

    if not args.timeout > 0:
        print(f"featureviz health: --timeout must be > 0 seconds, got {args.timeout}", file=sys.stderr)
        return 2
    if args.tls_ca:
        try:
            with open(args.tls_ca, "rb") as f:
                credentials = grpc.ssl_channel_credentials(f.read())
        except OSError as exc:
            print(f"featureviz health: cannot read --tls-ca {echo(args.tls_ca)}: {exc.strerror}", file=sys.stderr)
            return 1
        channel = grpc.secure_channel(args.server, credentials)
    else:
        channel = grpc.insecure_channel(args.server)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
        except grpc.RpcError as err:
            detail = ((err.details() or "").strip().splitlines() or [""])[0][:300]
            print(f"featureviz health: {echo(args.server)}: {err.code().name}" + (f": {detail}" if detail else ""),
                  file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"featureviz health: {echo(args.server)}: {status}", file=sys.stderr)
        return 1
    print(status)
    return 0
