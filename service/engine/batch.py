"""Batched optimisation: many renders ("slots") share one forward and backward of the model per device step.

A :class:`Slot` is one render's whole state: its parameters and their Adam moments, its random generator, its
transforms (image size -> the model's input size, its own preprocessing), its objective and its step count.
A :class:`BatchEngine` runs device steps over a list of slots that share a model and a model input size
(:meth:`BatchEngine.group_key`): each slot renders its image and transforms it with its own generator, the
transformed images are concatenated (one ``torch.cat``), the model truncated at the union of the slots' layers
runs one forward and one backward, and each slot's objective reads only its own rows (objectives that compare
images, such as diversity, stay inside a slot). The loss is the sum of the slots' losses: in ``eval`` mode the
rows of a batch are independent, so each slot's gradient is its own, and each slot's Adam update is exactly
the one it would get alone (Adam is elementwise; the moments and the step count are per parameter).

Where the rows of a batch are not independent (a Reshape that folds the batch axis, an op that reduces over
it) the batched forward of two probe images differs from their forwards one by one: the engine checks this
once per (model, input size, layer set) before two slots share a step, and runs each slot alone otherwise
(:meth:`BatchEngine.rows_independent`).

lucid's redirected ReLU gradient of the first ``relu_warmup`` steps is gated per row: a slot in its warm-up
shares the ReLU modules with slots past it, and only its own rows get the redirect.

The memory layout (channels_last on the CPU) is decided per model and device, not per job: the weights are
shared by every truncation of a model, so once one truncation fails the channels_last probe the whole model
stays NCHW for this engine.

Progress values of all the slots of a step are copied to the host in one asynchronous copy on CUDA and handed
over one step late (no host sync per step); on the CPU at once. :func:`featureviz.engine.render` is the one-slot
case of this code.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import torch

from featureviz.engine import layout as layouts
from featureviz.engine import objectives as objs
from featureviz.engine.adam import Adam
from featureviz.engine.params import make_param
from featureviz.engine.params import render_group
from featureviz.engine.relu import redirected_relu_grad
from featureviz.engine.schedule import Plateau
from featureviz.engine.schedule import lr_at
from featureviz.engine.transforms import Transforms
from featureviz.errors import Diverged

__all__ = ["CheckedSpec", "Slot", "BatchEngine", "PHASES"]

PHASES = ("param", "transforms", "model", "optimizer")
_TRUNCATIONS_KEPT = 32  # truncated modules kept per engine (by model and layer set)


def image_size(spec_size, model) -> tuple[int, int]:
    if spec_size is None:
        return tuple(model.input_spec.default_size)
    if isinstance(spec_size, int) and not isinstance(spec_size, bool):
        return spec_size, spec_size
    return tuple(spec_size)


def model_size(model, size) -> tuple[int, int]:
    inp = model.input_spec
    if inp.height is not None and inp.width is not None:
        return inp.height, inp.width
    return tuple(size)


@dataclasses.dataclass(frozen=True)
class CheckedSpec:
    """A RenderSpec checked against a model by :func:`featureviz.engine.validate`, with what the check built: the
    objective (built once from its normalized spec), the parsed transform steps, the image and model input sizes
    and the model layer each objective layer reads. A :class:`Slot` takes it as it is: the worker checks a job
    once at admission, keeps this with the ticket, and the job's slot uses that very object (no second parse)."""

    spec: object  # the RenderSpec
    objective: objs.Objective
    transforms: tuple  # featureviz.engine.transforms steps
    image_size: tuple[int, int]
    model_size: tuple[int, int]
    names: dict  # objective layer key (None: the logits) -> the model's layer name

    @property
    def layers(self) -> frozenset:
        return frozenset(self.names.values())

    def probe(self, images: int) -> CheckedSpec:
        """The same check for a memory probe of ``images`` images (no init image, no snapshots)."""
        spec = dataclasses.replace(self.spec, batch=images, init_image=None, snapshot_steps=())
        return dataclasses.replace(self, spec=spec)


def checked(model, spec) -> CheckedSpec:
    """``spec`` itself when checked already, else :func:`featureviz.engine.validate`'s check of it."""
    if isinstance(spec, CheckedSpec):
        return spec
    from featureviz.engine.render import validate  # render imports this module

    return validate(model, spec)


class Slot:
    """One render's optimisation state, built from an ImportedModel and a :class:`CheckedSpec` (a plain RenderSpec
    is checked first).

    ``progress(step, total, values)``, ``snapshot(step, images)`` and ``cancel`` are as in
    :func:`featureviz.engine.render`. ``handle`` is the caller's handle (a job id). ``exclusive``: never share a
    device step with another slot.
    """

    def __init__(self, model, spec, *, device: torch.device, progress=None, snapshot=None, cancel=None,
                 handle=None, exclusive: bool = False):
        self.handle = handle
        self.model = model
        self.checked = checked(model, spec)
        self.spec = spec = self.checked.spec
        self.device = device
        self.exclusive = exclusive
        self.objective = self.checked.objective
        self.image_size = self.checked.image_size
        self.model_size = self.checked.model_size
        self.names: dict = dict(self.checked.names)
        self.layers = self.checked.layers
        self.prefixes = {layer: model.layer(name).prefix_tokens for layer, name in self.names.items()}  # tokens
        self.batch = spec.batch
        self.steps = spec.steps
        self.lr = float(spec.lr)
        self.schedule = getattr(spec, "lr_schedule", "constant")
        self.lr_warmup = getattr(spec, "lr_warmup", 0)
        self.plateau = Plateau(getattr(spec, "plateau", 0.0) or 0.0,
                               getattr(spec, "plateau_window", None) or 1)
        self.plateaued = False  # the plateau stop triggered (on CUDA seen one step late)
        self.warmup = spec.relu_warmup
        self.memory_format = spec.memory_format
        preprocess = spec.preprocess if spec.preprocess is not None else model.input_spec.preprocess
        self.generator = torch.Generator(device=device)  # the initial parameters
        self.generator.manual_seed(spec.seed)
        # the transforms' random draws, on the host: a step's maps for all its slots go to the device in one copy
        self.draws = torch.Generator().manual_seed((spec.seed * 1_000_003 + 0x5EED) % 2**63)
        init = None
        if spec.init_image is not None:
            init = torch.as_tensor(spec.init_image, dtype=torch.float32).to(device)
        self.params, self.image_fn = make_param(spec.param, spec.batch, self.image_size, generator=self.generator,
                                                decay=spec.decay, init=init, device=device,
                                                prior=getattr(spec, "prior", None),
                                                image_generator=getattr(spec, "generator", None),
                                                latent_l2=getattr(spec, "latent_l2", 0.0))
        # alignment compares images position by position: they must see the same transform (one draw per slot)
        shared = any(isinstance(node, objs.Alignment) for node in objs.walk(self.objective))
        self.transforms = Transforms.of(self.checked.transforms, self.image_size, self.model_size, preprocess,
                                        model.input_spec.channels, device=device, shared=shared)
        self.plain = self.transforms.centred()
        self.progress, self.snapshot, self.cancel = progress, snapshot, cancel
        self.snapshots = set(spec.snapshot_steps)
        self.steps_done = 0
        self.cancelled = False
        self.error: Exception | None = None  # Diverged: the slot stopped (checked one step late on CUDA)
        self.layout = "contiguous"
        self.objective_start: list[float] = []
        self.phase_seconds = dict.fromkeys(PHASES, 0.0)
        self.began = 0.0
        self.device_share = 0.0  # each step's seconds x its images / the step's images, summed
        self.active_seconds = 0.0  # wall time from the first step to the last (waits between steps included)

    @property
    def done(self) -> bool:
        return self.steps_done >= self.steps or self.plateaued

    @property
    def stopped_at(self) -> int:
        """The step after which the plateau stop ended the render (0: it did not)."""
        return self.steps_done if self.plateaued and self.steps_done < self.steps else 0

    @property
    def scheduled(self) -> bool:
        return self.schedule != "constant" or self.lr_warmup > 0

    def current_lr(self) -> float:
        """The learning rate of this slot's next update (featureviz.engine.schedule)."""
        if not self.scheduled:
            return self.lr
        return lr_at(self.schedule, self.lr, self.steps_done, self.steps, self.lr_warmup)

    @property
    def optimizer_key(self):
        """Slots at a constant rate share one Adam per rate; a scheduled slot has its own (its rate moves)."""
        return self.lr if not self.scheduled else ("slot", id(self))

    def is_cancelled(self) -> bool:
        cancel = self.cancel
        if cancel is None:
            return False
        if hasattr(cancel, "is_set"):
            return cancel.is_set()
        return bool(cancel())

    def activations(self, rows: dict, image) -> objs.Activations:
        """What the objective reads: ``rows`` maps each output name to this slot's rows (:func:`_rows`)."""
        return objs.Activations({layer: rows[name] for layer, name in self.names.items()}, image,
                                prefixes=self.prefixes, input_size=self.model_size)

    def images(self) -> torch.Tensor:
        with torch.no_grad():
            return self.image_fn().detach().clamp(0, 1).cpu()

    def release(self) -> None:
        """Drop the tensors (parameters, generator) once the result is taken."""
        self.params, self.image_fn = [], None


class _Clock:
    """Phase timer of one device step: wall time per phase, with a CUDA sync at each boundary when ``sync``."""

    def __init__(self, device: torch.device, sync: bool):
        self.sync = sync and device.type == "cuda"
        self.enabled = device.type != "cuda" or self.sync
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._t = 0.0

    def start(self):
        if self.enabled:
            if self.sync:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

    def lap(self, phase: str):
        if self.enabled:
            if self.sync:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.totals[phase] += now - self._t
            self._t = now


class _Progress:
    """Hands each step's per-slot values to the slots' ``progress`` callbacks and stops diverging slots.

    With the values comes one flag per slot saying whether its values and its parameters' gradients are all
    finite; a slot whose flag is off gets ``slot.error`` (:class:`Diverged`) and no progress call. On the CPU both
    are read at once, before the optimizer moves anything. On CUDA, reading them would wait for the whole step
    and leave the GPU idle while the next one is queued, so the values and flags of all the slots of a step go
    to the host in one asynchronous copy and are handed over (and checked) one step later; :meth:`flush` hands
    over what is pending."""

    def __init__(self, device: torch.device):
        self.lag = device.type == "cuda"
        self.pending = None

    def __call__(self, slots, steps: list[int], values: list, finite: torch.Tensor) -> None:
        flat = torch.cat([v.detach().reshape(-1).float() for v in values] + [finite.float()])
        entries = [(slot, step, v.numel()) for slot, step, v in zip(slots, steps, values)]
        if not self.lag:
            self._hand_over(entries, flat)
            return
        host = flat.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(flat.device))  # the render's device, not the current one
        self.flush()
        self.pending = (entries, host, done)

    def flush(self, slots=None) -> None:
        """Hand over the pending values (all of them: the order of each slot's steps is kept)."""
        if self.pending is None:
            return
        entries, host, done = self.pending
        if slots is not None and not any(slot in slots for slot, _, _ in entries):
            return
        self.pending = None
        done.synchronize()
        self._hand_over(entries, host)

    @staticmethod
    def _hand_over(entries, flat) -> None:
        flags = flat[-len(entries):].tolist()
        offset = 0
        for (slot, step, n), ok in zip(entries, flags):
            values = flat[offset: offset + n]
            offset += n
            if slot.error is not None:
                continue
            if not ok:
                what = "the objective" if not bool(torch.isfinite(values).all()) else "the gradient"
                slot.error = Diverged(step, what, slot.lr)
            else:
                if slot.progress is not None:
                    slot.progress(step, slot.steps, values)
                if slot.plateau.threshold > 0 and slot.plateau.add(float(values.mean())):
                    slot.plateaued = True


class _Truncation:
    """A truncated module of one model for one layer set, with what has been checked about it."""

    def __init__(self, module):
        self.module = module
        self.independent: dict[tuple, bool] = {}  # model input size -> rows independent


class BatchEngine:
    """Device steps over slots. One thread uses an engine at a time (the worker's device thread, or render).

    ``profile``: synchronise CUDA at phase boundaries so the phase times are exact.
    """

    def __init__(self, device: torch.device | str, *, profile: bool = False):
        self.device = torch.device(device)
        self.profile = profile
        self._optimizers: dict[object, Adam | torch.optim.Adam] = {}  # Slot.optimizer_key -> Adam
        self._truncations: collections.OrderedDict[tuple, _Truncation] = collections.OrderedDict()
        self._layouts: dict[tuple, str] = {}  # (model key, request) -> the model's layout on this device
        self._checked: set[tuple] = set()  # (model key, request, layers) probed for that layout
        self._progress = _Progress(self.device)

    # ------------------------------------------------------------------------------------------- grouping

    @staticmethod
    def model_key(model) -> tuple:
        return (getattr(model, "sha256", ""), id(model.module))

    @classmethod
    def group_key(cls, slot: Slot) -> tuple:
        """Slots with the same key may share a device step: same model, model input size and layout request."""
        return (cls.model_key(slot.model), slot.model_size, slot.memory_format)

    def forget(self, model) -> None:
        """Drop what the engine holds for ``model`` (its truncations and layout decisions)."""
        key = self.model_key(model)
        for k in [k for k in self._truncations if k[0] == key]:
            del self._truncations[k]
        for k in [k for k in self._layouts if k[0] == key]:
            del self._layouts[k]
        self._checked = {k for k in self._checked if k[0] != key}

    def _truncation(self, model, layers: frozenset) -> _Truncation:
        key = (self.model_key(model), layers)
        found = self._truncations.get(key)
        if found is None:
            found = _Truncation(model.truncate(sorted(layers)).to(self.device))
            self._truncations[key] = found
            while len(self._truncations) > _TRUNCATIONS_KEPT:
                self._truncations.popitem(last=False)
        else:
            self._truncations.move_to_end(key)
        return found

    def _prepare(self, slots: list[Slot]):
        """The truncated module of the slots' union of layers, in the model's layout: (module, layout) or
        (None, "contiguous") when no slot reads the model."""
        model_slots = [s for s in slots if s.layers]
        if not model_slots:
            return None, "contiguous"
        first = model_slots[0]
        layers = frozenset().union(*(s.layers for s in model_slots))
        trunc = self._truncation(first.model, layers)
        mkey = (self.model_key(first.model), first.memory_format)
        decided = self._layouts.get(mkey)
        if (mkey, layers) not in self._checked:
            if decided == "contiguous":  # the model stays NCHW once one of its truncations failed the probe
                layout = layouts.prepare(trunc.module, "contiguous", self.device, None)
            else:
                def probe():
                    with torch.no_grad():
                        return torch.cat([s.plain(s.image_fn()) for s in model_slots[:2]])
                layout = layouts.prepare(trunc.module, first.memory_format, self.device, probe)
            self._layouts[mkey] = layout if decided in (None, "channels_last") else "contiguous"
            self._checked.add((mkey, layers))
        return trunc, self._layouts[mkey]

    def rows_independent(self, slots: list[Slot]) -> bool:
        """Whether the model (truncated at the slots' layers) treats each row of a batch on its own: the
        batched forward of two probe images must match their forwards one by one. Checked once per model,
        input size and layer set."""
        trunc, layout = self._prepare(slots)
        if trunc is None:
            return True
        size = slots[0].model_size
        found = trunc.independent.get(size)
        if found is None:
            found = _rows_independent(trunc.module, layout, slots[0].model.input_spec.channels, size, self.device)
            trunc.independent[size] = found
        return found

    # ------------------------------------------------------------------------------------------- lifecycle

    def join(self, slots: list[Slot]) -> None:
        """Measure the slots' starting objective (one no-grad forward; pads and resize, no random transforms)
        and take the step-0 snapshots. All slots must share a group key."""
        values, images = self._evaluate(slots)
        now = time.perf_counter()
        for slot, v, image in zip(slots, values, images):
            slot.objective_start = v
            slot.began = now
            if slot.snapshot is not None and 0 in slot.snapshots:
                slot.snapshot(0, image)

    def finish(self, slots: list[Slot]) -> list[dict]:
        """End the slots: hand over their pending progress, measure their final objective, and return one
        dict per slot with RenderResult's fields (images on the CPU). The slots' tensors are released."""
        self._progress.flush(slots)
        values, images = self._evaluate(slots)
        self._drop_params(slots)
        out = []
        for slot, end, image in zip(slots, values, images):
            out.append(dict(images=image, objective_start=list(slot.objective_start), objective_end=end,
                            seconds_per_step=slot.active_seconds / max(slot.steps_done, 1),
                            phase_seconds=dict(slot.phase_seconds) if self._clock_enabled() else {},
                            steps_done=slot.steps_done, cancelled=slot.cancelled, objective=str(slot.objective),
                            memory_format=slot.layout, stopped_at=slot.stopped_at,
                            device_seconds=slot.device_share))
            slot.release()
        return out

    def drop(self, slots: list[Slot]) -> None:
        """Forget slots without a result (a failed job)."""
        self._progress.flush(slots)
        self._drop_params(slots)
        for slot in slots:
            slot.release()

    def flush(self) -> None:
        self._progress.flush()

    def _clock_enabled(self) -> bool:
        return self.device.type != "cuda" or self.profile

    def _evaluate(self, slots: list[Slot]) -> tuple[list[list[float]], list[torch.Tensor]]:
        """The slots' objective values (per image) and images (clamped to [0, 1], on the CPU) under the pads and the
        resize only: one no-grad forward. Batched as a step is: the parameterizations render per ``render_key``, the
        centred views resample per ``resample_key``, one-channel objectives of one output are read by one gather
        (:func:`_channel_values`), and the values and the images each come to the host in one copy, so the cost
        of a join or an end grows with the kinds of slot, not with the slots (the same values as one forward per
        slot: each row of the batch is computed on its own)."""
        if not slots:
            return [], []
        trunc, layout = self._prepare(slots)
        with torch.no_grad():
            images: list = [None] * len(slots)
            for group in _groups(range(len(slots)), lambda i: _render_key(slots[i], i)):
                image = render_group([slots[i].image_fn for i in group])
                parts = image.split([slots[i].batch for i in group]) if len(group) > 1 else [image]
                for i, rows in zip(group, parts):
                    images[i] = rows
            model_slots = [i for i, s in enumerate(slots) if s.layers]
            order, xs = [], []
            for group in _groups(model_slots, lambda i: slots[i].plain.resample_key):
                first = slots[group[0]].plain
                theta = first.maps(torch.cat([slots[i].plain.draw(slots[i].batch, None) for i in group]))
                image = images[group[0]] if len(group) == 1 else torch.cat([images[i] for i in group])
                xs.append(first.resample(image, theta))
                order.extend(group)
            out = {}
            if order:
                x = xs[0] if len(xs) == 1 else torch.cat(xs)
                out = trunc.module(layouts.to_layout(x, layout))
            own = dict(zip(order, _rows(out, [slots[i].batch for i in order]))) if order else {}
            shared = _channel_values(slots, order, out)
            values = [_penalized(slot, shared[i] if i in shared
                                 else slot.objective(slot.activations(own.get(i, {}), images[i])).float())
                      for i, slot in enumerate(slots)]  # less a generator's latent penalty, as a step reports it
            flat = torch.cat([v.float().reshape(-1) for v in values]).cpu().tolist()  # one host copy
            host = torch.cat(images).clamp(0, 1).cpu() if len(images) > 1 else images[0].clamp(0, 1).cpu()
        result, offset = [], 0
        for slot in slots:
            result.append(flat[offset: offset + slot.batch])
            offset += slot.batch
        return result, list(host.split([slot.batch for slot in slots]))

    def probe(self, model, spec, images: int) -> None:
        """A forward and backward of ``images`` images of ``spec`` (a :class:`CheckedSpec`, or a RenderSpec to
        check; a memory probe): nothing is updated or kept."""
        slot = Slot(model, checked(model, spec).probe(images), device=self.device)
        try:
            trunc, layout = self._prepare([slot])
            self._forward_backward([slot], trunc, layout, _Clock(self.device, False), None)
        finally:
            self._clear_grads([slot])
            slot.release()

    # ------------------------------------------------------------------------------------------- the step

    def step(self, slots: list[Slot], *, before_model=None) -> None:
        """One optimisation step of every slot in ``slots`` (one group): one forward and backward of the model.

        ``before_model(images)`` is called with the number of images just before the model runs (the
        worker's fault hook). On an exception no slot has advanced and their gradients are cleared.
        """
        clock = _Clock(self.device, self.profile)
        started = time.perf_counter()
        clock.start()
        trunc, layout = self._prepare(slots)
        try:
            values = self._forward_backward(slots, trunc, layout, clock, before_model)
            finite = _all_finite(slots, values)  # one device flag per slot: no host sync here
            if not self._progress.lag:  # CPU: check before the optimizer moves anything
                self._progress(slots, [s.steps_done + 1 for s in slots], values, finite)
                self._clear_grads([s for s in slots if s.error is not None])
            clock.start()
            for key, (lr, params) in self._by_lr(slots).items():
                self._optimizer(key, lr, params).step()
        except BaseException:
            self._clear_grads(slots)
            raise
        self._clear_grads(slots)
        clock.lap("optimizer")
        now = time.perf_counter()
        share = (now - started) / max(sum(slot.batch for slot in slots), 1)  # per image of this step
        stepped = []
        for slot in slots:
            if slot.error is not None and not self._progress.lag:
                continue
            stepped.append(slot)
            slot.steps_done += 1
            slot.layout = layout
            slot.active_seconds = now - slot.began
            slot.device_share += share * slot.batch
            for phase, seconds in clock.totals.items():
                slot.phase_seconds[phase] += seconds
        if self._progress.lag:  # checked one step late
            self._progress(slots, [s.steps_done for s in slots], values, finite)
        for slot in stepped:
            if slot.snapshot is not None and slot.error is None and slot.steps_done in slot.snapshots:
                slot.snapshot(slot.steps_done, slot.images())

    def _forward_backward(self, slots, trunc, layout, clock, before_model):
        """Forward and backward of one step. The parameterizations render per ``ImageFn.render_key`` and the
        transforms resample per ``Transforms.resample_key``, each group in one call, so the launches per step grow with
        the number of kinds of slot, not with the number of slots. Each stage is cut from the next (a leaf
        that requires grad), and the gradients are handed back stage by stage."""
        inputs: list = [None] * len(slots)
        rendered = []  # (image of a param group, its cut leaf)
        for group in _groups(range(len(slots)), lambda i: _render_key(slots[i], i)):
            image = render_group([slots[i].image_fn for i in group])
            leaf = image.detach().requires_grad_(True)  # cut: the parameterization's graph ends here
            rendered.append((image, leaf))
            for i, rows in zip(group, leaf.split([slots[i].batch for i in group])):
                inputs[i] = rows
        clock.lap("param")
        model_slots = [i for i, s in enumerate(slots) if s.layers]
        order, xs = [], []  # model rows go in transform-group order
        for group in _groups(model_slots, lambda i: slots[i].transforms.resample_key):
            first = slots[group[0]].transforms
            theta = first.maps(torch.cat([slots[i].transforms.draw(slots[i].batch, slots[i].draws) for i in group]))
            image = inputs[group[0]] if len(group) == 1 else torch.cat([inputs[i] for i in group])
            xs.append(first.resample(image, theta))
            order.extend(group)
        x_in = None
        if model_slots:
            x = xs[0].detach() if len(xs) == 1 else torch.cat([x.detach() for x in xs])
            x_in = layouts.to_layout(x, layout).requires_grad_(True)  # cut: the transforms' graph ends here
        clock.lap("transforms")
        if before_model is not None:
            before_model(sum(s.batch for s in slots))
        warm = [slots[i].steps_done < slots[i].warmup for i in order]
        rows = None
        if any(warm) and not all(warm):
            rows = torch.cat([torch.full((slots[i].batch,), w, dtype=torch.bool) for i, w in zip(order, warm)])
            rows = rows.to(self.device, non_blocking=True)
        values = [None] * len(slots)
        with redirected_relu_grad(trunc.module if trunc is not None else torch.nn.Module(), enabled=any(warm),
                                  rows=rows):
            out = trunc.module(x_in) if trunc is not None else {}
            own = dict(zip(order, _rows(out, [slots[i].batch for i in order]))) if order else {}
            shared = _channel_values(slots, order, out)
            for i, slot in enumerate(slots):
                values[i] = shared[i] if i in shared else slot.objective(slot.activations(own.get(i, {}), inputs[i]))
                values[i] = _penalized(slot, values[i])
            loss = -torch.cat([v.reshape(-1) for v in values]).sum()  # maximise: the one negation
            loss.backward()
        clock.lap("model")
        if x_in is not None and x_in.grad is not None:
            row = 0
            for x in xs:  # accumulates next to any image regularizer's gradient
                x.backward(x_in.grad[row: row + x.shape[0]])
                row += x.shape[0]
        clock.lap("transforms")
        for image, leaf in rendered:
            if leaf.grad is not None:
                image.backward(leaf.grad)
        clock.lap("param")
        return values

    # ------------------------------------------------------------------------------------------- Adam

    @staticmethod
    def _by_lr(slots) -> dict:
        """{optimizer key: (this step's learning rate, parameters with a gradient)}."""
        groups: dict = {}
        for slot in slots:
            _, params = groups.setdefault(slot.optimizer_key, (slot.current_lr(), []))
            params.extend(p for p in slot.params if p.grad is not None)
        return {key: value for key, value in groups.items() if value[1]}

    def _optimizer(self, key, lr: float, params: list) -> Adam | torch.optim.Adam:
        """One Adam per learning rate holding every slot's parameters in one group: each parameter keeps its
        own moments and step count, so a slot's update is the one it gets alone; on CUDA the fused
        update serves all the slots of a step in one kernel. A slot with a learning-rate schedule has an Adam of
        its own (``Slot.optimizer_key``) whose rate is set before each step. Parameters without a gradient are
        skipped. On the CPU it is :class:`featureviz.engine.adam.Adam` (the same update; building a torch.optim
        optimizer imports torch._dynamo, ~1 s of a command-line render)."""
        optimizer = self._optimizers.get(key)
        if optimizer is None:
            if self.device.type == "cuda":  # one fused kernel for all the slots of a step
                optimizer = torch.optim.Adam(params, lr=lr, fused=True)
            else:  # torch.optim's update without importing torch._dynamo (featureviz.engine.adam)
                optimizer = Adam(params, lr=lr, foreach=True)
            self._optimizers[key] = optimizer
            return optimizer
        optimizer.param_groups[0]["lr"] = lr
        group = optimizer.param_groups[0]["params"]
        known = {id(p) for p in group}
        group.extend(p for p in params if id(p) not in known)
        return optimizer

    def _drop_params(self, slots: list[Slot]) -> None:
        """Take the slots' parameters (and their moments) out of their optimizers: one pass over each optimizer's
        parameters for all the slots leaving at once (one pass per slot was quadratic in a step's slots)."""
        by_key: dict = {}
        for slot in slots:
            by_key.setdefault(slot.optimizer_key, []).extend(slot.params)
        for key, params in by_key.items():
            optimizer = self._optimizers.get(key)
            if optimizer is None:
                continue
            mine = {id(p) for p in params}
            group = optimizer.param_groups[0]
            group["params"] = [p for p in group["params"] if id(p) not in mine]
            for p in params:
                optimizer.state.pop(p, None)
            if not group["params"]:
                del self._optimizers[key]

    @staticmethod
    def _clear_grads(slots) -> None:
        for slot in slots:
            for p in slot.params:
                p.grad = None


def _penalized(slot: Slot, values: torch.Tensor) -> torch.Tensor:
    """The slot's objective values less its parameterization's penalty (a generator's latent L2), if any: the
    penalty's gradient reaches the latents directly (they are leaves of this graph)."""
    penalty = getattr(slot.image_fn, "penalty", None)
    return values if penalty is None else values - penalty().to(values.dtype)


def _all_finite(slots, values) -> torch.Tensor:
    """(S,) bool: each slot's objective values and parameter gradients are all finite (a fixed number of launches
    whatever the number of slots: one norm per gradient in one multi-tensor call)."""
    owners = [i for i, v in enumerate(values) for _ in range(v.numel())]
    parts = [torch.cat([v.detach().reshape(-1) for v in values])]
    grads = [(i, p.grad) for i, slot in enumerate(slots) for p in slot.params if p.grad is not None]
    if grads:
        parts.append(torch.stack(torch._foreach_norm([g for _, g in grads])).to(parts[0].dtype))
        owners += [i for i, _ in grads]
    bad = (~torch.isfinite(torch.cat(parts))).to(torch.float32)
    owner = torch.tensor(owners, dtype=torch.long).to(bad.device, non_blocking=True)
    return torch.zeros(len(slots), device=bad.device).index_add_(0, owner, bad) == 0


def _rows(out: dict, sizes: list[int]) -> list[dict]:
    """The rows of each of the model's outputs per slot (``sizes``: the slots' images, in batch order): one
    ``split`` per output, whose backward is one ``cat``. A slice per slot would be quadratic in the slots: each
    slice's backward fills a gradient of the whole batch with zeros, and autograd adds them up."""
    if len(sizes) == 1:
        return [out]
    parts = {name: tensor.split(sizes) for name, tensor in out.items()}
    return [{name: chunks[k] for name, chunks in parts.items()} for k in range(len(sizes))]


def _channel_values(slots, order, out: dict) -> dict:
    """{slot index: values} of the slots whose whole objective is one channel of a 4-d activation (a job's
    commonest objective), when two or more of them read the same output: one gather of their (row, channel)
    maps and one mean for all of them, instead of a select and a mean (and their backward) per slot. The same
    numbers as ``Channel``: the mean of each row's channel map."""
    readers: dict = {}
    start, row = {}, 0
    for i in order:
        start[i] = row
        row += slots[i].batch
        objective = slots[i].objective
        if type(objective) is objs.Channel:
            name = slots[i].names[objective.layer]
            if out[name].dim() == 4:
                readers.setdefault(name, []).append(i)
    found = {}
    for name, members in readers.items():
        if len(members) < 2:
            continue
        index = torch.tensor([[r for i in members for r in range(start[i], start[i] + slots[i].batch)],
                              [slots[i].objective.channel for i in members for _ in range(slots[i].batch)]])
        index = index.to(out[name].device, non_blocking=True)
        maps = out[name][index[0], index[1]]  # (rows, H, W)
        values = maps.flatten(1).mean(-1)
        found.update(zip(members, values.split([slots[i].batch for i in members])))
    return found


def _groups(indices, key) -> list[list[int]]:
    """``indices`` grouped by ``key(i)``, groups in order of first appearance."""
    found: dict = {}
    for i in indices:
        found.setdefault(key(i), []).append(i)
    return list(found.values())


def _render_key(slot: Slot, i: int):
    render_key = getattr(slot.image_fn, "render_key", None)
    return ("alone", i) if render_key is None else render_key


def _rows_independent(module, layout: str, channels: int, size, device) -> bool:
    if type(module).__name__ == "PerImage":  # runs image by image: nothing to gain, and no per-row warm-up gating
        return False
    generator = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn(2, channels, *size, generator=generator).to(device)
    with torch.no_grad():
        try:
            together = layouts.outputs(module(layouts.to_layout(probe, layout)))
            alone = [layouts.outputs(module(layouts.to_layout(probe[i: i + 1], layout))) for i in range(2)]
        except RuntimeError:  # e.g. a Reshape fixed to one batch size: it cannot run batched at all
            return False
    for k, out in enumerate(together):
        if out.dim() == 0 or out.shape[0] != 2:
            return False
        for i in range(2):
            if not layouts.same(out[i: i + 1], alone[i][k]):
                return False
    return True
