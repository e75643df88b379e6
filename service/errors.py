"""Errors shared by the importer, the engine and the service.

Every error a user can cause is a :class:`FeaturevizError` with a stable ``reason`` code and a message that
names the bad value, the limit and the fix. Each class has one status code name (:data:`CODE_NAMES`,
:func:`code_name`): the gRPC layer turns the name into a status with details (``featureviz.server.errors``), the
web gateway into an HTTP status, a failed job carries it (:func:`job_error`); the CLI prints ``str(err)`` as one
line. This module imports neither grpc nor torch.

    FeaturevizError
     +-- InvalidSpec          a request field is wrong             -> INVALID_ARGUMENT (+ BadRequest field violation)
     |    +-- Diverged        the optimisation went non-finite (lr) -> a job FAILED with reason DIVERGED
     +-- ModelImportError     the ONNX file cannot be imported     -> INVALID_ARGUMENT (+ ErrorInfo reason)
     +-- NotFound             unknown model / job / layer id       -> NOT_FOUND
     +-- FailedPrecondition   the resource is not in a usable state -> FAILED_PRECONDITION
     +-- ResourceExhausted    over a limit or quota               -> RESOURCE_EXHAUSTED (+ QuotaFailure, RetryInfo)
     |    +-- SignInThrottled too many failed sign-ins from one address (retry_seconds)
     +-- Cancelled            a job was cancelled                  -> CANCELLED
     +-- Unavailable          the server is draining, or no worker  -> UNAVAILABLE
     +-- Unauthenticated      no or an unknown bearer token        -> UNAUTHENTICATED
     +-- PermissionDenied     a read-only token changing state     -> PERMISSION_DENIED
     +-- Aborted              an upload stream idle too long       -> ABORTED (resume)
    anything else             a bug                                -> INTERNAL (traceback logged, never sent)
"""

from __future__ import annotations

__all__ = [
    "FeaturevizError",
    "InvalidSpec",
    "Diverged",
    "ModelImportError",
    "NotFound",
    "FailedPrecondition",
    "ResourceExhausted",
    "Cancelled",
    "Unavailable",
    "Unauthenticated",
    "PermissionDenied",
    "SignInThrottled",
    "Aborted",
    "CODE_NAMES",
    "code_name",
    "job_error",
    "cap",
    "echo",
    "ECHO_CHARS",
    "MAX_TEXT_CHARS",
]

ECHO_CHARS = 100  # the most of a client-sent value an error message repeats
MAX_TEXT_CHARS = 1000  # a status message or a detail's description, at most (an error fits 8 KB of metadata)


def cap(text: str, limit: int = MAX_TEXT_CHARS) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis (the safety net behind ``echo``)."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def echo(value, limit: int = ECHO_CHARS) -> str:
    """A client-sent value as an error message quotes it: its repr (ASCII), cut to ``limit`` characters with an
    ellipsis and the full length, so a hostile or mistaken 20 kB string never travels back in full."""
    text = ascii(value)
    if len(text) <= limit:
        return text
    unit = "characters" if isinstance(value, (str, bytes)) else "values"
    size = len(value) if hasattr(value, "__len__") else len(text)
    return f"{text[:limit]}… ({size} {unit})"


class FeaturevizError(Exception):
    """Base class. ``reason`` is an UPPER_SNAKE code clients can switch on."""

    reason = "FEATUREVIZ_ERROR"

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self):
        # pickled as (class, args, attributes), not rebuilt by calling the class: the subclasses' constructors take
        # other arguments (InvalidSpec(field, description), Diverged(step, what, lr)); a worker in another process
        # (featureviz.worker.process, Ray) raises the same class with the same message, reason and field here
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def _rebuild(cls, args: tuple, state: dict) -> "FeaturevizError":
    """The unpickling of a :class:`FeaturevizError` (its ``__reduce__``): only a FeaturevizError class."""
    if not (isinstance(cls, type) and issubclass(cls, FeaturevizError)):
        raise TypeError(f"not a featureviz error class: {cls!r}")
    exc = cls.__new__(cls)
    exc.args = tuple(args)
    exc.__dict__.update(state)
    return exc


class InvalidSpec(FeaturevizError):
    """A field of a request is invalid. ``field`` is a dotted path such as ``objective.terms[1].channel``."""

    reason = "INVALID_SPEC"

    def __init__(self, field: str, description: str, *, reason: str | None = None):
        super().__init__(f"{field}: {description}", reason=reason)
        self.field = field
        self.description = description


class Diverged(InvalidSpec):
    """The objective or its gradient became non-finite (NaN or infinite) at ``step``: the learning rate is too
    high for this objective. Raised by the render loop, which stops there instead of returning a black image."""

    reason = "DIVERGED"

    def __init__(self, step: int, what: str, lr: float):
        super().__init__("lr", f"the optimisation diverged at step {step}: {what} became non-finite (NaN or "
                               f"infinite) with lr={lr:g}; use a lower learning rate, e.g. --lr {lr / 10:.3g}")
        self.step = step


class ModelImportError(FeaturevizError):
    """An ONNX model cannot be imported. Reasons: NOT_ONNX, INVALID_MODEL, EXTERNAL_DATA, CUSTOM_DOMAIN,
    UNSUPPORTED_OP, CONVERSION_FAILED, VERIFICATION_FAILED, UNSUPPORTED_INPUT, MODEL_TOO_LARGE."""

    reason = "IMPORT_FAILED"


class NotFound(FeaturevizError):
    reason = "NOT_FOUND"


class FailedPrecondition(FeaturevizError):
    reason = "FAILED_PRECONDITION"


class ResourceExhausted(FeaturevizError):
    reason = "RESOURCE_EXHAUSTED"


class Cancelled(FeaturevizError):
    reason = "CANCELLED"


class Unavailable(FeaturevizError):
    reason = "UNAVAILABLE"


class Unauthenticated(FeaturevizError):
    reason = "UNAUTHENTICATED"


class PermissionDenied(FeaturevizError):
    """A known caller whose token does not allow this RPC."""

    reason = "PERMISSION_DENIED"


class SignInThrottled(ResourceExhausted):
    """Too many failed sign-ins from one client address: refused until ``retry_seconds`` pass (RetryInfo)."""

    reason = "SIGN_IN_THROTTLED"

    def __init__(self, message: str, *, retry_seconds: float):
        super().__init__(message)
        self.retry_seconds = retry_seconds


class Aborted(FeaturevizError):
    """The server ended the call (an upload stream idle too long); the client may retry or resume."""

    reason = "ABORTED"


# each error class -> its status code name (google.rpc / grpc.StatusCode names); the first match wins
CODE_NAMES: tuple[tuple[type[FeaturevizError], str], ...] = (
    (InvalidSpec, "INVALID_ARGUMENT"),
    (ModelImportError, "INVALID_ARGUMENT"),
    (NotFound, "NOT_FOUND"),
    (FailedPrecondition, "FAILED_PRECONDITION"),
    (ResourceExhausted, "RESOURCE_EXHAUSTED"),
    (Cancelled, "CANCELLED"),
    (Unavailable, "UNAVAILABLE"),
    (Unauthenticated, "UNAUTHENTICATED"),
    (PermissionDenied, "PERMISSION_DENIED"),
    (Aborted, "ABORTED"),
)


def code_name(exc: BaseException) -> str:
    """The status code name of ``exc`` (``INTERNAL`` for anything that is not a FeaturevizError of a known kind)."""
    for kind, name in CODE_NAMES:
        if isinstance(exc, kind):
            return name
    return "INTERNAL"


def job_error(exc: BaseException):
    """The :class:`featureviz.v1.JobError` a failed job carries. Out of device memory becomes RESOURCE_EXHAUSTED /
    GPU_OOM; anything unexpected INTERNAL, without its text (the worker logs the traceback)."""
    from featureviz.v1 import featureviz_pb2 as pb  # protobuf only when a job fails

    if _is_oom(exc):
        first = str(exc).splitlines()[0] if str(exc) else ""
        return pb.JobError(code="RESOURCE_EXHAUSTED", reason="GPU_OOM",
                           message=cap(f"the device ran out of memory: {first}; use a smaller size or batch"))
    if isinstance(exc, FeaturevizError):
        field = exc.field if isinstance(exc, InvalidSpec) else ""
        return pb.JobError(code=code_name(exc), reason=exc.reason, message=cap(exc.message), field=cap(field, 200))
    return pb.JobError(code="INTERNAL", reason="INTERNAL_ERROR",
                       message=f"internal error ({type(exc).__name__}); the server log has the traceback")


def _is_oom(exc: BaseException) -> bool:
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
