"""modalink's error types, and the one table that turns them into the status a caller sees.

The CLI turns ``InputError`` into exit code 2; the gRPC APIs answer ``status_of(e)``'s code and the HTTP APIs
its ``HTTP_STATUS``. Messages name what failed in words a caller understands: never an exception type or an
internal address (those go to the service's log).
"""

from __future__ import annotations

from modalink_client import options


class InputError(ValueError):
    """The request or file is unusable (corrupt, wrong shape/format, unknown modality); the message says why."""


class ConfigError(ValueError):
    """The configuration asks for something this machine or install cannot do (reported, not a traceback)."""


class NotFound(InputError):
    """The request names something that does not exist (a job id); services answer NOT_FOUND / 404."""


class QuotaExceeded(RuntimeError):
    """A caller has used up a quota (running jobs): RESOURCE_EXHAUSTED / 429; the same call succeeds later."""


class BackendError(RuntimeError):
    """A service behind this one (an encoder, the LLM) failed. ``code``: the gRPC status name to answer with."""

    code = "INTERNAL"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class BackendTimeout(BackendError, TimeoutError):
    """A service behind this one did not answer within the call's deadline (DEADLINE_EXCEEDED / 504)."""

    code = "DEADLINE_EXCEEDED"


class BackendCrashed(BackendError):
    """A service behind this one went away while this request was in flight, and again on its one retry: the
    request itself may be what kills it, so it is not retried again (INTERNAL: clients do not retry it either)."""


class BackendUnavailable(BackendError, ConnectionError):
    """A service behind this one cannot be reached or is restarting: the same call may succeed shortly
    (UNAVAILABLE / 503 with a retry hint)."""

    code = "UNAVAILABLE"


# gRPC status name -> HTTP status, for every HTTP API (the OpenAI-compatible route, the LLM's TGI API, the playground):
# written once, in the client, which the playground uses without this package.
HTTP_STATUS = options.HTTP_STATUS
INTERNAL_MESSAGE = options.INTERNAL_MESSAGE


def status_of(e: BaseException) -> tuple[str, str]:
    """(gRPC status name, message for the caller) of an exception, the same on every API. Anything unexpected is
    INTERNAL with a fixed message (its details are for the log, not for callers)."""
    if isinstance(e, NotFound):
        return "NOT_FOUND", str(e)
    if isinstance(e, InputError):
        return "INVALID_ARGUMENT", str(e)
    if isinstance(e, QuotaExceeded):
        return "RESOURCE_EXHAUSTED", str(e)
    if isinstance(e, PermissionError):
        return "PERMISSION_DENIED", str(e)
    if isinstance(e, BackendError):
        return e.code, str(e)
    if isinstance(e, TimeoutError):
        return "DEADLINE_EXCEEDED", str(e) or "timed out"
    if isinstance(e, ConnectionError):
        return "UNAVAILABLE", str(e) or "a service behind this one is unreachable"
    return "INTERNAL", INTERNAL_MESSAGE
