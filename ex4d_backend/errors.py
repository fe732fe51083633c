"""One error type for everything the user can get wrong.

Every failure a user can cause (bad footage, depth of the wrong size, a missing model, ...) is raised
as :class:`Ex4dError` with three parts: *what* went wrong, *where* (a file, a flag, a frame) and a
*hint* saying what to do. The CLI prints it as one message and exits with status 2; the service
(`ex4d serve`) sends it as an ``error`` event with the stable ``code``.
"""

from __future__ import annotations

# Stable error codes (the service protocol exposes them; never rename one).
BAD_INPUT = "bad_input"  # a value, file or argument the user gave is unusable
NOT_FOUND = "not_found"  # a path that should exist does not
MODEL_MISSING = "model_missing"  # model weights are not in the models directory
MODEL_INVALID = "model_invalid"  # model weights are present but corrupt or of the wrong layout
DEVICE = "device"  # the requested device / backend is unavailable (no CUDA, no nvdiffrast)
CANCELLED = "cancelled"  # the job was cancelled by the user
INTERNAL = "internal"  # a bug: anything that is not one of the above


class Ex4dError(Exception):
    """A user-facing error: what went wrong, where, and what to do about it."""

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None, code: str = BAD_INPUT):
        super().__init__(what)
        self.what = what
        self.where = where
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        text = self.what
        if self.where:
            text += f" [{self.where}]"
        if self.hint:
            text += f" -- {self.hint}"
        return text

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.what, "where": self.where, "hint": self.hint}


class Cancelled(Ex4dError):
    """Raised from a progress callback to stop a job at the next step boundary."""

    def __init__(self, what: str = "cancelled by the user"):
        super().__init__(what, code=CANCELLED)
