"""``featureviz jobs list|watch|cancel``: follow the jobs of a featureviz server."""

from __future__ import annotations

import argparse
import json
import sys

from featureviz.cli.remote import add_connection_args
from featureviz.cli.remote import client_command
from featureviz.cli.remote import connect

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("jobs", help="list, watch and cancel render jobs on a server")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = actions.add_parser("list", help="the jobs, newest first")
    ls.add_argument("--state", choices=["queued", "running", "succeeded", "failed", "cancelled"])
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    watch = actions.add_parser("watch", help="follow a job until it ends (re-attaches after a dropped stream)")
    watch.add_argument("job", help="job id or jobs/<id>")
    watch.add_argument("--out", help="write the images of the finished job into this folder")
    watch.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    watch.set_defaults(func=_watch)

    cancel = actions.add_parser("cancel", help="stop a queued or running job (it keeps its partial images)")
    cancel.add_argument("job", help="job id or jobs/<id>")
    cancel.set_defaults(func=_cancel)

    for sub in (ls, watch, cancel):
        add_connection_args(sub)


def _state_name(state: int) -> str:
    from featureviz.client import pb

    return pb.JobState.Name(state).removeprefix("JOB_STATE_").lower()


def _objective_text(job) -> str:
    from featureviz.codec import objective_from_proto

    if job.objective_text:  # a listing carries the text, not the objective
        return job.objective_text

    try:
        return json.dumps(objective_from_proto(job.spec.objective), separators=(",", ":"))
    except Exception:  # an odd stored spec must not break the listing
        return "?"


@client_command
def _list(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from featureviz.client import pb

    state = getattr(pb, f"JOB_STATE_{args.state.upper()}") if args.state else pb.JOB_STATE_UNSPECIFIED
    with connect(args) as fv:
        jobs = list(fv.jobs(state=state))
    if args.json:
        print(json.dumps([json_format.MessageToDict(j, preserving_proto_field_name=True) for j in jobs], indent=2))
        return 0
    for job in jobs:
        print(f"{job.id}  {_state_name(job.state):<9} {job.step:5d}/{job.steps or job.spec.steps:<5d} "
              f"{job.worker or '-':<7} model {job.spec.model[:12]}  {_objective_text(job)[:60]}")
    return 0


@client_command
def _watch(args: argparse.Namespace) -> int:
    from featureviz.cli.remote import job_failure
    from featureviz.cli.remote import watch_with_progress
    from featureviz.cli.remote import write_images
    from featureviz.client import pb

    with connect(args) as fv:
        job_id = args.job.removeprefix("jobs/")
        job = watch_with_progress(fv, job_id, label=f"job {job_id}", timeout=args.timeout)
    if args.out and job.result.images:
        for path in write_images(job, args.out, job_id):
            print(path)
    if job.state != pb.JOB_STATE_SUCCEEDED:
        print(job_failure(job), file=sys.stderr)
        return 1
    return 0


@client_command
def _cancel(args: argparse.Namespace) -> int:
    with connect(args) as fv:
        job = fv.cancel(args.job)
    print(f"job {job.id}: {_state_name(job.state)}")
    return 0
