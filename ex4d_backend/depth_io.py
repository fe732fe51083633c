"""Depth input from files: depth or disparity videos, validated and resampled to the footage.

Accepted: ``.npy`` / ``.npz`` arrays of shape (T, H, W) (npz key ``depth``, ``disparity`` or the only
array), or a folder of per-frame EXR (float: the Z pass, ``read_exr_depth``; else Y/R) or 16-bit PNG files.
``kind="depth"``: values are distances along the optical axis (z), in scene units, multiplied by
``scale`` (e.g. 0.001 for millimetre PNGs). ``kind="disparity"``: any affine-invariant disparity (like
DepthCrafter's output); it is min-max normalised over the clip and mapped to depth exactly like the
reference (:func:`disparity_to_depth`).
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import NOT_FOUND, Ex4dError

DEPTH_MIN, DEPTH_MAX = 1e-4, 1e4  # the reference's clip range


def disparity_to_depth(disparity: np.ndarray) -> np.ndarray:
    """The reference mapping: d = minmax(disparity) over the clip; depth = 10000 / (3900 * max(d, 1e-5/3900)),
    clipped to [1e-4, 1e4]. The nearest surface ends up about 2.56 units away."""
    d = np.asarray(disparity, dtype=np.float64)
    lo, hi = float(d.min()), float(d.max())
    d = (d - lo) / (hi - lo) if hi > lo else np.ones_like(d)
    depth = 10000.0 / (3900.0 * np.maximum(d, 1e-5 / 3900.0))
    return np.clip(depth, DEPTH_MIN, DEPTH_MAX).astype(np.float32)


MAX_DEPTH_BYTES = 16 << 30  # a depth array larger than this is refused before it is read


def _check_npy_header(fh, available: int, where: str) -> None:
    """Refuse an ``.npy`` whose header claims more data than the file holds (or than MAX_DEPTH_BYTES),
    before anything is allocated; leaves ``fh`` at the start."""
    start = fh.tell()
    try:
        version = np.lib.format.read_magic(fh)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:  # 3.0 (utf-8 field names) has no public reader; numpy writes 1.0/2.0
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        shape, _, dtype = readers[version](fh, max_header_size=10000)  # public API (numpy 1.26 .. 2.x)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise Ex4dError(f"cannot read the depth file: {exc}", where=where, hint="the file is corrupt") from None
    header = fh.tell() - start
    fh.seek(start)
    if dtype.hasobject:
        raise Ex4dError("the depth file holds Python objects, not numbers", where=where)
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if need > MAX_DEPTH_BYTES or need > available - header:
        raise Ex4dError(
            f"the depth file's header claims shape {tuple(shape)} ({need} bytes) but the file holds "
            f"{available - header} bytes of data",
            where=where,
            hint="the file is truncated or corrupt",
        )


def _read_array_file(p: Path) -> np.ndarray:
    from . import safe_io

    where = str(p)
    try:
        with safe_io.open_regular(p, "depth file") as fh:
            size = os.fstat(fh.fileno()).st_size
            if p.suffix.lower() == ".npy":
                _check_npy_header(fh, size, where)
                return np.load(fh, allow_pickle=False)
            with zipfile.ZipFile(fh) as zf:
                members = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
                for key in ("depth", "disparity", "arr_0"):
                    if key in members:
                        break
                else:
                    if len(members) != 1:
                        raise Ex4dError(
                            f"the npz holds several arrays ({', '.join(members)}) and none is named 'depth' or "
                            "'disparity'"
                            if members
                            else "the npz holds no array",
                            where=where,
                        )
                    key = next(iter(members))
                info = members[key]
                with zf.open(info) as member:
                    head = member.read(10240)
                _check_npy_header(io.BytesIO(head), info.file_size, where)
                with zf.open(info) as member:
                    return np.lib.format.read_array(member, allow_pickle=False)
    except Ex4dError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise Ex4dError(f"cannot read the depth file: {exc}", where=where, hint="the file is corrupt") from None


def _read_frame_folder(folder: Path) -> np.ndarray:
    import cv2

    from . import safe_io
    from .footage import _natural_key, decode_image

    folder = safe_io.check_folder(folder, "depth folder")

    files = sorted(
        (f for f in folder.iterdir() if f.suffix.lower() in (".exr", ".png") and not f.name.startswith(".")),
        key=lambda f: _natural_key(f.name),
    )
    if not files:
        raise Ex4dError("the depth folder holds no EXR or PNG frames", where=str(folder))
    frames = []
    for f in files:
        if f.suffix.lower() == ".exr":
            arr = read_exr_depth(f)  # the Z pass, also in an RGBA(Z) render
        else:
            arr = decode_image(f, cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise Ex4dError("cannot read the depth frame", where=str(f), hint="the file is corrupt")
            if arr.ndim == 3:
                arr = arr[..., 0]
            if arr.dtype != np.uint16:
                raise Ex4dError(
                    f"depth PNGs must be 16-bit single-channel, got {arr.dtype}",
                    where=str(f),
                    hint="8-bit PNGs lose too much precision; save 16-bit PNG or EXR",
                )
        frames.append(arr.astype(np.float32))
    if len({f.shape for f in frames}) != 1:
        raise Ex4dError("the depth frames differ in size", where=str(folder))
    return np.stack(frames)


def read_depth_file(path: str | os.PathLike) -> np.ndarray:
    """Raw (T, H, W) float32 values of a depth/disparity file or folder, unvalidated."""
    p = Path(path)
    if not p.exists():
        raise Ex4dError("depth file not found", where=str(p), code=NOT_FOUND)
    arr = _read_frame_folder(p) if p.is_dir() else _read_array_file(p)
    arr = np.asarray(arr)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise Ex4dError(f"depth must have shape (T, H, W), got {arr.shape}", where=str(p))
    if not np.issubdtype(arr.dtype, np.number):
        raise Ex4dError(f"depth must be numeric, got {arr.dtype}", where=str(p))
    return arr.astype(np.float32, copy=False)  # a fresh array already (read or stacked): never copied again


def validate_depth(arr: np.ndarray, kind: str, where: str, repair: bool = False) -> np.ndarray:
    """Reject (or, with ``repair``, fill from valid neighbours) NaN, inf and, for depth, values <= 0."""
    lo, hi = arr.min(initial=np.inf), arr.max(initial=-np.inf)  # NaN propagates: two passes, no masks
    if np.isfinite(lo) and np.isfinite(hi) and (kind != "depth" or lo > 0) or arr.size == 0:
        return arr
    bad = ~np.isfinite(arr)
    if kind == "depth":
        bad |= ~(arr > 0)
    if not bad.any():
        return arr
    frames = np.flatnonzero(bad.reshape(len(arr), -1).any(axis=1))
    what = "NaN/inf" + (" or non-positive" if kind == "depth" else "")
    if not repair:
        raise Ex4dError(
            f"{int(bad.sum())} {what} depth values in {len(frames)} frame(s) (first: frame {int(frames[0])})",
            where=where,
            hint="fix the depth, or pass --repair-depth to fill them from neighbouring valid pixels",
        )
    import cv2

    out = arr.copy()
    for t in frames:
        valid = ~bad[t]
        if not valid.any():
            raise Ex4dError(f"depth frame {int(t)} has no valid value to repair from", where=where)
        frame = np.where(valid, out[t], 0.0).astype(np.float32)
        lo, hi = float(frame[valid].min()), float(frame[valid].max())
        scale = (hi - lo) or 1.0
        norm = ((frame - lo) / scale).astype(np.float32)
        filled = cv2.inpaint(norm, bad[t].astype(np.uint8), 3, cv2.INPAINT_TELEA)
        out[t] = np.where(valid, out[t], filled * scale + lo)
    return out


def resample_depth(arr: np.ndarray, size: tuple[int, int], where: str) -> np.ndarray:
    """Resize (T, h, w) to ``size`` = (W, H). Aspect ratios must agree within 2 %."""
    t, h, w = arr.shape
    width, height = size
    if (w, h) == (width, height):
        return arr
    if abs((w / h) / (width / height) - 1.0) > 0.02:
        raise Ex4dError(
            f"depth is {w}x{h} but the footage is {width}x{height} (different aspect ratio)",
            where=where,
            hint="give depth computed on this footage (any resolution with the same aspect ratio)",
        )
    import cv2

    interp = cv2.INTER_AREA if w > width else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f, (width, height), interpolation=interp) for f in arr]).astype(np.float32)


def load_depth(
    path: str | os.PathLike,
    *,
    kind: str = "depth",
    size: tuple[int, int] | None = None,
    n_frames: int | None = None,
    total_frames: int | None = None,
    repair: bool = False,
    scale: float = 1.0,
) -> np.ndarray:
    """Depth (T, H, W) float32 in scene units at ``size`` = (W, H), for the first ``n_frames`` frames.

    The file must have ``n_frames`` frames, or ``total_frames`` (the whole footage, of which the first
    ``n_frames`` are used).
    """
    if kind not in ("depth", "disparity"):
        raise Ex4dError(f"unknown depth kind '{kind}'", where="--depth-kind", hint="use depth or disparity")
    where = str(path)
    arr = read_depth_file(path)
    if n_frames is not None:
        ok = {n_frames} | ({total_frames} if total_frames else set())
        if len(arr) not in ok:
            raise Ex4dError(
                f"depth has {len(arr)} frames but the footage has {total_frames or n_frames}"
                + (f" ({n_frames} used)" if total_frames and total_frames != n_frames else ""),
                where=where,
                hint="give one depth frame per footage frame",
            )
        arr = arr[:n_frames]
    arr = validate_depth(arr, kind, where, repair)
    if size is not None:
        arr = resample_depth(arr, size, where)
    if kind == "disparity":
        if not len(arr) or float(arr.max()) == float(arr.min()):
            raise Ex4dError(
                f"the disparity is the same value ({float(arr.max()) if len(arr) else 0}) everywhere: it holds no depth",
                where=where,
                hint="check the disparity file (an all-zero file is a failed export)",
            )
        return disparity_to_depth(arr)
    if not (np.isfinite(scale) and scale > 0):
        raise Ex4dError(f"depth scale must be positive, got {scale}", where="--depth-scale")
    if scale == 1.0 and float(arr.min()) >= DEPTH_MIN and float(arr.max()) <= DEPTH_MAX:
        return arr.astype(np.float32, copy=False)  # x * 1 = x and nothing to clip: the same values, no copy
    return np.clip(arr * np.float32(scale), DEPTH_MIN, DEPTH_MAX).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# EXR Z passes (a CG plate's render, another depth tool): the Z channel even where RGBA is present
# ----------------------------------------------------------------------------------------------
def exr_depth_channel(names) -> str | None:
    """The Z pass among an EXR's channel names: ``Z``, then a layer's ``*.Z`` (Blender's multilayer
    ``ViewLayer.Depth.Z``), then ``depth`` / ``*.depth.V`` / ``*.Depth.V``; None if there is none."""
    names = list(names)
    for pick in (
        lambda n: n == "Z",
        lambda n: n.endswith(".Z"),
        lambda n: n.lower() in ("depth", "depth.v", "depth.z") or n.lower().endswith((".depth.v", ".depth")),
    ):
        hits = sorted(n for n in names if pick(n))
        if hits:
            return hits[0]
    return None


def read_exr_depth(path: Path) -> np.ndarray:
    """(H, W) float32 of one EXR depth frame: its Z pass (``exr_depth_channel``) if it has one, else the single
    channel ``footage.read_exr`` picks (Y, R, ...). Z is the distance along the optical axis, as Blender's
    Z pass; Blender writes 1e10 where nothing was hit, which the reference range clips to 1e4 (``far``
    clips it nearer: ``depth_adjust``)."""
    import tempfile

    import OpenEXR

    from . import safe_io
    from .footage import _Sizer, read_exr

    def read(name: str):
        with OpenEXR.File(name, header_only=True) as f:
            header = f.header()
        box = header.get("dataWindow")
        if box is not None:
            (x0, y0), (x1, y1) = np.asarray(box[0]).tolist(), np.asarray(box[1]).tolist()
            _Sizer(None, str(path)).check_source(x1 - x0 + 1, y1 - y0 + 1)
        with OpenEXR.File(name, separate_channels=True) as f:
            channels = f.channels()
            pick = exr_depth_channel(channels)
            return None if pick is None else np.asarray(channels[pick].pixels, dtype=np.float32)

    try:
        if safe_io.current_roots() is None:
            with safe_io.open_regular(path, "EXR file"):  # a regular file (a FIFO would block OpenEXR)
                pass
            z = read(str(path))
        else:
            with tempfile.NamedTemporaryFile(suffix=".exr") as tmp:
                tmp.write(safe_io.read_bytes(path, "EXR file"))
                tmp.flush()
                z = read(tmp.name)
    except Ex4dError:
        raise
    except Exception as exc:  # OpenEXR raises plain exceptions for corrupt files
        raise Ex4dError(f"cannot read the EXR file: {exc}", where=str(path), hint="the file is corrupt") from None
    if z is None:
        z = read_exr(path)
        z = z if z.ndim == 2 else z[..., 0]
    return z
