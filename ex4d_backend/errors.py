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
DISK_FULL = "disk_full"  # no space left (ENOSPC, a quota, a file size limit) while writing
IO_ERROR = "io_error"  # the file system failed or changed under us (EIO, read-only, files removed by others)
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


_FULL_ERRNOS = {28, 122, 27}  # ENOSPC, EDQUOT, EFBIG


def is_disk_full(exc: BaseException) -> bool:
    """An OSError meaning "no space": ENOSPC, a quota (EDQUOT) or a file size limit (EFBIG, ulimit -f)."""
    return isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS


def _mib(n: float) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def disk_full_error(exc: OSError, folder: str, *, needed: int | None = None, written: int | None = None) -> Ex4dError:
    """The ``disk_full`` error for an OSError of :func:`is_disk_full`: what was being written, the free
    space there, and how much more is needed (when known)."""
    import shutil

    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    kind = {28: "the disk is full", 122: "the disk quota is exceeded", 27: "the file size limit was reached"}
    what = f"{kind.get(exc.errno, 'no space left')} while writing"
    if written is not None:
        what += f" ({_mib(written)} written so far)"
    if free is not None:
        what += f"; {_mib(free)} free"
    if needed is not None:
        hint = f"free at least {_mib(max(0, needed - (free or 0)) or needed)} on that disk and run the job again"
    elif written is not None:
        hint = f"free more than {_mib(written)} on that disk (or choose another job store) and run the job again"
    else:
        hint = "free some space on that disk (or choose another job store) and run the job again"
    if exc.errno == 27:
        hint = "raise the file size limit (ulimit -f) and run the job again"
    return Ex4dError(what, where=folder, hint=hint, code=DISK_FULL)
