"""The worker's device: its description, the default images per step, out-of-memory errors and memory admission.

Memory admission: before a job joins a device step the worker estimates what it adds to the step's peak memory.
:class:`MemoryPlanner` measures it once per (model, model input size, image size, parameterization, layer set)
with two probe steps (forward and backward at 1 and 2 images): peak memory is close to affine in the number of
images, so the two give a fixed cost and a cost per image. On CUDA the peak is ``max_memory_allocated`` after
``reset_peak_memory_stats``; on a CPU, which has no allocator statistics, :class:`LiveBytes` (a torch dispatch
mode on the probing thread) adds up the storages the probe's operations allocate and drops each when it is freed,
less what outlives the probe (caches such as a channels_last copy of the weights, which every job shares).
The worker refuses a job at admission (RESOURCE_EXHAUSTED, ``max_job_memory_bytes``) whose estimate exceeds the
limit or the device's usable memory (its total less a headroom), and admits a job to the device steps when its
estimate fits in the free memory (CUDA: ``mem_get_info`` plus what torch's cache holds unused; CPU:
``MemAvailable``, within the cgroup's limit) less the headroom; otherwise it waits for slots to leave, unless
nothing is running (then it runs alone, and a CUDA job that does not fit even alone fails with GPU_OOM). A CPU
probe stops as soon as it holds more than the limit (a 1024-px, 64-image job is refused without a 12 GB probe).

Out-of-memory errors are ``torch.cuda.OutOfMemoryError``; ``FEATUREVIZ_FAULT_OOM_IMAGES=N`` (tests only) makes
every device step of more than N images raise :class:`SimulatedOutOfMemory` just before the model runs, so the
split-and-retry path is tested on a CPU.
"""

from __future__ import annotations

import collections
import logging
import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["describe_device", "default_step_images", "is_oom", "empty_cache", "MemoryPlanner", "fault_hook",
           "SimulatedOutOfMemory", "DEFAULT_STEP_IMAGES_CPU", "DEFAULT_STEP_IMAGES_CUDA", "LiveBytes", "ProbeTooLarge",
           "host_memory", "job_memory"]

log = logging.getLogger("featureviz.worker")

# bench/RESULTS.md (2-core AMD EPYC): a shared step gave 1.6x the throughput of one job at a time at 96 px and
# 0.56-0.95x at 224 px (the figures: 9.4 ms per image at batch 1, 11.3 ms at batch 16, block 4); a small
# batch also lets short jobs start beside long ones.
DEFAULT_STEP_IMAGES_CPU = 4  # images in one device step on a CPU
# On a GPU a 224-px image leaves the device mostly idle: on an H200 (bench/RESULTS.md) 64 single-image jobs per
# step gave 7.7x the throughput of one at a time through the server (18.7x for the device step alone), and memory
# admission keeps any batch within the device's memory.
DEFAULT_STEP_IMAGES_CUDA = 64
HEADROOM_FRACTION = 0.08  # of the device's memory kept free when admitting a job
_ESTIMATES_KEPT = 256  # memory estimates kept (a tenant may try many image sizes)


class SimulatedOutOfMemory(RuntimeError):
    """Raised by the test-only fault hook in place of torch.cuda.OutOfMemoryError."""


def fault_hook():
    """The test-only fault hook from ``FEATUREVIZ_FAULT_OOM_IMAGES`` (None when unset)."""
    raw = os.environ.get("FEATUREVIZ_FAULT_OOM_IMAGES", "").strip()
    if not raw:
        return None
    limit = int(raw)

    def before_model(images: int) -> None:
        if images > limit:
            raise SimulatedOutOfMemory(f"CUDA out of memory (simulated: {images} images > {limit})")

    return before_model


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.cuda.OutOfMemoryError, SimulatedOutOfMemory)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception:  # freeing memory must never fail the worker
            log.exception("emptying the CUDA cache failed")


def resolve_device(requested: str | None) -> torch.device:
    return torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_step_images(device: torch.device) -> int:
    """The most images in one device step when the server names none (``--max-step-images``)."""
    return DEFAULT_STEP_IMAGES_CUDA if device.type == "cuda" else DEFAULT_STEP_IMAGES_CPU


def describe_device(device: torch.device):
    """The device as a ``featureviz.v1.Device``."""
    from featureviz.v1 import featureviz_pb2 as pb

    kernels = os.environ.get("FEATUREVIZ_KERNELS", "auto")
    if kernels == "auto":
        kernels = "triton" if device.type == "cuda" else "torch"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return pb.Device(kind="cuda", name=props.name, memory_bytes=props.total_memory, kernels=kernels)
    threads = torch.get_num_threads()
    return pb.Device(kind="cpu", name=f"{os.cpu_count()} CPU cores, {threads} torch thread{'s' * (threads != 1)}",
                     kernels=kernels)


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory for this process: /proc/meminfo's MemTotal and MemAvailable, within
    the cgroup's ``memory.max`` (v2) less its ``memory.current`` when one is set."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                info[name] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total = info.get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    available = info.get("MemAvailable", total)
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            raw = f.read().strip()
        if raw != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                current = int(f.read().strip())
            total, available = min(total, int(raw)), min(available, max(0, int(raw) - current))
    except (OSError, ValueError):
        pass
    return total, available


class ProbeTooLarge(RuntimeError):
    """A CPU memory probe held more than its cap: ``held`` bytes at ``images`` images when it stopped."""

    def __init__(self, held: int, images: int):
        super().__init__(f"the memory probe held {held} bytes at {images} image(s)")
        self.held, self.images = held, images


class LiveBytes(TorchDispatchMode):
    """Host memory held by the tensors that operations allocate while the mode is on (this thread only): ``peak``
    of the live bytes, and ``live`` now. A storage counts once (views share it) and leaves when it is freed.
    ``cap``: raise :class:`ProbeTooLarge` as soon as more than that is live."""

    def __init__(self, cap: float | None = None, images: int = 1):
        super().__init__()
        self.cap, self.images = cap, images
        self.live = self.peak = 0
        self._held: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if not size or key in self._held:
            return
        self._held[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, _release, weakref.ref(self), key)
        if self.cap is not None and self.live > self.cap:
            raise ProbeTooLarge(self.live, self.images)


def _release(ref, key: int) -> None:
    mode = ref()
    if mode is not None:
        mode.live -= mode._held.pop(key, 0)


class MemoryPlanner:
    """Memory admission (see the module docstring). ``probe(n)`` runs a forward and backward of n images and must
    leave nothing allocated; it runs on the thread that steps the device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.enabled = device.type in ("cuda", "cpu")
        self.estimates: collections.OrderedDict[tuple, tuple[float, float]] = collections.OrderedDict()
        if device.type == "cuda":
            self.total = torch.cuda.get_device_properties(device).total_memory
        else:
            self.total = host_memory()[0]
        self.headroom = HEADROOM_FRACTION * self.total

    @property
    def usable(self) -> float:
        """The most memory one job may ever have here: the device's total less the headroom."""
        return self.total - self.headroom

    def known(self, memory_key: tuple) -> tuple[float, float] | None:
        """The estimate of ``memory_key`` when it was measured already (any thread: no probe, no device
        thread); None otherwise."""
        return self.estimates.get(memory_key)

    def estimate(self, memory_key: tuple, probe, cap: float | None = None) -> tuple[float, float]:
        """(fixed bytes, bytes per image) of ``memory_key`` (what a job's memory depends on), measured once. On a
        CPU a probe that holds more than ``cap`` bytes stops: the estimate is then a lower bound, the held bytes per
        image of the probe (fixed 0)."""
        found = self.estimates.get(memory_key)
        if found is None:
            try:
                peaks = [self._peak(probe, n, cap) for n in (1, 2)]
            except ProbeTooLarge as exc:
                found = (0.0, exc.held / exc.images)
                log.info("memory estimate %s: more than %.1f MiB per image (probe stopped)", memory_key[1:],
                         found[1] / 2**20)
            else:
                per_image = max(peaks[1] - peaks[0], 1.0)
                found = (max(peaks[0] - per_image, 0.0), per_image)
                log.info("memory estimate %s: %.1f MiB fixed + %.1f MiB per image", memory_key[1:], found[0] / 2**20,
                         found[1] / 2**20)
            self.estimates[memory_key] = found
            while len(self.estimates) > _ESTIMATES_KEPT:
                self.estimates.popitem(last=False)
        else:
            self.estimates.move_to_end(memory_key)
        return found

    def _peak(self, probe, n: int, cap: float | None) -> float:
        if self.device.type != "cuda":
            mode = LiveBytes(cap=cap * n if cap is not None else None, images=n)
            with mode:
                probe(n)
            return float(mode.peak - mode.live)  # what outlives the probe is shared (caches), not the job's
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        probe(n)
        torch.cuda.synchronize(self.device)
        return float(torch.cuda.max_memory_allocated(self.device) - base)

    def free(self) -> float:
        """Memory a job may take now (before the headroom)."""
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            return float(free + cached)
        return float(host_memory()[1])

    def fits(self, need: float) -> bool:
        return need <= self.free() - self.headroom


def job_memory(estimate: tuple[float, float], images: int) -> float:
    """A job's estimated memory from its (fixed, per image) estimate."""
    fixed, per_image = estimate
    return fixed + per_image * images
