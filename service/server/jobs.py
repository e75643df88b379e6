"""JobService: admission (limits, engine validation before any compute), watch streams, cancel."""

from __future__ import annotations

import asyncio
import math

from featureviz.errors import FailedPrecondition
from featureviz.errors import FeaturevizError
from featureviz.errors import InvalidSpec
from featureviz.errors import ResourceExhausted
from featureviz.errors import echo
from featureviz.errors import NotFound
from featureviz.options import ATLAS
from featureviz.options import ATLAS_DEFAULTS
from featureviz.options import BY_NAME
from featureviz.options import EXEMPLAR_INDEX
from featureviz.options import RENDER
from featureviz.options import check_kind
from featureviz.options import check_limits
from featureviz.phases import phase
from featureviz.server.auth import TenantResolver
from featureviz.server.config import ServerConfig
from featureviz.server.errors import Unavailable
from featureviz.server.errors import rpc_errors
from featureviz.server.models import parse_model_name
from featureviz.server.paging import next_token
from featureviz.server.paging import page_bounds
from featureviz.server.priors import prior_sources
from featureviz.server.scheduler import Scheduler
from featureviz.server.scheduler import job_cost
from featureviz.server.slots import TenantSlots
from featureviz.server.store import TERMINAL_STATES
from featureviz.server.store import JobRow
from featureviz.spec import proto_path
from featureviz.v1 import featureviz_pb2 as pb
from featureviz.v1 import featureviz_pb2_grpc as pb_grpc

__all__ = ["JobServicer", "engine_field"]


def _job_id(name: str) -> str:
    job_id = name.removeprefix("jobs/").strip()
    if not job_id:
        raise InvalidSpec("job", "give a job id or 'jobs/<id>'")
    return job_id


def engine_field(path: str) -> str:
    """An engine spec path (``objective.sum[1].channel.channel``) -> the JobSpec field path
    (``spec.objective.sum.terms[1].channel.channel``)."""
    if path.startswith("spec."):
        return path
    return "spec." + proto_path(path)


class JobServicer(pb_grpc.JobServiceServicer):
    def __init__(self, config: ServerConfig, scheduler: Scheduler, auth: TenantResolver):
        self.config = config
        self.scheduler = scheduler
        self.store = scheduler.store
        self.auth = auth
        self._draining = asyncio.Event()  # set by drain(): watch streams end with UNAVAILABLE
        self._waiting: set[asyncio.Future] = set()  # the watch streams' futures (drain() resolves them)
        self._watching = 0
        self._watches = TenantSlots("watch streams", "max_watches_per_tenant", "TOO_MANY_WATCHES",
                                    "close one (one stream per job is enough)")  # WatchJob, CreateAndWatchJob
        self._idle = asyncio.Event()
        self._idle.set()

    async def drain(self, timeout: float) -> None:
        """On stop, once the jobs are done or re-queued: end every watch stream with UNAVAILABLE (the client
        re-attaches, to another replica or after the restart) and wait up to ``timeout`` s until they sent it, so
        they get that status rather than a connection torn down under them."""
        self._draining.set()
        for waiter in list(self._waiting):
            _resolve(waiter, True)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            pass

    @rpc_errors
    async def CreateJob(self, request: pb.CreateJobRequest, context) -> pb.Job:
        job_id, row = await self._create(self.auth.tenant(context), request.spec, request.request_id)
        return self.scheduler.job(job_id, None, row=row)

    @rpc_errors
    async def CreateAndWatchJob(self, request: pb.CreateAndWatchJobRequest, context):
        tenant = self.auth.tenant(context)
        with self._watch_slot(tenant):  # refused before the job is made
            job_id, row = await self._create(tenant, request.spec, request.request_id)
            async for event in self._watch(job_id, tenant, 0, request.include_previews, row=row):
                yield event

    @rpc_errors
    async def WatchJob(self, request: pb.WatchJobRequest, context):
        if request.from_seq < 0:
            raise InvalidSpec("from_seq", f"must be >= 0, got {request.from_seq}")
        tenant = self.auth.tenant(context)
        with self._watch_slot(tenant):
            async for event in self._watch(_job_id(request.job), tenant, request.from_seq, request.include_previews):
                yield event

    @rpc_errors
    async def GetJob(self, request: pb.GetJobRequest, context) -> pb.Job:
        with phase("watch"):
            return self.scheduler.job(_job_id(request.job), self.auth.tenant(context))

    @rpc_errors
    async def ListJobs(self, request: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        tenant = self.auth.tenant(context)
        limits = self.config.limits
        query = f"jobs|{request.state}"
        offset, limit = page_bounds(request.page_size, request.page_token, query,
                                    default=limits.default_page_size, maximum=limits.max_page_size)
        rows = self.store.list_jobs(tenant, request.state, offset, limit)
        jobs = [_summary(self.scheduler.job(row.id, tenant, with_images=False), self.config.limits) for row in rows]
        return pb.ListJobsResponse(jobs=jobs, next_page_token=next_token(offset, limit, len(jobs), None, query))

    @rpc_errors
    async def CancelJob(self, request: pb.CancelJobRequest, context) -> pb.Job:
        return self.scheduler.cancel(_job_id(request.job), self.auth.tenant(context))

    @rpc_errors
    async def ListAtlasUnits(self, request: pb.ListAtlasUnitsRequest, context) -> pb.ListAtlasUnitsResponse:
        from featureviz.server.atlas import progress

        row = self._atlas_row(request.job, self.auth.tenant(context))
        limits = self.config.limits
        query = f"atlas|{row.id}|{request.layer}"
        offset, limit = page_bounds(request.page_size, request.page_token, query,
                                    default=limits.default_page_size, maximum=limits.max_page_size)
        units = self._joined([_unit(values) for values in self.store.atlas_units(row.id, request.layer, offset,
                                                                                 limit)], row)
        return pb.ListAtlasUnitsResponse(
            units=units, next_page_token=next_token(offset, limit, len(units), None, query),
            progress=progress(self.store, row.id, start_time=row.start_time, finished=row.state in TERMINAL_STATES))

    @rpc_errors
    async def GetAtlasUnit(self, request: pb.GetAtlasUnitRequest, context) -> pb.AtlasUnitImage:
        row = self._atlas_row(request.job, self.auth.tenant(context))
        found = self.store.atlas_units(row.id, offset=request.index, limit=1) if request.index >= 0 else []
        if not found:
            raise NotFound(f"atlas {row.id} has no unit {request.index}", reason="UNIT_NOT_FOUND")
        from featureviz.server.atlas import DIVERSITY
        from featureviz.server.atlas import NEGATIVE
        from featureviz.server.atlas import image_key

        unit = self._joined([_unit(found[0])], row)[0]
        variant = request.variant or pb.ATLAS_VARIANT_RENDER
        if variant == pb.ATLAS_VARIANT_RENDER:
            stored = self.store.get_unit(unit.key) if unit.done else None
            if stored is None:
                raise NotFound(f"unit {request.index} of atlas {row.id} is not finished", reason="UNIT_NOT_FOUND")
            return pb.AtlasUnitImage(unit=unit, png=stored[0])
        if variant not in (NEGATIVE, DIVERSITY):
            raise InvalidSpec("variant", f"unknown variant {variant}; RENDER, NEGATIVE or DIVERSITY")
        name = pb.AtlasVariant.Name(variant).removeprefix("ATLAS_VARIANT_").lower()
        rows = [r for r in self.store.atlas_variants(row.id, request.index, request.index) if r[1] == variant]
        if not rows or rows[0][2] not in (1, 2):
            raise NotFound(f"unit {request.index} of atlas {row.id} has no {name} render"
                           + (" yet" if rows and rows[0][2] == 0 else ": the atlas does not render it" if not rows
                              else ": its render failed"), reason="VARIANT_NOT_FOUND")
        key = rows[0][3]
        if variant == DIVERSITY:
            images = pb.JobSpec.FromString(row.spec).atlas.diversity
            if not 0 <= request.image < images:
                raise NotFound(f"unit {request.index} of atlas {row.id} has no diversity image {request.image}; "
                               f"its set has {images} (0 to {images - 1})", reason="VARIANT_NOT_FOUND")
            key = image_key(key, request.image)
        stored = self.store.get_unit(key)
        if stored is None:
            raise NotFound(f"the {name} render of unit {request.index} of atlas {row.id} is not stored",
                           reason="VARIANT_NOT_FOUND")
        return pb.AtlasUnitImage(unit=unit, png=stored[0])

    def _joined(self, units: list[pb.AtlasUnit], row) -> list[pb.AtlasUnit]:
        """The units with their variants' state and their dataset join (AtlasUnit 12-21) filled in."""
        from featureviz.server.atlas import DIVERSITY
        from featureviz.server.atlas import NEGATIVE

        if not units:
            return units
        spec = pb.JobSpec.FromString(row.spec)
        if spec.atlas.negative or spec.atlas.diversity:
            by_index = {unit.index: unit for unit in units}
            for idx, variant, state, _ in self.store.atlas_variants(row.id, units[0].index, units[-1].index):
                unit = by_index.get(idx)
                if unit is not None and state in (1, 2):
                    if variant == NEGATIVE:
                        unit.negative_done = True
                    elif variant == DIVERSITY:
                        unit.diversity_done = spec.atlas.diversity
        join = self.store.atlas_join(row.id) if spec.atlas.dataset else None
        if join is not None:
            scores = self.store.unit_scores(join[2], [unit.key for unit in units if unit.done])
            for unit in units:
                found = scores.get(unit.key) if unit.done else None
                if found is None:
                    continue
                p50, p99, top, score = found
                unit.exemplar_index = join[2]
                unit.dataset_p50, unit.dataset_p99, unit.dataset_max, unit.render_score = p50, p99, top, score
                unit.activation_ratio = score / top if top > 0 and math.isfinite(score) else 0.0
                unit.selectivity = p99 / p50 if p50 > 0 else 0.0
                unit.dead = not top > 0
        return units

    def _atlas_row(self, name: str, tenant: str):
        row = self.store.get_job(_job_id(name), tenant)  # NOT_FOUND for an unknown job or another tenant's
        if not pb.JobSpec.FromString(row.spec).HasField("atlas"):
            raise FailedPrecondition(f"job {row.id} is not an atlas", reason="NOT_AN_ATLAS")
        return row

    # ------------------------------------------------------------------------------------------- helpers

    async def _create(self, tenant: str, spec: pb.JobSpec, request_id: str) -> tuple[str, JobRow | None]:
        """-> (the job's id, its row as just stored when it was queued now: the reply needs no read; else None).
        An idempotent retry (a request id this tenant used before) answers with that job: looked up when the
        insert finds the id taken, or when a check refuses the request (the queue may be full by now, or the
        model deleted), so a first request pays no lookup."""
        if self.scheduler.stopping:
            raise Unavailable("the server is shutting down; retry on another replica or after the restart")
        try:
            job_id, row, created = await self._admit_and_store(tenant, spec, request_id)
        except FeaturevizError:
            existing = self._retried(tenant, spec, request_id) if request_id else None
            if existing is None:
                raise
            return existing, None
        if not created:  # the request id was taken: that job answers (its spec must match)
            self._retried(tenant, spec, request_id)
        return job_id, row

    def _retried(self, tenant: str, spec: pb.JobSpec, request_id: str) -> str | None:
        """The job an earlier request with this id made (None: none); INVALID_ARGUMENT when it had another objective
        or dataset."""
        existing = self.store.job_by_request(tenant, request_id)
        if existing is None:
            return None
        before = pb.JobSpec.FromString(existing.spec)
        if before.objective != spec.objective or before.exemplar_index.dataset.removeprefix("datasets/") \
                != spec.exemplar_index.dataset.removeprefix("datasets/").strip().lower():
            raise InvalidSpec("request_id", f"{echo(request_id)} was used for a job with another objective "
                                            "or dataset; use a new request id for a new job")
        return existing.id

    async def _admit_and_store(self, tenant: str, spec: pb.JobSpec,
                               request_id: str) -> tuple[str, JobRow | None, bool]:
        """-> (the job's id, its row when it was queued now, whether it was made now: False when the request id
        was taken)."""
        with phase("admission"):  # the synchronous parts only (the worker's admission counts on its thread)
            sha, kind, dataset, stored, model, priors = self._before_admission(tenant, spec)
        from featureviz.server.matching import match_sources  # exemplar matching: the tenant's indexes (NOT_FOUND)

        matches = match_sources(self.store, tenant, sha, stored, self.config.limits.max_match_k)
        self.scheduler.admissions(1)  # in flight until submitted (or refused): the worker may hold a step for it
        try:
            try:  # converted once, by the worker (a prior's statistics and patch prior: learned there on first use)
                admission = await self.scheduler.admit_async(sha, stored, priors, matches)
            except InvalidSpec as exc:
                raise InvalidSpec(engine_field(exc.field), exc.description, reason=exc.reason) from exc
            joined = None
            if kind == ATLAS and dataset:  # the join's exemplar index over the atlas's layers, admitted as its own job
                index_spec = pb.JobSpec(model=sha)
                index_spec.exemplar_index.dataset = dataset
                index_spec.exemplar_index.layers[:] = admission.layers
                if stored.HasField("preprocess"):
                    index_spec.preprocess.CopyFrom(stored.preprocess)
                try:
                    index_admission = await self.scheduler.admit_async(sha, index_spec)
                except InvalidSpec as exc:  # named as the atlas's: the index spec is the server's, not the caller's
                    raise InvalidSpec("spec.atlas.dataset", f"the join's exemplar index over the atlas's layers: "
                                                            f"{exc.description}", reason=exc.reason) from exc
                joined = (index_spec, index_admission)
            with phase("admission"):
                return self._after_admission(tenant, request_id, sha, kind, dataset, stored, model, admission, joined)
        finally:
            self.scheduler.admissions(-1)

    def _before_admission(self, tenant: str, spec: pb.JobSpec):
        """The checks before the worker's admission: -> (sha, kind, dataset, the spec to store, the model, its prior
        sources)."""
        sha = parse_model_name(spec.model, "spec.model")
        model = self.store.get_model(tenant, sha)
        if model.state == pb.MODEL_STATE_FAILED and model.failure_reason:  # its file is missing or corrupt
            raise FailedPrecondition(model.failure_message, reason=model.failure_reason)
        if model.state != pb.MODEL_STATE_READY:
            raise FailedPrecondition(f"model {sha} is {pb.ModelState.Name(model.state)}, not READY",
                                     reason="MODEL_NOT_READY")
        kind = self._check_limits(spec)  # the rest is checked once, by the worker's admission (INVALID_ARGUMENT)
        dataset = ""
        if kind == EXEMPLAR_INDEX:  # the tenant must hold the set (NOT_FOUND, DATASET_NOT_FOUND)
            from featureviz.server.indexes import dataset_of

            dataset = dataset_of(spec)
            self.store.get_dataset(tenant, dataset)
        elif kind == ATLAS and spec.atlas.dataset:  # the atlas's join: the same
            from featureviz.server.datasets import parse_dataset_name

            dataset = parse_dataset_name(spec.atlas.dataset, "spec.atlas.dataset")
            self.store.get_dataset(tenant, dataset)
        queued = self.scheduler.unfinished(tenant)  # the store's count of its QUEUED and RUNNING rows, in memory
        limit = self.config.limits.max_queued_jobs_per_tenant
        if queued >= limit:
            raise ResourceExhausted(f"{queued} jobs queued or running, the limit per tenant is {limit}; "
                                    "wait for some to finish or cancel some", reason="QUEUE_FULL")
        stored = pb.JobSpec()
        stored.CopyFrom(spec)
        stored.model = sha
        if not stored.HasField("preprocess") and model.input_spec.HasField("preprocess"):
            stored.preprocess.CopyFrom(model.input_spec.preprocess)  # the job records what it ran with
        if spec.HasField("judge"):  # another of the tenant's models, READY, scores the images
            judge_sha = parse_model_name(spec.judge.model, "spec.judge.model")
            judge = self.store.get_model(tenant, judge_sha)
            if judge.state != pb.MODEL_STATE_READY:
                raise FailedPrecondition(f"judge model {judge_sha} is {pb.ModelState.Name(judge.state)}, not READY",
                                         reason="MODEL_NOT_READY")
            stored.judge.model = judge_sha
            if not stored.judge.HasField("preprocess") and judge.input_spec.HasField("preprocess"):
                stored.judge.preprocess.CopyFrom(judge.input_spec.preprocess)
        if spec.HasField("generator"):  # --- generator (issue 25): another of the tenant's models, a generator
            stored.generator.model = self._generator(tenant, spec.generator.model)
        if kind == ATLAS:
            self._atlas_defaults(tenant, stored)
            stored.atlas.dataset = dataset
        # the datasets of prior_dataset and the prior:DATASET terms: the tenant holds each (NOT_FOUND), each is large
        # enough (FAILED_PRECONDITION), before any compute; the stored spec names them by bare id
        priors = prior_sources(self.store, tenant, stored, self.config.limits.min_prior_images)
        if priors and kind == RENDER:
            dataset = next(iter(priors))  # DeleteDataset waits for the job (DATASET_IN_USE), as for an index job
        self._check_budget(tenant, stored)  # before the worker's admission work; again once the defaults are known
        return sha, kind, dataset, stored, model, priors

    def _generator(self, tenant: str, name: str) -> str:
        """The sha256 of the generator a job names: a model the tenant holds (NOT_FOUND), READY, a generator
        (Model.generator set) whose latent is within max_latent_size (INVALID_ARGUMENT)."""
        sha = parse_model_name(name, "spec.generator.model")
        try:
            generator = self.store.get_model(tenant, sha)
        except NotFound:
            raise NotFound(f"spec.generator.model: generator {sha} not found; upload it first (featureviz models "
                           "upload GEN.onnx)", reason="MODEL_NOT_FOUND") from None
        if generator.state != pb.MODEL_STATE_READY:
            raise FailedPrecondition(f"generator model {sha} is {pb.ModelState.Name(generator.state)}, not READY",
                                     reason="MODEL_NOT_READY")
        if not generator.HasField("generator"):
            raise InvalidSpec("spec.generator.model", f"model {sha} is not a generator: a generator's input is a "
                                                      "latent vector (N, Z) or (N, Z, 1, 1) and its output an image",
                              reason="NOT_A_GENERATOR")
        limit = self.config.limits.max_latent_size
        if generator.generator.latent_size > limit:
            raise InvalidSpec("spec.generator.model", f"the generator's latent has {generator.generator.latent_size} "
                                                      f"values, above max_latent_size = {limit}",
                              reason="LATENT_TOO_LARGE")
        return sha

    def _after_admission(self, tenant: str, request_id: str, sha: str, kind: str, dataset: str, stored: pb.JobSpec,
                         model: pb.Model, admission, joined=None) -> tuple[str, JobRow | None, bool]:
        """-> as for ``_admit_and_store``."""
        if kind == EXEMPLAR_INDEX:
            job_id, created = self._create_index(tenant, request_id, stored, sha, dataset, admission)
            return job_id, None, created
        if kind == ATLAS:
            job_id, created = self._create_atlas(tenant, request_id, stored, sha, admission, joined)
            return job_id, None, created
        for key in ("steps", "batch", "seed"):  # the job records the engine defaults it runs with
            if not stored.HasField(key):
                setattr(stored, key, getattr(admission, key))
        self._check_budget(tenant, stored)  # no await from here to submit: concurrent requests see each other
        from featureviz.server.atlas import render_key

        inputs = model.input_spec  # an atlas's unit render of this very spec ends it at once (none stored: no key)
        key = render_key(sha, stored, (inputs.default_height, inputs.default_width)) \
            if self.store.has_renders(sha) else None
        row, created = self.store.create_job(tenant, request_id, stored, sha, dataset=dataset)
        if created and not (key and self.scheduler.finish_from_store(row.id, tenant, key)):
            self.scheduler.submit(row.id, tenant, admission, row)
            return row.id, row, True  # QUEUED as stored (what a reply reads of it; the rest is the scheduler's)
        return row.id, None, created

    def _atlas_defaults(self, tenant: str, stored: pb.JobSpec) -> None:
        """Before admission: the atlas's defaults written into its spec (so each unit's key names every option),
        and the tenant's unfinished atlases within max_atlases_per_tenant."""
        limit = self.config.limits.max_atlases_per_tenant
        held = self.scheduler.atlases(tenant)
        if held >= limit:
            raise ResourceExhausted(f"{held} atlases queued or running, the limit per tenant is "
                                    f"max_atlases_per_tenant = {limit}; wait for one to finish or cancel one",
                                    reason="TOO_MANY_ATLASES")
        for name, value in ATLAS_DEFAULTS.items():
            option = BY_NAME[name]
            if name == "size":
                continue  # the admission resolves it (the model's fixed side, else the default): _create_atlas
            if option.type == "choice":
                if not getattr(stored, name):
                    setattr(stored, name, option.enum_value(value))
            elif not stored.HasField(name):
                setattr(stored, name, value)

    def _create_atlas(self, tenant: str, request_id: str, stored: pb.JobSpec, sha: str, admission,
                      joined=None) -> tuple[str, bool]:
        """-> (its id, whether it was made now). An atlas job: the spec records its resolved size; its units (catalog order, then channel) and their
        variant renders are stored with their keys, and the scheduler grants them in the room interactive jobs
        leave. With a dataset (``joined``: the index job's spec and admission) its exemplar index job is made
        (or ends at once, cached, when a finished index of that key exists) and recorded as the atlas's join."""
        from featureviz.server.atlas import unit_key
        from featureviz.server.atlas import variant_key
        from featureviz.server.atlas import variants_of
        from featureviz.server.indexes import index_id

        limit = self.config.limits.max_atlas_units
        if admission.channels > limit:
            raise InvalidSpec("spec.atlas", f"{admission.channels} units ({len(admission.layers)} layers); the limit "
                                            f"is max_atlas_units = {limit}: select fewer layers or set channels",
                              reason="TOO_MANY_UNITS")
        stored.size.height, stored.size.width = admission.size
        check_limits(stored, self.config.limits)
        units = [(layer, depth, channel, unit_key(sha, stored, layer, channel))
                 for layer, depth, count in zip(admission.layers, admission.depths, admission.units)
                 for channel in range(count)]
        # its prior's set (prior_dataset, a bare id by now): DeleteDataset waits for the atlas (DATASET_IN_USE)
        row, created = self.store.create_job(tenant, request_id, stored, sha, dataset=stored.prior_dataset)
        if created:
            self.store.add_atlas_units(row.id, units)
            self.store.add_atlas_variants(row.id, [(i, variant, variant_key(sha, stored, layer, channel, variant))
                                                   for i, (layer, _, channel, _) in enumerate(units)
                                                   for variant in variants_of(stored)])
            if joined is not None:
                index_spec, index_admission = joined
                index_job, _ = self._create_index(tenant, "", index_spec, sha, stored.atlas.dataset, index_admission)
                self.store.put_atlas_join(row.id, stored.atlas.dataset, index_job, index_id(sha, index_spec))
            self.scheduler.submit_atlas(row.id, tenant)
        return row.id, created

    def _create_index(self, tenant: str, request_id: str, stored: pb.JobSpec, sha: str, dataset: str,
                      admission) -> tuple[str, bool]:
        """-> (its id, whether it was made now). An exemplar index job: the spec records what admission resolved (its index key: layers, size,
        preprocess, k; and batch_size); a finished index of that key, any tenant's (this one holds the model and
        the set), ends the job at once, cached; otherwise it is queued like a render."""
        from featureviz.server.indexes import index_id

        index = stored.exemplar_index
        index.dataset = dataset
        index.layers[:] = admission.layers
        index.k, index.batch_size = admission.k, admission.batch_size
        stored.size.height, stored.size.width = admission.size
        stored.preprocess.CopyFrom(pb.Preprocess(mean=admission.preprocess["mean"], std=admission.preprocess["std"],
                                                 channel_order=admission.preprocess["channel_order"]))
        check_limits(stored, self.config.limits)  # the resolved size and defaults are within this server's limits
        found = self.store.get_index(index_id(sha, stored))
        row, created = self.store.create_job(tenant, request_id, stored, sha, dataset=dataset)
        if created:
            if found is not None:
                self.scheduler.finish_cached(row.id, tenant, sha, found[1])
            else:
                self.scheduler.submit(row.id, tenant, admission)
        return row.id, created

    def _check_budget(self, tenant: str, spec: pb.JobSpec) -> None:
        """The tenant's queued and running images x steps plus this job's stay within max_image_steps_per_tenant."""
        limit = self.config.limits.max_image_steps_per_tenant
        held, cost = self.scheduler.image_steps(tenant), job_cost(spec)
        if held + cost > limit:
            raise ResourceExhausted(
                f"this job is {cost} image-steps ({spec.batch if spec.HasField('batch') else 1} image(s) x "
                f"{spec.steps if spec.HasField('steps') else 512} steps) and your queued and running jobs hold {held}; "
                f"the limit per tenant is max_image_steps_per_tenant = {limit}; wait for some to finish, cancel some, "
                "or ask for fewer steps or images", reason="IMAGE_STEPS_BUDGET")

    def _check_limits(self, spec: pb.JobSpec) -> str:
        """The checks before the worker's admission; -> the job's kind (a render option on an index job, an index
        job with an objective, a render without one: INVALID_ARGUMENT naming the field)."""
        limits = self.config.limits
        kind = check_kind(spec)
        nodes, depth = objective_size(spec.objective, limits.max_objective_nodes, limits.max_objective_depth)
        if nodes > limits.max_objective_nodes:
            raise InvalidSpec("spec.objective", f"more than {limits.max_objective_nodes} objectives (sum terms, "
                                                "scales, batches, interpolations and leaves all count); the limit is "
                                                f"max_objective_nodes = {limits.max_objective_nodes}",
                              reason="OBJECTIVE_TOO_LARGE")
        if depth > limits.max_objective_depth:
            raise InvalidSpec("spec.objective", f"nested more than {limits.max_objective_depth} levels deep; the "
                                                f"limit is max_objective_depth = {limits.max_objective_depth}",
                              reason="OBJECTIVE_TOO_DEEP")
        check_limits(spec, limits)  # the declared options a published limit bounds (steps, lr, batch, size), previews
        # an init image's size is checked from its header by the worker's admission (max_image_side), before
        # any pixel is decoded
        return kind

    def _watch_slot(self, tenant: str):
        """One of the tenant's ``max_watches_per_tenant`` open watch streams, held until the stream ends."""
        return self._watches.hold(tenant, self.config.limits.max_watches_per_tenant)

    async def _watch(self, job_id: str, tenant: str, from_seq: int, previews: bool, row: JobRow | None = None):
        self._watching += 1
        self._idle.clear()
        try:
            async for event in self._events(job_id, tenant, from_seq, previews, row):
                yield event
        finally:
            self._watching -= 1
            if not self._watching:
                self._idle.set()

    async def _events(self, job_id: str, tenant: str, from_seq: int, previews: bool, row: JobRow | None = None):
        with phase("watch"):
            snapshot = self.scheduler.job(job_id, tenant, row=row)  # NOT_FOUND for someone else's job
            events = self.scheduler.log(job_id, row=row)
        seq = min(from_seq, max(snapshot.last_seq, events.last_seq))  # a from_seq past the end: from the end
        attached = events.last_seq  # previews logged before the watch are replayed; later ones coalesce
        yield pb.JobEvent(seq=seq, time=_now(), snapshot=snapshot)
        heartbeat = self.config.heartbeat_seconds
        while True:
            waiter = events.waiter()
            with phase("watch"):
                fresh = events.since(seq, previews=previews)
            for event in fresh:
                seq = event.seq
                if event.HasField("preview") and attached < event.seq < events.last_preview_seq:
                    continue  # a newer preview is logged: a slow reader gets the newest, not a backlog
                yield event
                if event.HasField("result"):
                    return
            # The worker stores the end of a job before it appends the result event: while it is between the
            # two, the event is on its way (the waiter wakes us), and making one up here would repeat a seq. A job
            # queued here or held by the worker is not finished: no read of its row (the row first, then the checks).
            with phase("watch"):
                row = None if self.scheduler.is_unfinished(job_id) else self.store.get_job(job_id)
            if row is not None and row.state in TERMINAL_STATES and not self.scheduler.is_unfinished(job_id) \
                    and not events.pending:
                if events.since(seq, previews=previews):
                    waiter.cancel()
                    continue  # the result event was appended since we looked: deliver it from the log
                # finished before this log existed (a restart), or already seen
                yield pb.JobEvent(seq=max(seq, row.last_seq), time=_now(), result=self.scheduler.job(job_id, tenant))
                return
            if self._draining.is_set():  # every event so far is delivered
                raise Unavailable(f"the server is shutting down; re-attach with from_seq={seq} (to another replica, "
                                  "or after the restart)")
            # one future: done at the next publish, at drain() or (False) after the heartbeat interval; no tasks
            timer = asyncio.get_running_loop().call_later(heartbeat, _resolve, waiter, False)
            self._waiting.add(waiter)
            try:
                woken = await waiter
            finally:
                timer.cancel()
                self._waiting.discard(waiter)
                waiter.cancel()  # no-op when done; a cancelled watch leaves no pending future in the log
            if not woken:
                yield pb.JobEvent(seq=seq, time=_now(), heartbeat=pb.Heartbeat())


def objective_size(objective: pb.Objective, max_nodes: int, max_depth: int) -> tuple[int, int]:
    """(nodes, depth) of an objective tree; stops counting once past either limit (a hostile tree is not walked
    to its end)."""
    nodes, depth = 0, 0
    stack = [(objective, 1)]
    while stack and nodes <= max_nodes and depth <= max_depth:
        message, level = stack.pop()
        nodes, depth = nodes + 1, max(depth, level)
        kind = message.WhichOneof("kind")
        body = getattr(message, kind) if kind else None
        for field in body.DESCRIPTOR.fields if body is not None else ():  # the Objective fields of its message
            if field.message_type is pb.Objective.DESCRIPTOR:
                children = getattr(body, field.name)
                stack.extend((child, level + 1) for child in (children if field.is_repeated else (children,)))
    return nodes, depth


SUMMARY_CHARS = 200


def _summary(job: pb.Job, limits) -> pb.Job:
    """A job as ListJobs returns it: the objective as capped text instead of the objective tree and no init
    image, so a page of jobs stays small whatever their specs hold (GetJob carries the whole spec)."""
    from featureviz.codec import objective_from_proto
    from featureviz.spec import format_objective

    nodes, depth = objective_size(job.spec.objective, limits.max_objective_nodes, limits.max_objective_depth)
    if job.spec.HasField("atlas"):
        text = f"atlas of {job.result.atlas.units or '?'} units" if job.result.HasField("atlas") else "atlas"
    elif job.spec.HasField("exemplar_index"):  # no objective: say what it indexes
        index = job.spec.exemplar_index
        text = f"exemplar index of datasets/{index.dataset} at {len(index.layers)} layer(s), k={index.k}"
    elif nodes > limits.max_objective_nodes or depth > limits.max_objective_depth:
        text = f"(an objective of more than {min(nodes, limits.max_objective_nodes)} parts)"
    else:
        try:
            text = format_objective(objective_from_proto(job.spec.objective))
        except Exception:  # an odd stored spec must not break the listing
            text = "?"
    job.objective_text = text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "\u2026"
    job.spec.ClearField("objective")
    job.spec.ClearField("init_image")
    return job


def _resolve(future: asyncio.Future, value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _unit(values) -> pb.AtlasUnit:
    """A row of Store.atlas_units -> AtlasUnit."""
    from featureviz.server.atlas import UNIT_CACHED
    from featureviz.server.atlas import UNIT_RENDERED

    idx, layer, _depth, channel, key, state, objective, seconds, device, width, height = values
    unit = pb.AtlasUnit(index=idx, layer=layer, channel=channel, key=key, done=state in (UNIT_RENDERED, UNIT_CACHED),
                        cached=state == UNIT_CACHED)
    if unit.done and objective is not None:
        unit.objective, unit.device_seconds, unit.device = objective, seconds, device
        unit.width, unit.height = width, height
    return unit


def _now():
    event = pb.JobEvent()
    event.time.GetCurrentTime()
    return event.time
