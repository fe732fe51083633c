"""The ``ex4d serve`` wire protocol: one JSON object per line on stdin (requests) and stdout (events).

Every message is validated against the JSON schemas below, in both directions. Large data (frames,
depth, meshes) travels as file paths, never inline. ``PROTOCOL.md`` documents the same content for
humans; ``PROTOCOL_VERSION`` changes its major number on any incompatible change.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import jsonschema
import numpy as np

from .. import viewport_proxy
from ..errors import (
    BAD_INPUT,
    CANCELLED,
    DEVICE,
    DISK_FULL,
    INTERNAL,
    IO_ERROR,
    MODEL_INVALID,
    MODEL_MISSING,
    NOT_FOUND,
)

PROTOCOL_VERSION = "2.0"  # 2.0: render_guide returns the H.264 videos only with "videos": true
MAX_LINE_BYTES = 4 * 1024 * 1024  # a request longer than this is refused (large data goes by path)
MAX_DEPTH = 32  # deepest nesting of arrays/objects a request may have (the schemas need 8)

# Stable error codes of the protocol (never rename one). The first group comes from ``errors.py``.
BAD_JSON = "bad_json"  # the line is not one JSON object (or holds NaN / Infinity / a huge line)
UNKNOWN_TYPE = "unknown_type"  # the request's ``type`` is not one of REQUEST_TYPES
INVALID_REQUEST = "invalid_request"  # fields missing, of the wrong type or out of range
FORBIDDEN_PATH = "forbidden_path"  # a path outside the allowed folders
DUPLICATE_ID = "duplicate_id"  # the id of a request that is still queued or running
BACKEND_DIED = "backend_died"  # client side: the backend process exited during the request
TIMEOUT = "timeout"  # client side: no answer within the time limit
ERROR_CODES = (
    BAD_INPUT,
    NOT_FOUND,
    MODEL_MISSING,
    MODEL_INVALID,
    DEVICE,
    CANCELLED,
    DISK_FULL,
    IO_ERROR,
    INTERNAL,
    BAD_JSON,
    UNKNOWN_TYPE,
    INVALID_REQUEST,
    FORBIDDEN_PATH,
    DUPLICATE_ID,
    BACKEND_DIED,
    TIMEOUT,
)

PRESETS = ("30", "60", "90", "180", "zoom_in", "zoom_out")
MESH_FILTERS = ("angle", "boundary")
GENERATORS = ("ex4d", "preview")
RENDERERS = ("auto", "cpu", "cuda")

# Requests answered at once by the reader (never queued) vs jobs run by the single GPU worker.
CONTROL_TYPES = ("hello", "cancel", "shutdown", "jobs")
LIGHT_TYPES = (
    "probe_footage",
    "store_info",
    "store_clean",
)  # cheap, CPU only: run beside the GPU job, never wait behind it
JOB_TYPES = ("estimate_depth", "build_dwmesh", "camera_preset", "render_guide", "generate", "meter")
REQUEST_TYPES = CONTROL_TYPES + LIGHT_TYPES + JOB_TYPES
EVENT_TYPES = ("queued", "started", "progress", "log", "result", "error")

# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------
_ID = {"type": "string", "minLength": 1, "maxLength": 128}
_PATH = {"type": "string", "minLength": 1, "maxLength": 4096}
_NUM = {"type": "number", "minimum": -1e9, "maximum": 1e9}
_POS = {"type": "number", "exclusiveMinimum": 0, "maximum": 1e6}
_FOCAL_PX = {"type": "number", "minimum": 1, "maximum": 1e6}  # pixels at the processing resolution
_LENS = {"type": "number", "minimum": 0.1, "maximum": 1e5}  # mm (Blender's lens is >= 1 mm)
_SENSOR = {"type": "number", "minimum": 0.1, "maximum": 1e4}  # mm
_ROW4 = {"type": "array", "items": _NUM, "minItems": 4, "maxItems": 4}
_MAT4 = {"type": "array", "items": _ROW4, "minItems": 4, "maxItems": 4}
_ROW3 = {"type": "array", "items": _NUM, "minItems": 3, "maxItems": 3}
_MAT3 = {"type": "array", "items": _ROW3, "minItems": 3, "maxItems": 3}
_MAX_CAMERA_FRAMES = 10000

CLIP = {
    "footage": _PATH,
    "max_frames": {"type": "integer", "minimum": 0, "maximum": 100000},
    "max_side": {"type": "integer", "minimum": 16, "maximum": 2048},  # = footage.MAX_PROCESSING_SIDE
    "fps": {"anyOf": [{"type": "null"}, {"type": "number", "exclusiveMinimum": 0, "maximum": 1000}]},
}
_OPT_POS = {"anyOf": [{"type": "null"}, _POS]}
DEPTH_ADJUST = {
    "type": "object",
    "properties": {
        "scale": _POS,
        "offset": {"type": "number", "minimum": -1e4, "maximum": 1e4},
        "near": _OPT_POS,
        "far": _OPT_POS,
    },
    "additionalProperties": False,
}
DEPTH = {
    "type": "object",
    "properties": {
        "model": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
        "path": _PATH,
        "kind": {"enum": ["depth", "disparity"]},
        "repair": {"type": "boolean"},
        "scale": _POS,
        "device": {"type": "string", "pattern": "^(auto|cpu|cuda(:[0-9]{1,2})?)$"},
        "options": {"type": "object", "maxProperties": 32},
        "adjust": DEPTH_ADJUST,  # depth' = clip(scale * depth + offset, near, far) (ex4d_backend.depth_adjust)
    },
    "required": ["model"],
    "additionalProperties": False,
    "if": {"properties": {"model": {"const": "file"}}},
    "then": {"required": ["path"]},
}
INTRINSICS = {
    "focal_px": _FOCAL_PX,  # default 500 (the reference) at the processing resolution
    "lens": _LENS,  # alternatively: the source camera's lens in mm ...
    "sensor_width": _SENSOR,  # ... on this sensor width in mm (default 36)
    "sensor_height": _SENSOR,  # ... (used with sensor_fit VERTICAL; default 24)
    "sensor_fit": {"enum": ["AUTO", "HORIZONTAL", "VERTICAL"]},  # Blender's; default HORIZONTAL
}
MESH = {
    "mesh_filter": {"enum": list(MESH_FILTERS)},
    "border_depth": _POS,
}
_SHIFT_1 = {"type": "number", "minimum": -100, "maximum": 100}
_SHIFT = {"anyOf": [_SHIFT_1, {"type": "array", "items": _SHIFT_1, "minItems": 1, "maxItems": _MAX_CAMERA_FRAMES}]}
BLENDER_CAMERA = {
    "type": "object",
    "properties": {
        "matrix_world": {"type": "array", "items": _MAT4, "minItems": 1, "maxItems": _MAX_CAMERA_FRAMES},
        "lens": {"anyOf": [_LENS, {"type": "array", "items": _LENS, "minItems": 1, "maxItems": _MAX_CAMERA_FRAMES}]},
        "sensor_width": _SENSOR,
        "sensor_height": _SENSOR,
        "sensor_fit": {"enum": ["AUTO", "HORIZONTAL", "VERTICAL"]},
        "shift_x": _SHIFT,  # one value, or one per matrix (an animated lens shift)
        "shift_y": _SHIFT,
        "resolution": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 16384},
            "minItems": 2,
            "maxItems": 2,
        },
    },
    "required": ["matrix_world", "lens"],
    "additionalProperties": False,
}
OPENCV_CAMERA = {
    "type": "object",
    "properties": {
        "extrinsics": {"type": "array", "items": _MAT4, "minItems": 1, "maxItems": _MAX_CAMERA_FRAMES},
        "intrinsics": {
            "anyOf": [_MAT3, {"type": "array", "items": _MAT3, "minItems": 1, "maxItems": _MAX_CAMERA_FRAMES}]
        },
    },
    "required": ["extrinsics"],
    "additionalProperties": False,
}
CAMERA = {
    "type": "object",
    "properties": {
        "preset": {"enum": list(PRESETS)},
        "blender": BLENDER_CAMERA,
        "opencv": OPENCV_CAMERA,
        "file": _PATH,
        "lock_off": {"type": "integer", "minimum": 0, "maximum": _MAX_CAMERA_FRAMES},  # hold source frame N
        "stabilize": {"type": "number", "minimum": 0, "maximum": 60},  # the source path smoothed, seconds
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
    },
    "minProperties": 1,
    "maxProperties": 2,
    "additionalProperties": False,
    "oneOf": [
        {"required": ["preset"]},
        {"required": ["blender"]},
        {"required": ["opencv"]},
        {"required": ["file"]},
        {"required": ["lock_off"]},
        {"required": ["stabilize"]},
    ],
}
SOURCE_CAMERA = {  # the camera that filmed the footage, per frame, in the novel camera's world (issue 15)
    "type": "object",
    "properties": {"blender": BLENDER_CAMERA, "opencv": OPENCV_CAMERA, "file": _PATH},
    "minProperties": 1,
    "maxProperties": 1,
    "additionalProperties": False,
}
_BUNDLE = {
    "type": "object",
    "properties": {
        "co": {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 3},
        "frames": {"type": "array", "items": {"type": "integer", "minimum": 0}, "maxItems": _MAX_CAMERA_FRAMES},
        "uv": {"type": "array", "items": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}},
    },
    "required": ["co", "frames"],
    "additionalProperties": False,
}
DEPTH_SCALE = {  # depth units -> world units: a number, or the camera solve's bundles to fit it to
    "anyOf": [
        {"type": "number", "exclusiveMinimum": 0, "maximum": 1e9},
        {
            "type": "object",
            "properties": {
                "bundles": {"type": "array", "items": _BUNDLE, "minItems": 1, "maxItems": 100000},
                "file": _PATH,
                "convention": {"enum": ["opencv", "blender"]},
                "per_frame": {"type": "boolean"},
            },
            "oneOf": [{"required": ["bundles"]}, {"required": ["file"]}],
            "additionalProperties": False,
        },
    ]
}
SOURCE = {"source_camera": SOURCE_CAMERA, "depth_scale": DEPTH_SCALE}
RENDER = {
    "renderer": {"enum": list(RENDERERS)},
    "use_dwmesh": {"type": "boolean"},
}
_NULL_OR_SIDE = {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 16, "maximum": 4096, "multipleOf": 16}]}
GENERATE = {
    "generator": {"enum": list(GENERATORS)},
    "steps": {"type": "integer", "minimum": 1, "maximum": 1000},
    "cfg": {"type": "number", "minimum": 0, "maximum": 100},
    "shift": {"type": "number", "minimum": 0, "maximum": 100},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
    "prompt": {"type": "string", "maxLength": 10000},
    "negative_prompt": {"type": "string", "maxLength": 10000},
    "height": _NULL_OR_SIDE,  # null: from ``size``
    "width": _NULL_OR_SIDE,
    "num_frames": {"type": "integer", "minimum": 5, "maximum": 1001},  # the window, 4k + 1 (checked by the job)
    "size": {"type": "string", "pattern": "^(auto|[0-9]{2,4}x[0-9]{2,4})$"},  # "auto": the guide's aspect
    "chain_variant": {"enum": ["given", "i2v", "guide"]},  # generation.windows.CHAIN_VARIANTS
    "overlap": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 1, "maximum": 500}]},
    "frame_sampling": {"enum": ["windows", "reference"]},  # generation.windows.FRAME_SAMPLINGS
    "resize": {"enum": ["crop", "stretch"]},  # generation.conditioning.RESIZE_MODES
    "upto_window": {"type": "integer", "minimum": 0, "maximum": 100000},  # a farm step: windows 0..k only
    "vram_profile": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,32}$"},
    "device": {"type": "string", "pattern": "^(auto|cpu|cuda(:[0-9]{1,2})?)$"},
}
STEREO = {  # issue 18: Blender's camera.data.stereo, sent raw (ex4d_backend.stereo does the maths)
    "stereo": {
        "type": "object",
        "properties": {
            "interocular": {"type": "number", "minimum": 0, "maximum": 1e6},
            "convergence": _POS,
            "mode": {"enum": ["OFFAXIS", "PARALLEL", "TOE"]},
            "pivot": {"enum": ["CENTER", "LEFT", "RIGHT"]},
            "second_eye": {"enum": ["independent", "reuse_first"]},  # generate: right conditioned on left
        },
        "required": ["interocular"],
        "additionalProperties": False,
    },
    "exr": {"type": "boolean"},  # also the EXR passes (colour, mask as A, the novel view's Z)
}
EYE = {"eye": {"enum": ["left", "right"]}}  # generate: only this eye of ``stereo``
# build_dwmesh only: the add-on's viewport proxy (viewport_proxy.py); the backend's own rendering never uses it
VIEWPORT = {
    "viewport_detail": {"enum": list(viewport_proxy.DETAILS)},
    "viewport_stride": {"type": "integer", "minimum": 1, "maximum": viewport_proxy.MAX_STRIDE},
}
COMMON = {"force": {"type": "boolean"}}  # recompute this job's own result even if it is in the store


def _params(props: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


PARAMS: dict[str, dict] = {
    "hello": _params({}, []),
    "cancel": _params({"target": _ID}, []),
    "shutdown": _params({}, []),
    "jobs": _params({}, []),
    "store_info": _params({}, []),
    "store_clean": _params(
        {
            "older_than_days": {"type": "number", "minimum": 0, "maximum": 1e5},
            "max_size_gb": {"type": "number", "minimum": 0, "maximum": 1e6},
            "dry_run": {"type": "boolean"},
        },
        [],
    ),
    "probe_footage": _params({"footage": _PATH, "max_side": CLIP["max_side"], **INTRINSICS}, ["footage"]),
    "estimate_depth": _params({**CLIP, "depth": DEPTH, **COMMON}, ["footage", "depth"]),
    "build_dwmesh": _params(
        {**CLIP, "depth": DEPTH, **INTRINSICS, **MESH, **SOURCE, **VIEWPORT, **COMMON},
        ["footage", "depth"],
    ),
    "camera_preset": _params(
        {
            **CLIP,
            "depth": DEPTH,
            **INTRINSICS,
            **MESH,
            "preset": {"enum": list(PRESETS)},
            "sensor_width": _SENSOR,
            **SOURCE,
        },
        ["footage", "depth", "preset"],
    ),
    "render_guide": _params(
        {
            **CLIP,
            "depth": DEPTH,
            **INTRINSICS,
            **MESH,
            **RENDER,
            "camera": CAMERA,
            "videos": {"type": "boolean"},  # also color_mp4 / mask_mp4 (H.264 videos of the guide)
            **SOURCE,
            **STEREO,
            **COMMON,
        },  # fmt: skip
        ["footage", "depth", "camera"],
    ),
    "generate": _params(
        {
            **CLIP,
            "depth": DEPTH,
            **INTRINSICS,
            **MESH,
            **RENDER,
            "camera": CAMERA,
            **SOURCE,
            **GENERATE,
            **STEREO,
            **EYE,
            **COMMON,
        },  # fmt: skip
        ["footage", "depth", "camera"],
    ),
    "meter": _params(  # the disocclusion meter: render_guide's inputs, a low-resolution mask pass (meter_job.py)
        {
            **CLIP,
            "depth": DEPTH,
            **INTRINSICS,
            **MESH,
            "renderer": RENDER["renderer"],
            "camera": CAMERA,
            **SOURCE,
            **COMMON,
        },
        ["footage", "depth", "camera"],
    ),
}

REQUEST = {
    "type": "object",
    "properties": {
        "id": _ID,
        "type": {"type": "string", "maxLength": 64},
        "params": {"type": "object"},
        "protocol": {"type": "string", "maxLength": 16},
    },
    "required": ["id", "type"],
    "additionalProperties": False,
}

_ERROR_BODY = {
    "type": "object",
    "properties": {
        "code": {"enum": list(ERROR_CODES)},
        "message": {"type": "string"},
        "where": {"type": ["string", "null"]},
        "hint": {"type": ["string", "null"]},
        "log_tail": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["code", "message", "hint"],
}
EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": ["string", "null"]},
        "event": {"enum": list(EVENT_TYPES)},
        "time": {"type": "number"},
    },
    "required": ["id", "event"],
    "allOf": [
        {
            "if": {"properties": {"event": {"const": "queued"}}},
            "then": {"properties": {"position": {"type": "integer", "minimum": 1}}, "required": ["position"]},
        },
        {
            "if": {"properties": {"event": {"const": "progress"}}},
            "then": {
                "properties": {
                    "stage": {"type": "string"},
                    "step": {"type": "integer", "minimum": 0},
                    "total": {"type": "integer", "minimum": 0},
                    "message": {"type": "string"},
                },
                "required": ["stage", "step", "total", "message"],
            },
        },
        {
            "if": {"properties": {"event": {"const": "log"}}},
            "then": {
                "properties": {"level": {"enum": ["debug", "info", "warning", "error"]}, "message": {"type": "string"}},
                "required": ["level", "message"],
            },
        },
        {
            "if": {"properties": {"event": {"const": "result"}}},
            "then": {"properties": {"result": {"type": "object"}}, "required": ["result"]},
        },
        {
            "if": {"properties": {"event": {"const": "error"}}},
            "then": {"properties": {"error": _ERROR_BODY}, "required": ["error"]},
        },
    ],
}


def _is_integer(checker, instance) -> bool:
    """JSON Schema's "integer" accepts 3.0; the code behind the schema needs a real int (``range``,
    indexing), so an integer field must be written without a fraction or exponent."""
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer),
)
_REQUEST_VALIDATOR = _Validator(REQUEST)
_EVENT_VALIDATOR = _Validator(EVENT)
_PARAM_VALIDATORS = {name: _Validator(s) for name, s in PARAMS.items()}
for _schema in (REQUEST, EVENT, *PARAMS.values()):
    jsonschema.Draft202012Validator.check_schema(_schema)


class ProtocolError(Exception):
    """A request that cannot be served; carries the stable ``code`` and the request id if known."""

    def __init__(self, code: str, message: str, *, hint: str | None = None, where: str | None = None, id=None):
        super().__init__(message)
        self.code, self.message, self.hint, self.where, self.id = code, message, hint, where, id

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "where": self.where, "hint": self.hint}


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed (JSON numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def loads_strict(line: str | bytes) -> Any:
    """``json.loads`` that refuses NaN, Infinity and numbers that overflow to infinity."""
    return json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)


def _lenient_id(line: str | bytes) -> str | None:
    """The id of a line that is JSON except for its numbers (NaN, Infinity, 1e999, 5000 digits), so its
    error reaches its request."""
    try:  # numbers are irrelevant here: read them as 0 (no NaN, overflow or digit-limit errors)
        msg = json.loads(line, parse_int=lambda _: 0, parse_float=lambda _: 0.0, parse_constant=lambda _: 0)
    except (ValueError, RecursionError):
        return None
    rid = msg.get("id") if isinstance(msg, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_RAW_ID = re.compile(rb'"id"\s*:\s*"((?:[^"\\]|\\.){1,128})"')


def nesting_depth(line: str | bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text (strings ignored), in one vectorised pass."""
    data = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line
    bare = np.frombuffer(_STRING.sub(b'""', data), np.uint8)
    step = (bare == ord("[")).astype(np.int32) + (bare == ord("{")) - (bare == ord("]")) - (bare == ord("}"))
    return int(np.cumsum(step).max(initial=0))


def _raw_id(line: str | bytes) -> str | None:
    """The request id of a line too deep to parse (first ``"id": "..."``), so its error reaches its request."""
    data = line.encode("utf-8", "surrogatepass") if isinstance(line, str) else line
    m = _RAW_ID.search(data)
    if not m:
        return None
    try:
        rid = json.loads(b'"' + m.group(1) + b'"')
    except ValueError:
        return None
    return rid if isinstance(rid, str) and 0 < len(rid) <= 128 else None


def _has_lone_surrogate(obj: Any, depth: int = 0) -> bool:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(obj, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_lone_surrogate(v, depth + 1) for v in obj)
    return False


def parse_request(line: str | bytes) -> dict:
    """Parse and validate one request line; raise :class:`ProtocolError` with a stable code."""
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(
            BAD_JSON, f"the request line is longer than {MAX_LINE_BYTES} bytes", hint="pass large data as file paths"
        )
    depth = nesting_depth(line)
    if depth > MAX_DEPTH:
        raise ProtocolError(
            INVALID_REQUEST,
            f"the request is nested {depth} levels deep; at most {MAX_DEPTH} are allowed",
            hint="see PROTOCOL.md for the fields of each request",
            id=_raw_id(line),
        )
    try:
        msg = loads_strict(line)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(
            BAD_JSON,
            f"the line is not valid JSON: {str(exc)[:200]}",
            hint="send one JSON object per line, UTF-8, without NaN or Infinity",
            id=_lenient_id(line),
        ) from None
    if not isinstance(msg, dict):
        raise ProtocolError(BAD_JSON, "a request must be a JSON object", hint='send {"id": ..., "type": ...}')
    rid = msg.get("id") if isinstance(msg.get("id"), str) and 0 < len(msg["id"]) <= 128 else None
    if _has_lone_surrogate(msg):
        raise ProtocolError(
            INVALID_REQUEST,
            "the request holds a string with a lone UTF-16 surrogate (not valid Unicode)",
            hint="send valid Unicode text (file names: as the operating system spells them)",
            id=rid,
        )
    _check(_REQUEST_VALIDATOR, msg, rid, "request")
    if msg["type"] not in PARAMS:
        raise ProtocolError(
            UNKNOWN_TYPE,
            f"unknown request type '{msg['type'][:64]}'",
            hint=f"known types: {', '.join(REQUEST_TYPES)}",
            id=rid,
        )
    params = msg.get("params") or {}
    _check(_PARAM_VALIDATORS[msg["type"]], params, rid, "params")
    return {"id": msg["id"], "type": msg["type"], "params": params}


def validate_params(type_: str, params: dict) -> None:
    """Validate a job definition's params (used by ``ex4d run``)."""
    if type_ not in PARAMS:
        raise ProtocolError(
            UNKNOWN_TYPE, f"unknown request type '{str(type_)[:64]}'", hint=f"known types: {', '.join(REQUEST_TYPES)}"
        )
    _check(_PARAM_VALIDATORS[type_], params, None, "params")


def _check(validator: jsonschema.protocols.Validator, obj: Any, rid: str | None, what: str) -> None:
    error = jsonschema.exceptions.best_match(validator.iter_errors(obj))
    if error is None:
        return
    where = what + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    raise ProtocolError(
        INVALID_REQUEST,
        f"{where}: {error.message[:300]}",
        where=where,
        hint="see PROTOCOL.md for the fields of each request",
        id=rid,
    )


def validate_event(event: dict) -> None:
    """Raise ``jsonschema.ValidationError`` if an outgoing event breaks the protocol (a bug)."""
    _EVENT_VALIDATOR.validate(event)


def dumps(obj: dict) -> str:
    """One protocol line (no NaN allowed, compact, ASCII-safe)."""
    return json.dumps(obj, allow_nan=False, separators=(",", ":"), ensure_ascii=True)
