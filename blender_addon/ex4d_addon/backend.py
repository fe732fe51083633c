"""One backend service per Blender session, and the request parameters built from the scene.

The add-on never imports torch nor ``ex4d_backend``: it runs ``<backend python> -m ex4d_backend serve``
through :mod:`.backend_client` (owned by the service) and exchanges JSON lines (``ex4d_backend/PROTOCOL.md``).
The backend may only read inside the folders it was started with (``--allow``): when a request needs a
folder not yet allowed, the idle backend is restarted with it added.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import bpy

from . import props
from .backend_client import PROTOCOL_VERSION, BackendClient, BackendError, Request

_client: BackendClient | None = None
_config: tuple | None = None
_allowed: set[str] = set()
_listeners: list[Callable[[dict], None]] = []
_hello_pid: int | None = None  # the backend process that answered our first hello
last_hello: dict = {}  # its answer (versions, devices, models)
ENV_STORE = "EX4D_STORE"  # job store override (tests, farms); the preference wins when set


def add_listener(fn: Callable[[dict], None]) -> None:
    """Call ``fn(event)`` for every event the backend sends, whoever polls the client."""
    if fn not in _listeners:
        _listeners.append(fn)


def remove_listener(fn: Callable[[dict], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def _fan_out(event: dict) -> None:
    for fn in list(_listeners):
        try:
            fn(event)
        except Exception as exc:  # noqa: BLE001 - a listener must never break the event stream
            print(f"EX-4D: event listener failed: {exc!r}")


def _settings(context) -> tuple[str, str | None, str | None, int]:
    pref = props.prefs(context)
    python, where = props.find_backend_python(pref.backend_python if pref else "")
    if not python:
        raise BackendError("not_found", "backend Python not found", hint=where)
    if not os.path.isfile(python):
        raise BackendError(
            "not_found",
            f"the backend Python {python} does not exist (from {where})",
            hint="fix it in the add-on preferences (Backend Python), or run scripts/install_deps.py",
        )
    store = (bpy.path.abspath(pref.store_dir) if pref and pref.store_dir else "") or os.environ.get(ENV_STORE) or None
    models = bpy.path.abspath(pref.models_dir) if pref and pref.models_dir else None
    keep_s = int(pref.keep_model_loaded) if pref else 600
    return python, store, models, keep_s


def _covered(path: str) -> bool:
    p = os.path.realpath(path)
    return any(p == a or p.startswith(a.rstrip(os.sep) + os.sep) for a in _allowed)


def allow(folders: list[str]) -> None:
    """Let the backend read these folders (and below) from its next start on: a pipeline that knows its
    project root allows it once instead of restarting the backend for each new input folder."""
    for f in folders:
        if f:
            _allowed.add(os.path.realpath(f))


def get_client(context, paths: list[str] = ()) -> BackendClient:
    """The session's client, started (or restarted when idle) so that it may read ``paths``."""
    global _client, _config
    python, store, models, keep_s = _settings(context)
    new_dirs = []
    for p in paths:  # allow the folder holding each input (an image sequence: the folder above it)
        if p and not _covered(p):
            d = os.path.dirname(os.path.realpath(p).rstrip(os.sep)) or os.sep
            if d not in new_dirs:
                new_dirs.append(d)
    config = (python, store, models, keep_s)
    if _client is not None:
        _client.poll()  # deliver a pending exit so requests of a dead backend count as done
    busy = _client is not None and _client.running and any(not r.done for r in _client.requests.values())
    if _client is not None and (config != _config or new_dirs):
        if busy:
            raise BackendError(
                "busy",
                "the backend is running a job and must be restarted to read " + ", ".join(new_dirs or ["new settings"]),
                hint="wait for the job to finish (or cancel it), then try again",
            )
        _close_in_background(_client)
        _client = None
    _allowed.update(new_dirs)
    if _client is None:
        _client = BackendClient(
            python=python,
            store=store,
            models_dir=models,
            allow=sorted(_allowed),
            extra_args=["--keep-generator", str(keep_s)],
            on_event=_fan_out,
        )
        _config = config
    return _client


def note_hello(client: BackendClient, req: Request) -> dict:
    """Record a finished hello (raises BackendError if it failed or speaks another protocol)."""
    global _hello_pid
    info = req.raise_for_error()
    theirs = str(info.get("protocol", "?"))
    if theirs.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        raise BackendError(
            "protocol",
            f"the backend speaks protocol {theirs}, the add-on {PROTOCOL_VERSION}",
            hint="install matching versions of the add-on and the backend (scripts/install_deps.py)",
        )
    _hello_pid = client.pid
    last_hello.clear()
    last_hello.update(info)
    return info


def _close_in_background(client: BackendClient, timeout: float = 10.0) -> None:
    """Ask ``client``'s backend to shut down without waiting for it on the main thread (it exits on its
    own at end of stdin; a thread kills it if it has not exited after ``timeout`` seconds)."""

    def close() -> None:
        try:
            client.close(timeout=timeout)
        except Exception:  # noqa: BLE001 - best effort
            client.kill()

    threading.Thread(target=close, daemon=True, name="ex4d-close").start()


def shutdown(wait: bool = False) -> None:
    """Stop the backend (add-on unregister, Blender exit); returns at once unless ``wait``."""
    global _client, _hello_pid
    if _client is not None:
        if wait:
            try:
                _client.close(timeout=5)
            except Exception:  # noqa: BLE001 - never fail an unregister
                _client.kill()
        else:
            _close_in_background(_client)
        _client = None
    _hello_pid = None


def current_client() -> BackendClient | None:
    return _client


# -- request parameters from the scene ---------------------------------------------------------
def clip_params(context) -> tuple[dict, list[str]]:
    """The common job parameters (footage, depth, intrinsics) and the paths they read."""
    s = context.scene.ex4d
    if not s.footage_path:
        raise BackendError("bad_input", "no footage", hint="import footage first (EX-4D panel > Import Footage)")
    footage = bpy.path.abspath(s.footage_path)
    params: dict = {"footage": footage, "max_side": int(s.max_side), "focal_px": float(s.focal_px)}
    if s.max_frames:
        params["max_frames"] = int(s.max_frames)
    paths = [footage]
    if s.depth_filepath:
        depth = bpy.path.abspath(s.depth_filepath)
        params["depth"] = {"model": "file", "path": depth, "kind": s.depth_kind}
        paths.append(depth)
    else:
        pref = props.prefs(context)
        params["depth"] = {
            "model": pref.depth_model if pref else "depthcrafter",
            "device": pref.device if pref else "auto",
        }
    from .depth_tools import adjust_params

    if adjust_params(context.scene):  # the depth tools' scale/offset/clip, applied by the backend
        params["depth"]["adjust"] = adjust_params(context.scene)
    return params, paths


def submit(context, type_: str, params: dict, paths: list[str] = ()) -> tuple[BackendClient, Request]:
    """Submit a request (starting the backend if needed); returns at once."""
    client = get_client(context, list(paths))
    return client, client.submit(type_, params)


def run_blocking(context, type_: str, params: dict, paths: list[str] = (), timeout: float | None = None) -> dict:
    """Submit and wait for the result (scripts, tests). Raises BackendError. Operators use ``runner``."""
    client = get_client(context, list(paths))
    req = client.submit(type_, params)
    client.wait(req, timeout)
    return req.raise_for_error()


def needs_hello(client: BackendClient) -> bool:
    """True when this backend process has not answered a hello yet (its protocol is not checked)."""
    return not (client.running and client.pid == _hello_pid)


def error_text(err: dict | BackendError) -> str:
    """One line for a Blender report: message, hint, and the code."""
    if isinstance(err, BackendError):
        err = {"code": err.code, "message": err.message, "hint": err.hint}
    text = f"EX-4D: {err.get('message', 'error')}"
    if err.get("hint"):
        text += f" -- {err['hint']}"
    return text + f" [{err.get('code', 'internal')}]"


def store_path(path: str) -> str:
    """A result path as given by the backend, checked to exist."""
    if not Path(path).exists():
        raise BackendError("not_found", f"the backend's result is missing: {path}")
    return path
