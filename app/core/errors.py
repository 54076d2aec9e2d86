"""Domain errors, raised by services and serving; app/error_handlers.py maps them to HTTP status
codes with the message as ``detail``."""


class ServiceError(Exception):
    status_code = 400

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class BadRequest(ServiceError):
    status_code = 400


class NotFound(ServiceError):
    status_code = 404


class Conflict(ServiceError):
    status_code = 409


class Invalid(ServiceError):
    status_code = 422


class TooLarge(ServiceError):
    status_code = 413


class Unavailable(ServiceError):
    """The database or broker cannot be reached; the client should retry later (503 + Retry-After)."""

    status_code = 503


class UnsupportedMediaType(ServiceError):
    status_code = 415
