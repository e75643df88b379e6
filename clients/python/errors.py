"""The client's one error type, converted from ``grpc.RpcError`` in one place (:func:`from_rpc_error`)."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field

import grpc

__all__ = ["FeaturevizClientError", "from_rpc_error"]


@dataclass
class FeaturevizClientError(Exception):
    """A failed call. ``code`` is the status code name (``"INVALID_ARGUMENT"``), ``reason`` the server's
    UPPER_SNAKE reason (``"DIGEST_MISMATCH"``), ``field_violations`` the (field, description) pairs of a
    BadRequest, ``retry_after`` seconds from RetryInfo (None when absent)."""

    code: str
    message: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.code, self.message)

    @property
    def reason(self) -> str:
        return self.details.get("reason", "")

    @property
    def field_violations(self) -> list[tuple[str, str]]:
        return self.details.get("field_violations", [])

    @property
    def retry_after(self) -> float | None:
        return self.details.get("retry_after")

    def __str__(self) -> str:
        reason = f" [{self.reason}]" if self.reason and self.reason != self.code else ""
        return f"{self.code}{reason}: {self.message}"


def from_rpc_error(err: grpc.RpcError) -> FeaturevizClientError:
    """RpcError -> FeaturevizClientError with the google.rpc details (ErrorInfo, BadRequest, RetryInfo) read back."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    message = err.details() if hasattr(err, "details") else str(err)
    details: dict = {}
    try:
        status = rpc_status.from_call(err)
    except (ValueError, AttributeError):  # a malformed trailer must not hide the error itself
        status = None
    if status is not None:
        message = status.message or message
        for any_detail in status.details:
            if any_detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_detail.Unpack(info)
                details["reason"] = info.reason
                details["domain"] = info.domain
            elif any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                any_detail.Unpack(bad)
                details["field_violations"] = [(v.field, v.description) for v in bad.field_violations]
            elif any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                any_detail.Unpack(retry)
                details["retry_after"] = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    name = code.name if isinstance(code, grpc.StatusCode) else str(code)
    return FeaturevizClientError(name, message or "", details)


# a stream that broke (server restart, network) can be resumed; anything else is an answer
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def reconnect_delay(err: grpc.RpcError, failures: int, reconnects: int) -> float:
    """Seconds to wait before re-attaching a watch after its ``failures``-th broken stream (exponential, at most
    5 s); raises the converted error when the code is not retryable or ``reconnects`` are used up."""
    if err.code() not in RETRYABLE or failures > reconnects:
        raise from_rpc_error(err) from None
    return min(5.0, 0.25 * 2**failures)
