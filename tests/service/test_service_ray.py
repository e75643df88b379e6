"""Workers as Ray actors (``serve --ray``), on ONE local Ray cluster on loopback for the whole module (Ray starts
slowly) with 2 CPU worker actors: jobs spread over both workers (model affinity first), an exclusive job gives the
same images as the embedded worker, killing one actor's process mid-job still ends the job SUCCEEDED and loses
nothing else, a job with a judge gets the judge's bytes on its actor, a cancel reaches the actor, tenants stay isolated,
an index job with its examples and crops runs on the actors, learned priors, exemplar matching and a generator job run on the actors (and an actor's refusal comes back at once, as itself), ServerInfo lists the workers and metrics carry
their labels, and a job that kills its worker every time ends FAILED (WORKER_LOST) after a bounded number of
attempts (it crashes both actors). Then the real ``featureviz serve --ray --workers 2`` command (its own Ray),
and the message naming the extra when Ray is missing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")

from featureviz.client import Client  # noqa: E402
from featureviz.client import FeaturevizClientError  # noqa: E402
from featureviz.client import images  # noqa: E402
from featureviz.client import pb  # noqa: E402
from featureviz.server import ServerConfig  # noqa: E402
from featureviz.server import serve_in_background  # noqa: E402
from featureviz.worker.ray_pool import FAULT_CRASH_SEED  # noqa: E402
from featureviz.worker.ray_pool import init_local_ray  # noqa: E402
from support.serve import ServeProcess  # noqa: E402

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 3}}
CRASH_SEED = 4242
TOKENS = {"tok-a": "team-a", "tok-b": "team-b"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_onnx):
    """A local Ray on loopback (2 CPUs) and a server with 2 CPU worker actors of max batch 2 each."""
    saved = os.environ.get(FAULT_CRASH_SEED)
    os.environ[FAULT_CRASH_SEED] = str(CRASH_SEED)  # the actors inherit it: that seed crashes its worker
    init_local_ray(num_cpus=2)
    config = ServerConfig(tmp_path_factory.mktemp("store"), tokens=TOKENS, heartbeat_seconds=0.5, grace_seconds=2.0,
                          max_step_images=2, threads=1, progress_interval=0.0, metrics_port=0, ray="auto", workers=2,
                          ray_max_attempts=2)
    running = serve_in_background(config)
    with Client(running.address, token="tok-a", timeout=60) as fv:
        running.sha = fv.upload(tiny_onnx).sha256
    try:
        yield running
    finally:
        running.stop()
        ray.shutdown()
        if saved is None:
            os.environ.pop(FAULT_CRASH_SEED, None)
        else:
            os.environ[FAULT_CRASH_SEED] = saved


def _wait_for_step(fv: Client, job_id: str, step: int) -> None:
    for event in fv.watch(job_id, timeout=300):
        if event.HasField("progress") and event.progress.step >= step:
            return
    raise AssertionError(f"job {job_id} ended before step {step}")


def _workers(fv: Client) -> dict[str, pb.WorkerInfo]:
    return {w.id: w for w in fv.info().workers}


def _all_up(fv: Client, seconds: float = 300) -> dict[str, pb.WorkerInfo]:
    """The workers once every one is up (a killed actor is back: Ray restarts it, which takes a while on a loaded
    machine), polling the server's own view with a deadline."""
    deadline = time.monotonic() + seconds
    while True:
        workers = _workers(fv)
        if all(w.up for w in workers.values()):
            return workers
        assert time.monotonic() < deadline, {w.id: w.up for w in workers.values()}
        time.sleep(0.1)


def test_server_info_lists_both_workers(cluster):
    with Client(cluster.address, token="tok-a", timeout=60) as fv:
        info = fv.info()
    workers = {w.id: w for w in info.workers}
    assert sorted(workers) == ["ray-0", "ray-1"]
    assert all(w.node == "127.0.0.1" and w.pid > 0 and w.pid != os.getpid() and w.up for w in workers.values()), \
        workers
    assert len({w.pid for w in workers.values()}) == 2
    assert all(w.device.kind == "cpu" and w.max_step_images == 2 for w in workers.values())
    assert info.max_step_images == 4 and info.worker.max_step_images == 4


def test_jobs_spread_over_both_workers_with_model_affinity(cluster):
    with Client(cluster.address, token="tok-a", timeout=60) as fv:
        jobs = [fv.submit(cluster.sha, CHANNEL, steps=10_000, size=16, seed=s) for s in (1, 2, 3, 4)]
        for job in jobs:
            _wait_for_step(fv, job.id, 1)
        placed = [fv.job(j.id).worker for j in jobs]
        listed = {j.id: j.worker for j in fv.jobs()}
        workers = _workers(fv)
        for job in jobs:
            fv.cancel(job.id)
        ended = [fv.wait(j.id, timeout=300) for j in jobs]
    assert set(placed) == {"ray-0", "ray-1"}, placed
    assert sorted(placed.count(w) for w in ("ray-0", "ray-1")) == [2, 2], placed  # max batch 2 each
    assert placed[0] == placed[1]  # the second went where the model already was (affinity), with room
    assert all(listed[j.id] == w for j, w in zip(jobs, placed))  # ListJobs carries it too
    assert all(w.active_slots == 2 and cluster.sha in w.models for w in workers.values())
    assert all(e.state == pb.JOB_STATE_CANCELLED and e.worker in ("ray-0", "ray-1") for e in ended)
    text = urllib.request.urlopen(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).read().decode()
    for worker in ("ray-0", "ray-1"):
        assert f'featureviz_worker_device_steps_total{{worker="{worker}"}}' in text
        assert f'featureviz_worker_active_slots{{node="127.0.0.1",worker="{worker}"}}' in text


def test_an_exclusive_job_gives_the_same_images_as_the_embedded_worker(cluster, tiny_onnx, tmp_path):
    spec = dict(steps=12, size=32, seed=7, exclusive=True)
    with Client(cluster.address, token="tok-a", timeout=60) as fv:
        on_ray = fv.wait(fv.submit(cluster.sha, CHANNEL, **spec).id, timeout=300)
    threads = torch.get_num_threads()
    try:  # the actors run one torch thread each: so does the embedded worker here
        with serve_in_background(ServerConfig(tmp_path, threads=1)) as embedded, \
                Client(embedded.address, timeout=60) as fv:
            sha = fv.upload(tiny_onnx).sha256
            local = fv.wait(fv.submit(sha, CHANNEL, **spec).id, timeout=300)
    finally:
        torch.set_num_threads(threads)
    assert on_ray.state == local.state == pb.JOB_STATE_SUCCEEDED
    assert on_ray.worker.startswith("ray-") and local.worker == "local"
    assert images(on_ray) == images(local)
    assert [i.objective_end for i in on_ray.result.images] == [i.objective_end for i in local.result.images]


def test_killing_a_worker_mid_job_reruns_its_job_and_loses_nothing_else(cluster):
    with Client(cluster.address, token="tok-a", timeout=120) as fv:
        a = fv.submit(cluster.sha, CHANNEL, steps=400, size=16, seed=11)
        _wait_for_step(fv, a.id, 1)
        b = fv.submit(cluster.sha, CHANNEL, steps=400, size=16, seed=12)
        victim = fv.job(a.id).worker
        _wait_for_step(fv, a.id, 3)
        os.kill(_workers(fv)[victim].pid, signal.SIGKILL)
        events = list(fv.watch(a.id, timeout=600))
        done_a, done_b = fv.wait(a.id, timeout=600), fv.wait(b.id, timeout=600)
        after = _all_up(fv)  # the later tests place work on both
    assert done_a.state == pb.JOB_STATE_SUCCEEDED and done_a.result.steps_done == 400, done_a.error
    assert done_a.attempts == 2 and done_a.spec.seed == 11
    assert done_b.state == pb.JOB_STATE_SUCCEEDED and done_b.attempts == 1  # nothing else was lost
    states = [e.state for e in events if e.HasField("state")]
    assert states[-3:] == [pb.JOB_STATE_RUNNING, pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING]  # re-queued, from step 0
    steps = [e.progress.step for e in events if e.HasField("progress")]
    restart = max(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] == 1 and steps[restart:] == list(range(1, 401))
    seqs = [e.seq for e in events if e.WhichOneof("event") not in ("snapshot", "heartbeat")]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # the event contract: one log, no gaps
    assert sorted(after) == ["ray-0", "ray-1"]  # Ray restarted the actor (a new process)


def test_a_job_with_a_judge_runs_on_an_actor(cluster, tiny_onnx_other):
    """The judge is another uploaded model: its bytes reach the actor that admits and runs the job."""
    from featureviz.codec import judge_score_from_proto

    with Client(cluster.address, token="tok-a", timeout=60) as fv:
        judge = fv.upload(tiny_onnx_other, name="judge.onnx").sha256
        done = fv.wait(fv.submit(cluster.sha, {"logit": {"index": 3}}, steps=2, size=32, judge=judge).id,
                       timeout=300)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.worker.startswith("ray-")
    verdict = judge_score_from_proto(done.result.images[0].judge)
    assert verdict["target"] == 3 and verdict["rank"] >= 1 and 0.0 <= verdict["probability"] <= 1.0


def test_a_cancel_reaches_the_actor(cluster):
    with Client(cluster.address, token="tok-a", timeout=120) as fv:
        job = fv.submit(cluster.sha, CHANNEL, steps=10_000, size=16, seed=31)
        _wait_for_step(fv, job.id, 2)
        fv.cancel(job.id)
        done = fv.wait(job.id, timeout=300)
    assert done.state == pb.JOB_STATE_CANCELLED and 2 <= done.result.steps_done < 10_000
    assert len(images(done)) == 1


def test_tenants_stay_isolated(cluster, tiny_onnx):
    with Client(cluster.address, token="tok-a", timeout=120) as a, Client(cluster.address, token="tok-b",
                                                                          timeout=120) as b:
        with pytest.raises(FeaturevizClientError) as refused:
            b.submit(cluster.sha, CHANNEL, steps=4, size=16)  # b has not uploaded this model
        assert refused.value.code == "NOT_FOUND" and refused.value.reason == "MODEL_NOT_FOUND"
        b.upload(tiny_onnx)
        mine, theirs = a.submit(cluster.sha, CHANNEL, steps=6, size=16, seed=41), \
            b.submit(cluster.sha, CHANNEL, steps=6, size=16, seed=42)
        assert a.wait(mine.id, timeout=300).state == b.wait(theirs.id, timeout=300).state == pb.JOB_STATE_SUCCEEDED
        for other, job in ((b, mine), (a, theirs)):
            with pytest.raises(FeaturevizClientError) as hidden:
                other.job(job.id)
            assert hidden.value.code == "NOT_FOUND"
        assert theirs.id not in {j.id for j in a.jobs()} and mine.id not in {j.id for j in b.jobs()}


def test_an_index_job_its_examples_and_crops_on_the_actors(cluster, tmp_path):
    """The index job, GetExemplars (the receptive field computed on an actor) and GetDatasetImage (decoded on an
    actor) through the pool: the actors read the store's files by path (one machine here)."""
    from support.images import noisy_png

    folder = tmp_path / "set"
    folder.mkdir()
    for i in range(4):
        (folder / f"n{i}.png").write_bytes(noisy_png(16, i))
    with Client(cluster.address, token="tok-a", timeout=120) as fv:
        dataset = fv.upload_dataset(folder)
        job = fv.index_exemplars(cluster.sha, dataset.id, ["/Relu_1"], k=3, size=16, wait=True, timeout=300)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        answer = fv.exemplars(cluster.sha, dataset.id, "/Relu_1", 3, k=3)
        assert len(answer.exemplars) == 3 and answer.index == job.result.exemplar_index.index
        values = [e.value for e in answer.exemplars]
        assert values == sorted(values, reverse=True) and {e.name for e in answer.exemplars} <= {
            f"n{i}.png" for i in range(4)}
        top = answer.exemplars[0]
        crop = fv.dataset_image(dataset.id, top, box=top.image_box)
        assert crop[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_atlas_spreads_its_units_over_the_actors_renders_none_twice_and_joins_on_them(cluster, tmp_path):
    """An atlas's units are background slots on both actors (the pool places them by load), each stored once; its
    dataset join (the index job, then the units' scores: api.JoinQuery) runs on the actors too."""
    from support.images import noisy_png

    folder = tmp_path / "atlas-set"
    folder.mkdir()
    for i in range(3):
        (folder / f"a{i}.png").write_bytes(noisy_png(16, 10 + i))
    with Client(cluster.address, token="tok-a", timeout=120) as fv:
        dataset = fv.upload_dataset(folder)
        _all_up(fv)  # both take units (an actor still restarting from an earlier test would take none)
        job = fv.atlas(cluster.sha, layers=["/Relu_1"], channels=8, dataset=dataset.id, size=16, steps=6, seed=61,
                       wait=True, timeout=600)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        units = list(fv.atlas_units(job.id))
        progress = fv.atlas_progress(job.id)
    assert (job.result.atlas.units, job.result.atlas.rendered, progress.joined) == (8, 8, 8)
    workers = {unit.device.split(" ")[0] for unit in units}
    assert workers == {"ray-0", "ray-1"}, workers  # 4 granted at once, 2 per actor
    store = cluster._server.store
    assert {store.get_unit(unit.key)[6] for unit in units} == {1}  # nothing rendered twice
    assert all(unit.exemplar_index and unit.dataset_max >= unit.dataset_p99 >= unit.dataset_p50 for unit in units)


def test_learned_priors_and_exemplar_matching_run_on_the_actors(cluster, tmp_path):
    """Issue 25's options through the pool: ``prior_dataset`` and the ``prior:SET`` term (the set's statistics and
    patch prior fitted on an actor from the store's files, reported by GetDataset), and ``match:LAYER:C@INDEX``
    (the targets from the index's top crops, computed on an actor)."""
    import numpy as np

    from featureviz.spec import parse_objective
    from support.natural import power_law_image
    from support.natural import write_pngs

    folder = write_pngs(tmp_path / "prior-set", [power_law_image(32, 1.6, np.diag([0.12, 0.10, 0.08]), 70 + s)
                                                 for s in range(8)])
    with Client(cluster.address, token="tok-a", timeout=120) as fv:
        ident = fv.upload_dataset(folder).id
        job = fv.wait(fv.submit(cluster.sha, parse_objective(f"/Relu_1:3 - 0.1*prior:{ident}"), steps=3, size=16,
                                batch=2, seed=71, prior_dataset=ident).id, timeout=600)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert job.spec.prior_dataset == ident and len(job.result.images) == 2
        (prior,) = [p for p in fv.dataset(ident).priors if p.channels == 3 and p.patch_prior]
        assert np.isfinite(prior.held_out_log_likelihood) and prior.images == 8 and prior.decay > 1.2
        index = fv.index_exemplars(cluster.sha, ident, ["/Relu_1"], k=8, size=16, wait=True, timeout=300)
        assert index.state == pb.JOB_STATE_SUCCEEDED, index.error
        index_id = index.result.exemplar_index.index
        matched = fv.wait(fv.submit(cluster.sha, parse_objective(f"/Relu_1:3 - 0.5*match:/Relu_1:3@{index_id}"),
                                    steps=3, size=16, seed=72).id, timeout=600)
        assert matched.state == pb.JOB_STATE_SUCCEEDED, matched.error
        assert matched.spec.objective.sum.terms[1].scale.objective.match.index == index_id
        # an actor's refusal comes back as itself, at once: InvalidSpec once failed to unpickle, and the pool took
        # the unreadable error for a dead actor and retried for minutes
        with pytest.raises(FeaturevizClientError) as err:
            fv.submit(cluster.sha, {"match": {"layer": "/Relu_1", "channel": 3, "index": index_id, "k": 16}}, steps=3,
                      size=16)
        assert err.value.code == "INVALID_ARGUMENT" and "more than the 8 examples" in str(err.value), err.value


def test_a_generator_job_gets_the_generator_s_bytes_on_its_actor(cluster):
    """``param generator`` through the pool: the generator is another model the job reads (JobSpec.generator), so
    its bytes travel with the job as a judge's do."""
    from support.generators import TinyGenerator
    from support.generators import export_generator

    torch.manual_seed(0)
    with Client(cluster.address, token="tok-a", timeout=120) as fv:
        generator = fv.upload(export_generator(TinyGenerator()), name="gen.onnx").sha256
        job = fv.wait(fv.submit(cluster.sha, CHANNEL, steps=4, lr=0.5, size=16, batch=2, seed=81, param="generator",
                                generator=generator).id, timeout=600)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert job.spec.param == pb.PARAMETERIZATION_GENERATOR and len(job.result.images) == 2
    assert job.worker in ("ray-0", "ray-1"), job.worker


def test_a_job_that_kills_its_worker_every_time_ends_worker_lost(cluster):
    with Client(cluster.address, token="tok-a", timeout=120) as fv:
        job = fv.submit(cluster.sha, CHANNEL, steps=10, size=16, seed=CRASH_SEED)
        done = fv.wait(job.id, timeout=600)
        assert done.state == pb.JOB_STATE_FAILED and done.error.reason == "WORKER_LOST", done.error
        assert "2 times" in done.error.message
        after = fv.wait(fv.submit(cluster.sha, CHANNEL, steps=5, size=16, seed=51).id, timeout=600)
    assert after.state == pb.JOB_STATE_SUCCEEDED  # the cluster keeps serving (restarted, no crash loop)


def test_featureviz_serve_ray_workers_2_from_the_command_line(tmp_path, tiny_onnx, capsys):
    """The real command: its own local Ray (loopback), 2 CPU actors, a job, ``jobs list`` naming the worker."""
    from featureviz.cli import main

    serve = ServeProcess(tmp_path, "--ray", "--workers", "2")
    try:
        with Client(serve.address, timeout=120) as fv:
            sha = fv.upload(tiny_onnx).sha256
            done = fv.wait(fv.submit(sha, CHANNEL, steps=4, size=16).id, timeout=600)
            info = fv.info()
        capsys.readouterr()
        assert main(["jobs", "list", "--server", serve.address]) == 0
        listed = capsys.readouterr().out
    finally:
        assert serve.stop() == 0, "".join(serve.lines)
    assert sorted(w.id for w in info.workers) == ["ray-0", "ray-1"], "".join(serve.lines)
    assert all(w.node == "127.0.0.1" and w.pid > 0 for w in info.workers)  # Ray bound to loopback
    assert done.state == pb.JOB_STATE_SUCCEEDED and done.worker in ("ray-0", "ray-1")
    assert done.id in listed and done.worker in listed
    assert any("2 Ray worker(s): ray-0 (cpu" in line for line in serve.lines), serve.lines


def test_serve_ray_without_ray_names_the_extra(tmp_path):
    """A real environment without Ray: this venv's site-packages less ray (a shadow folder of links, the editable
    install's .pth included), under ``python -S``."""
    import sysconfig

    site_dir = Path(sysconfig.get_paths()["purelib"])
    shadow = tmp_path / "site"
    shadow.mkdir()
    for entry in site_dir.iterdir():
        if not entry.name.lower().startswith("ray"):
            (shadow / entry.name).symlink_to(entry)
    program = ("import site, sys\n"
               f"site.addsitedir({str(shadow)!r})\n"
               "from featureviz.cli import main\n"
               "sys.exit(main(['serve', '--ray', '--port', '0', '--store', sys.argv[1]]))\n")
    result = subprocess.run([sys.executable, "-S", "-c", program, str(tmp_path / "store")], capture_output=True,
                            text=True)
    assert result.returncode == 2, result.stderr
    assert "pip install 'featureviz[ray]'" in result.stderr and "Traceback" not in result.stderr
    from featureviz.cli import main

    assert main(["serve", "--workers", "2", "--store", str(tmp_path)]) == 2  # --workers needs --ray
