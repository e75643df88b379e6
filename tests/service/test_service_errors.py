"""Errors cross process boundaries (a worker in a Ray actor or a child process raises them in the server): every
FeaturevizError of :mod:`featureviz.errors` survives pickle with its type, message, reason, fields and status code.
InvalidSpec(field, description) used to pickle as its one formatted arg and fail to rebuild, which Ray reported as
an unserializable exception and the pool retried as if the actor were down (an admission hung for minutes)."""

from __future__ import annotations

import inspect
import pickle

from featureviz import errors

CASES = [
    errors.FeaturevizError("a message", reason="SOME_REASON"),
    errors.InvalidSpec("objective.terms[1].channel", "channel 99 is out of range", reason="CHANNEL_RANGE"),
    errors.Diverged(3, "the objective", 0.5),
    errors.ModelImportError("op Foo is not supported", reason="UNSUPPORTED_OP"),
    errors.NotFound("model 'x' not found", reason="MODEL_NOT_FOUND"),
    errors.FailedPrecondition("index not finished", reason="INDEX_UNFINISHED"),
    errors.ResourceExhausted("over the quota"),
    errors.SignInThrottled("too many sign-ins", retry_seconds=7.5),
    errors.Cancelled("cancelled"),
    errors.Unavailable("no worker", reason="WORKER_UNAVAILABLE"),
    errors.Unauthenticated("no token"),
    errors.PermissionDenied("read-only token"),
    errors.Aborted("idle upload"),
]


def test_every_error_class_is_covered():
    classes = {cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, errors.FeaturevizError)}
    assert classes == {type(err) for err in CASES}


def test_errors_survive_pickle_with_their_fields():
    for err in CASES:
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err)
        assert (str(back), back.message, back.reason, back.args) == (str(err), err.message, err.reason, err.args)
        assert vars(back) == vars(err)
        assert errors.code_name(back) == errors.code_name(err)
