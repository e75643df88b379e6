"""Errors shared by the importer, the engine and the service.

Every error a user can cause is a :class:`FeaturevizError` with a stable ``reason`` code and a message that
names the bad value, the limit and the fix. The gRPC layer maps them to status codes in one place
(``featureviz.server``); the CLI prints ``str(err)`` as one line; nothing else needs to know.

    FeaturevizError
     +-- InvalidSpec          a request field is wrong             -> INVALID_ARGUMENT (+ BadRequest field violation)
     |    +-- Diverged        the optimisation went non-finite (lr) -> a job FAILED with reason DIVERGED
     +-- ModelImportError     the ONNX file cannot be imported     -> INVALID_ARGUMENT (+ ErrorInfo reason)
     +-- NotFound             unknown model / job / layer id       -> NOT_FOUND
     +-- FailedPrecondition   the resource is not in a usable state -> FAILED_PRECONDITION
     +-- ResourceExhausted    over a limit or quota               -> RESOURCE_EXHAUSTED
     +-- Cancelled            a job was cancelled                  -> CANCELLED
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
    "echo",
    "ECHO_CHARS",
]

ECHO_CHARS = 100  # the most of a client-sent value an error message repeats


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
