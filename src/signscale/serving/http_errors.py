"""What the service refuses and how it says so: an error becomes ``{"error": {"status", "reason",
"message"}}`` with its HTTP status (and Retry-After when the service is only busy)."""

from __future__ import annotations


class ApiError(Exception):
    """A request the service refuses: becomes ``{"error": {"status", "reason", "message"}}``."""

    def __init__(self, status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers or {}


class Overloaded(ApiError):
    def __init__(self, reason: str, message: str, retry_after_s: int) -> None:
        super().__init__(503, reason, message, {"Retry-After": str(retry_after_s)})
