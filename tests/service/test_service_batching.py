"""Batching over a real server on loopback: jobs join and leave mid-run, cancelling one slot leaves the others
running, 16 concurrent jobs lose and repeat no event, progress is coalesced, an exclusive job is bitwise
repeatable, two tenants share the device fairly, an injected out-of-memory error splits the batch (and a job
that does not fit alone fails GPU_OOM), and no server module imports torch, numpy, PIL, the engine, the
importer or the kernels."""

from __future__ import annotations

import ast
import concurrent.futures
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from featureviz.client import Client
from featureviz.client import images
from featureviz.client import pb
from featureviz.server import ServerConfig
from featureviz.server.config import Limits
from featureviz.server import serve_in_background

CHANNEL = {"channel": {"layer": "/Relu_1", "channel": 3}}
SERVER_DIR = Path(__file__).resolve().parents[2] / "service" / "server"
FORBIDDEN = ("torch", "numpy", "PIL", "featureviz.engine", "featureviz.importer", "featureviz.kernels",
             "onnx", "onnx2torch", "triton", "featureviz.worker.local", "featureviz.worker.device",
             "featureviz.worker.models", "featureviz.worker.adapter")


def _imports(tree: ast.AST):
    """(line, module) of every import in a module's source, at any depth (functions included), and of
    ``importlib.import_module("...")`` / ``__import__("...")`` calls with a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def test_no_server_module_imports_torch_numpy_pil_the_engine_importer_or_kernels():
    sources = sorted(SERVER_DIR.glob("*.py"))
    assert len(sources) >= 10
    found = []
    for path in sources:
        tree = ast.parse(path.read_text(), filename=str(path))
        for line, module in _imports(tree):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN):
                found.append(f"{path.name}:{line} imports {module}")
        if re.search(r"sys\.modules\s*(\.get\(|\[)\s*['\"](torch|numpy|PIL)", path.read_text()):
            found.append(f"{path.name} reads a forbidden module from sys.modules")
    assert not found, "\n".join(found)


def test_no_import_runs_back_up_a_floor():
    """The layers: the worker and the web gateway sit below the server (they never import it), and the server does
    not import the client package (the codec, the errors and the host names live below all of them)."""
    service = SERVER_DIR.parent
    rules = {"worker": ("featureviz.server",), "web": ("featureviz.server",),
             "server": ("featureviz.client",), "engine": ("featureviz.server", "featureviz.client", "featureviz.web"),
             "importer": ("featureviz.server", "featureviz.client", "featureviz.web")}
    found = []
    for part, forbidden in rules.items():
        sources = sorted((service / part).glob("*.py"))
        assert sources, part
        for path in sources:
            for line, module in _imports(ast.parse(path.read_text(), filename=str(path))):
                if any(module == bad or module.startswith(bad + ".") for bad in forbidden):
                    found.append(f"{part}/{path.name}:{line} imports {module}")
    assert not found, "\n".join(found)


def test_the_server_package_imports_without_torch(tmp_path):
    # torch, numpy and PIL made unimportable: the server package and the worker's interface still import
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'numpy', 'PIL'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import featureviz.server, featureviz.server.scheduler, featureviz.worker.api, featureviz.worker.process\n"
            "print('ok', 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "False"]


@pytest.fixture(scope="module")
def batched(tmp_path_factory, tiny_onnx):
    """A server with max batch 8, every step's progress, and metrics."""
    config = ServerConfig(tmp_path_factory.mktemp("store"), heartbeat_seconds=0.5, grace_seconds=2.0,
                          max_step_images=8, progress_interval=0.0, metrics_port=0)
    running = serve_in_background(config)
    with Client(running.address, timeout=60) as fv:
        running.sha = fv.upload(tiny_onnx).sha256
    yield running
    running.stop()


def _metric(server, name: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith(name)}


def _wait_for_step(fv: Client, job_id: str, step: int) -> None:
    for event in fv.watch(job_id, timeout=120):
        if event.HasField("progress") and event.progress.step >= step:
            return
    raise AssertionError(f"job {job_id} ended before step {step}")


def _steps_after(fv: Client, job_id: str, step: int, count: int) -> list[int]:
    """Progress steps of a running job from ``step`` on, until ``count`` more came."""
    seen = []
    for event in fv.watch(job_id, timeout=120):
        if event.HasField("progress") and event.progress.step > step:
            seen.append(event.progress.step)
            if len(seen) == count:
                return seen
    raise AssertionError(f"job {job_id} ended after steps {seen}")


def test_jobs_join_and_leave_mid_run(batched):
    with Client(batched.address, timeout=60) as fv:
        long = fv.submit(batched.sha, CHANNEL, steps=10_000, size=32, seed=1)
        _wait_for_step(fv, long.id, 3)
        short = [fv.submit(batched.sha, CHANNEL, steps=8, size=32, seed=s) for s in (2, 3)]
        done = [fv.wait(j.id, timeout=120) for j in short]
        assert all(d.state == pb.JOB_STATE_SUCCEEDED and d.result.steps_done == 8 for d in done)
        running = fv.job(long.id)
        assert running.state == pb.JOB_STATE_RUNNING  # the short ones joined and left; the long one runs on
        # they ran beside it: their start and end fall inside the long job's run
        assert all(d.start_time.ToNanoseconds() > running.start_time.ToNanoseconds() for d in done)
        _steps_after(fv, long.id, fv.job(long.id).step, 3)  # and it keeps moving after they left
        info = fv.info()
        assert info.max_step_images == 8 and info.worker.active_slots == 1 and info.worker.active_images == 1
        assert list(info.worker.models) == [batched.sha] and info.worker.device.kind == "cpu"
        fv.cancel(long.id)
        assert fv.wait(long.id, timeout=120).state == pb.JOB_STATE_CANCELLED
    shared = _metric(batched, "featureviz_batch_images")
    # some device steps carried more than one image: the le="1.0" bucket holds fewer steps than all of them
    assert shared['featureviz_batch_images_bucket{le="1.0"}'] < shared["featureviz_batch_images_count"]
    assert _metric(batched, "featureviz_device_step_seconds")["featureviz_device_step_seconds_count"] > 0


def test_cancelling_one_slot_leaves_the_others_running(batched):
    with Client(batched.address, timeout=60) as fv:
        a, b = (fv.submit(batched.sha, CHANNEL, steps=10_000, size=32, seed=s) for s in (4, 5))
        _wait_for_step(fv, a.id, 2)
        _wait_for_step(fv, b.id, 2)
        fv.cancel(a.id)
        assert fv.wait(a.id, timeout=120).state == pb.JOB_STATE_CANCELLED
        at = fv.job(b.id).step
        assert len(_steps_after(fv, b.id, at, 3)) == 3  # b advanced 3 more steps after a left
        assert fv.job(b.id).state == pb.JOB_STATE_RUNNING
        fv.cancel(b.id)
        done = fv.wait(b.id, timeout=120)
        assert done.state == pb.JOB_STATE_CANCELLED and len(images(done)) == 1


def test_16_concurrent_jobs_lose_and_repeat_no_event(batched):
    steps = 12
    with Client(batched.address, timeout=120) as fv:
        jobs = [fv.submit(batched.sha, CHANNEL, steps=steps, size=32, seed=100 + i) for i in range(16)]

        def events(job_id):
            with Client(batched.address) as own:
                return list(own.watch(job_id, timeout=240))

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            streams = list(pool.map(events, [j.id for j in jobs]))
    for job, stream in zip(jobs, streams):
        logged = [e for e in stream if e.WhichOneof("event") not in ("snapshot", "heartbeat")]
        seqs = [e.seq for e in logged]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and len(set(seqs)) == len(seqs), job.id
        assert [e.progress.step for e in logged if e.HasField("progress")] == list(range(1, steps + 1))
        assert logged[-1].HasField("result") and logged[-1].result.state == pb.JOB_STATE_SUCCEEDED
        assert len(logged[-1].result.result.images) == 1


def test_a_result_that_cannot_be_encoded_fails_its_job_and_the_others_end(batched, monkeypatch):
    """Results are encoded off the device thread, side by side; one whose PNGs cannot be made ends FAILED (it used
    to lose its FINISHED event and stay RUNNING), and the jobs around it end normally."""
    from featureviz.worker import adapter

    real = adapter.job_result
    broken = []

    def job_result(result):
        if not broken:  # the first result to be encoded
            broken.append(True)
            raise OSError("the encoder broke")
        return real(result)

    monkeypatch.setattr(adapter, "job_result", job_result)
    with Client(batched.address, timeout=60) as fv:
        jobs = [fv.submit(batched.sha, CHANNEL, steps=3, size=32, seed=300 + i) for i in range(4)]
        done = [fv.wait(j.id, timeout=120) for j in jobs]
    states = sorted(pb.JobState.Name(d.state) for d in done)
    assert states == ["JOB_STATE_FAILED"] + ["JOB_STATE_SUCCEEDED"] * 3, states
    failed = next(d for d in done if d.state == pb.JOB_STATE_FAILED)
    assert failed.error.code == "INTERNAL" and "OSError" in failed.error.message
    assert all(len(images(d)) == 1 for d in done if d.state == pb.JOB_STATE_SUCCEEDED)


def test_progress_is_coalesced_per_job_plus_the_last_step(tmp_path, tiny_onnx):
    config = ServerConfig(tmp_path, max_step_images=16, progress_interval=3600.0)
    with serve_in_background(config) as running, Client(running.address, timeout=60) as fv:
        assert fv.info().progress_interval_seconds == 3600.0
        sha = fv.upload(tiny_onnx).sha256
        jobs = [fv.submit(sha, CHANNEL, steps=20, size=16, seed=i) for i in range(8)]
        for job in jobs:
            assert fv.wait(job.id, timeout=120).state == pb.JOB_STATE_SUCCEEDED
            progress = [e.progress.step for e in fv.watch(job.id) if e.HasField("progress")]
            assert progress == [20]  # one event at most per hour, and the last step's


def test_progress_over_all_jobs_is_bounded_by_the_rate(tmp_path, tiny_onnx):
    """max_progress_rate bounds a worker's progress events a second over all its jobs: with more jobs than rate x
    interval, each job's interval grows to jobs / rate seconds (here 4 jobs at a rate of one event in 10 days: only
    each job's last step), and 0 leaves the per-job interval alone (here a nanosecond: every step). Deterministic:
    no step is that slow or that fast."""
    steps = 6
    for rate, expected in ((1e-6, [steps]), (0.0, list(range(1, steps + 1)))):
        config = ServerConfig(tmp_path / f"store-{rate}", max_step_images=16, progress_interval=1e-9,
                              max_progress_rate=rate)
        with serve_in_background(config) as running, Client(running.address, timeout=60) as fv:
            assert fv.info().max_progress_rate == rate
            sha = fv.upload(tiny_onnx).sha256
            jobs = [fv.submit(sha, CHANNEL, steps=steps, size=16, seed=i) for i in range(4)]
            for job in jobs:
                assert fv.wait(job.id, timeout=120).state == pb.JOB_STATE_SUCCEEDED
                assert [e.progress.step for e in fv.watch(job.id) if e.HasField("progress")] == expected, rate


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_serve_refuses_a_negative_progress_rate(tmp_path, capsys, value):
    from featureviz.cli import main

    assert main(["serve", "--store", str(tmp_path), "--max-progress-rate", value]) == 2
    assert f"--max-progress-rate must be >= 0, got {value}" in capsys.readouterr().err


def test_an_exclusive_job_is_bitwise_repeatable(batched):
    spec = dict(steps=10, size=32, seed=21, exclusive=True)
    with Client(batched.address, timeout=60) as fv:
        alone = fv.wait(fv.submit(batched.sha, CHANNEL, **spec).id, timeout=120)
        neighbours = [fv.submit(batched.sha, CHANNEL, steps=10_000, size=32, seed=s) for s in (22, 23)]
        _wait_for_step(fv, neighbours[0].id, 1)
        beside = fv.wait(fv.submit(batched.sha, CHANNEL, **spec).id, timeout=120)
        assert fv.job(neighbours[0].id).state == pb.JOB_STATE_RUNNING  # it ran while others shared the device
        for job in neighbours:
            fv.cancel(job.id)
        assert beside.spec.exclusive and alone.state == beside.state == pb.JOB_STATE_SUCCEEDED
        assert images(alone) == images(beside)
        assert [i.objective_end for i in alone.result.images] == [i.objective_end for i in beside.result.images]


def test_two_tenants_share_the_device_fairly(tmp_path, tiny_onnx):
    tokens = {"tok-flood": "flood", "tok-calm": "calm"}
    config = ServerConfig(tmp_path, tokens=tokens, max_step_images=2, progress_interval=0.0)
    with serve_in_background(config) as running, Client(running.address, token="tok-flood") as flood, \
            Client(running.address, token="tok-calm") as calm:
        sha = flood.upload(tiny_onnx).sha256
        calm.upload(tiny_onnx)
        floods = [flood.submit(sha, CHANNEL, steps=400, size=16, seed=i) for i in range(12)]
        mine = calm.submit(sha, CHANNEL, steps=6, size=16, seed=99)
        done = calm.wait(mine.id, timeout=240)
        finished = [flood.wait(j.id, timeout=240) for j in floods]
    assert done.state == pb.JOB_STATE_SUCCEEDED and all(j.state == pb.JOB_STATE_SUCCEEDED for j in finished)
    started_before = sum(j.start_time.ToNanoseconds() < done.start_time.ToNanoseconds() for j in finished)
    # FIFO would start it after all 12; fair sharing grants it the next free slot: only the two jobs that held
    # the worker's two slots, and any that took a slot freed while it was being submitted, start before it
    assert started_before <= 4, started_before


@pytest.fixture()
def oom_server(tmp_path, tiny_onnx, monkeypatch):
    monkeypatch.setenv("FEATUREVIZ_FAULT_OOM_IMAGES", "2")  # test-only fault hook: steps of > 2 images fail
    config = ServerConfig(tmp_path, max_step_images=8, progress_interval=0.0, metrics_port=0)
    with serve_in_background(config) as running, Client(running.address, timeout=60) as fv:
        running.sha = fv.upload(tiny_onnx).sha256
        yield running, fv


def test_an_injected_out_of_memory_error_splits_the_batch_and_a_job_too_big_alone_fails(oom_server):
    running, fv = oom_server
    long = fv.submit(running.sha, CHANNEL, steps=10_000, size=16, seed=9)
    _wait_for_step(fv, long.id, 1)  # the others join it: steps of up to 5 images, which the hook fails
    jobs = [fv.submit(running.sha, CHANNEL, steps=20, size=16, seed=i) for i in range(4)]
    done = [fv.wait(j.id, timeout=120) for j in jobs]
    assert all(d.state == pb.JOB_STATE_SUCCEEDED and d.result.steps_done == 20 for d in done)
    fv.cancel(long.id)
    assert fv.wait(long.id, timeout=120).state == pb.JOB_STATE_CANCELLED
    too_big = fv.wait(fv.submit(running.sha, CHANNEL, steps=5, size=16, batch=3).id, timeout=120)
    assert too_big.state == pb.JOB_STATE_FAILED
    assert too_big.error.code == "RESOURCE_EXHAUSTED" and too_big.error.reason == "GPU_OOM"
    assert "out of memory" in too_big.error.message
    after = fv.wait(fv.submit(running.sha, CHANNEL, steps=3, size=16, batch=2).id, timeout=120)
    assert after.state == pb.JOB_STATE_SUCCEEDED  # the server keeps serving
    sizes = _metric(running, "featureviz_batch_images")
    # every step that ran had at most 2 images (the split), and some had 2 (the jobs still shared steps)
    assert sizes['featureviz_batch_images_bucket{le="2.0"}'] == sizes["featureviz_batch_images_count"]
    assert sizes['featureviz_batch_images_bucket{le="1.0"}'] < sizes["featureviz_batch_images_count"]
    failures = _metric(running, "featureviz_job_failures")
    assert failures['featureviz_job_failures_total{reason="GPU_OOM"}'] == 1


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_error_splits_the_batch_and_a_job_too_big_alone_fails(tmp_path, caplog):
    """The injected-fault test's twin on a real GPU. A wide two-conv model (64 channels at full resolution), so a
    job's activations outweigh its parameters and Adam moments. One job of 8 images at 256 px runs uncapped to
    measure what it adds to the memory torch reserves (R); then the process may reserve only 4 R more
    (``set_per_process_memory_fraction``), and 9 such jobs run together: their shared steps run out of memory for
    real and split. Under the cap no step of over 4 jobs can succeed; where the split ends depends on the
    allocator (on an H200, with 2.7 R, steps of 2 jobs still failed and one job failed alone), so each job must
    end SUCCEEDED or FAILED with GPU_OOM, never otherwise. A 16-image 512-px job (8 R) fails alone with GPU_OOM,
    and once the cap is lifted the server serves the next job."""
    import logging

    import torch

    from support.models import export_onnx

    class Wide(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(64, 64, 3, padding=1)
            self.fc = torch.nn.Linear(64, 10)

        def forward(self, x):
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return self.fc(x.mean(dim=(2, 3)))

    cuda = torch.device("cuda", torch.cuda.current_device())  # the memory fraction needs an index
    # the too-big job must reach the device (about 8 GiB measured: max_job_memory_bytes would refuse it at admission)
    config = ServerConfig(tmp_path, device="cuda", max_step_images=64, progress_interval=0.0, metrics_port=0,
                          limits=Limits(max_job_memory_bytes=1 << 40))
    caplog.set_level(logging.WARNING, logger="featureviz.worker")
    with serve_in_background(config) as running, Client(running.address, timeout=120) as fv:
        sha = fv.upload(export_onnx(Wide())).sha256
        warm = fv.wait(fv.submit(sha, CHANNEL, steps=2, size=256, batch=8).id, timeout=120)  # kernels, workspaces
        assert warm.state == pb.JOB_STATE_SUCCEEDED, warm.error.message
        torch.cuda.empty_cache()
        base = torch.cuda.memory_reserved(cuda)
        torch.cuda.reset_peak_memory_stats(cuda)
        one = fv.wait(fv.submit(sha, CHANNEL, steps=3, size=256, batch=8).id, timeout=120)
        assert one.state == pb.JOB_STATE_SUCCEEDED
        per_job = torch.cuda.max_memory_reserved(cuda) - base
        assert per_job > 0
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(cuda).total_memory
        torch.cuda.set_per_process_memory_fraction(min((base + 4 * per_job) / total, 1.0), cuda)
        try:
            long = fv.submit(sha, CHANNEL, steps=10_000, size=256, batch=8, seed=1)
            _wait_for_step(fv, long.id, 1)
            jobs = [fv.submit(sha, CHANNEL, steps=12, size=256, batch=8, seed=10 + i) for i in range(8)]
            done = [fv.wait(j.id, timeout=300) for j in jobs]
            if fv.job(long.id).state == pb.JOB_STATE_RUNNING:
                fv.cancel(long.id)
            long_end = fv.wait(long.id, timeout=120)
            too_big = fv.wait(fv.submit(sha, CHANNEL, steps=3, size=512, batch=16).id, timeout=120)
            sizes = _metric(running, "featureviz_batch_images")
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, cuda)
            torch.cuda.empty_cache()
        after = fv.wait(fv.submit(sha, CHANNEL, steps=3, size=256, batch=8).id, timeout=120)
        failures = _metric(running, "featureviz_job_failures")

    def ended_well(job, state):
        return job.state == state or (job.state == pb.JOB_STATE_FAILED and job.error.reason == "GPU_OOM")

    assert all(ended_well(d, pb.JOB_STATE_SUCCEEDED) for d in done), [(d.state, d.error.message[:200]) for d in done]
    assert all(d.result.steps_done == 12 for d in done if d.state == pb.JOB_STATE_SUCCEEDED)
    assert ended_well(long_end, pb.JOB_STATE_CANCELLED), (long_end.state, long_end.error.message)
    assert too_big.state == pb.JOB_STATE_FAILED, too_big
    assert too_big.error.code == "RESOURCE_EXHAUSTED" and too_big.error.reason == "GPU_OOM"
    assert after.state == pb.JOB_STATE_SUCCEEDED  # the server keeps serving
    splits = [int(n) for n in re.findall(r"out of memory in a step of (\d+) images: splitting", caplog.text)]
    assert splits and max(splits) >= 16, caplog.text[-2000:]  # a shared step ran out of memory for real and split
    # no step of more than 4 jobs (32 images) succeeded under the cap
    assert sizes['featureviz_batch_images_bucket{le="32.0"}'] == sizes["featureviz_batch_images_count"], sizes
    failed = sum(j.state == pb.JOB_STATE_FAILED for j in [*done, long_end, too_big])
    assert failures['featureviz_job_failures_total{reason="GPU_OOM"}'] == failed
