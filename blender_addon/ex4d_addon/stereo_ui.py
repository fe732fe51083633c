"""Stereo / VR and compositing results in Blender (issue 18), as an extension of the guide and generate jobs.

``extend(context, job)`` (called by ``ops_jobs.guide_job`` / ``generate_job``):

1. with stereoscopy on (``scene.render.use_multiview``, views format STEREO_3D) adds ``stereo`` to the
   request: the novel camera's ``data.stereo`` values sent RAW (interocular, convergence distance, mode,
   pivot; the backend does Blender's eye maths, ``ex4d_backend.stereo``); with ``ex4d_job.export_exr``
   adds ``exr: true``;
2. wraps the job's result handler: after the usual one (the centre guide / the left eye's result as the
   main strip) it copies the per-eye sequences (``<dest>/left``, ``<dest>/right``), the side-by-side
   (``<dest>/sbs``) and the EXR passes (``<dest>/exr``, ``<dest>/<eye>/exr``: R, G, B, A = the guide mask,
   Z = the novel view's depth from the DW-mesh) next to the result, adds per-eye strips (muted) and one
   multiview strip (side by side, ``views_format 'STEREO_3D'``) in the results scene
   (``results_scene.target``), and shows a generated result as the novel camera's background image.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import bpy

from . import backend, data, outputs, results_scene, sampling, strips

STEREO_GUIDE_KIND, STEREO_RESULT_KIND = "guide_stereo", "generate_stereo"


def stereo_params(scene: bpy.types.Scene, cam_obj) -> dict | None:
    """The ``stereo`` request field of ``cam_obj`` when the scene renders stereo 3D, else None."""
    r = scene.render
    if not (r.use_multiview and r.views_format == "STEREO_3D") or cam_obj is None or cam_obj.type != "CAMERA":
        return None
    st = cam_obj.data.stereo
    return {
        "interocular": float(st.interocular_distance),
        "convergence": float(st.convergence_distance),
        "mode": st.convergence_mode,
        "pivot": st.pivot,
    }


def extend(context, job):
    """Add stereo / EXR to a guide or generate ``job`` (see the module docstring); returns ``job``."""
    scene = context.scene
    stereo = stereo_params(scene, sampling.novel_camera(context))
    if stereo is not None:
        job.params["stereo"] = stereo
        if job.type == "generate" and scene.ex4d_job.stereo_second_eye != "independent":
            stereo["second_eye"] = scene.ex4d_job.stereo_second_eye
    if scene.ex4d_job.export_exr:
        job.params["exr"] = True
    if stereo is None and not job.params.get("exr") and job.type != "generate":
        return job
    inner = job.finish_fn
    job.finish_fn = lambda j, result: _finish(j, result, inner)
    return job


def _finish(job, result: dict, inner):
    out = inner(job, result)
    text = (yield from out) if inspect.isgenerator(out) else out
    if job.type == "render_guide":
        note = yield from _guide_extras(job, result)
    else:
        note = yield from _generate_extras(job, result)
    return text + note


def _copy(folder: str, dest: Path, first_frame: int, idx: list[int] | None = None, *, exr: bool = False):
    """Copy a backend result folder's frames (PNG, or EXR with ``exr``) to ``dest`` as scene frames,
    retimed by ``idx`` (``outputs.retime_indices``) when given."""
    files = _exrs(folder) if exr else data.sorted_images(backend.store_path(folder))
    if idx is not None:
        files = [files[min(j, len(files) - 1)] for j in idx]
    return (yield from outputs.copy_sequence(files, dest, first_frame))


def _exrs(folder: str) -> list[Path]:
    return sorted(Path(backend.store_path(folder)).glob("frame_*.exr"))


def _add(target, scene, name: str, files, settings: dict, *, mute: bool = False, multiview: bool = False):
    strip = strips.add_image_strip(target, name, files, scene.frame_start, settings)
    if target == scene:
        results_scene.place(scene, strip)
    if multiview:
        results_scene.make_multiview(strip)
    strip.mute = mute
    return strip


def _remove(target, **props) -> None:
    col = strips.compat.vse_strips(target)
    for st in strips.strips_where(target, **props):
        col.remove(st)


def _guide_extras(job, result: dict):
    scene, x = job.scene, job.extra
    n = int(result["n_frames"])
    dest = x["out_dir"] / f"guide_{result['camera_hash'][:10]}"
    cam, notes = x["camera_name"], []
    if result.get("exr_dir"):
        yield from _copy(result["exr_dir"], dest / "exr", scene.frame_start, exr=True)
        notes.append(f"EXR passes in {dest / 'exr'}")
    if "eyes" not in result:
        return " -- " + "; ".join(notes) if notes else ""
    target = results_scene.target(scene)
    _remove(target, kind=STEREO_GUIDE_KIND, camera=cam)
    base = {"kind": STEREO_GUIDE_KIND, "camera": cam, "camera_hash": result["camera_hash"],
            "stereo": result.get("stereo", {})}  # fmt: skip
    for eye in ("left", "right"):
        files = yield from _copy(result[f"{eye}_color_dir"], dest / eye / "color", scene.frame_start)
        yield from _copy(result[f"{eye}_mask_dir"], dest / eye / "mask", scene.frame_start)
        if result["eyes"][eye].get("exr_dir"):
            yield from _copy(result["eyes"][eye]["exr_dir"], dest / eye / "exr", scene.frame_start, exr=True)
        _add(target, scene, f"EX4D Guide {cam} {eye}", files[:n], {**base, "eye": eye}, mute=True)
        yield
    sbs = yield from _copy(result["sbs_dir"], dest / "sbs", scene.frame_start)
    _add(target, scene, f"EX4D Guide {cam} stereo", sbs[:n], {**base, "eye": "multiview"}, multiview=True)
    if target != scene:
        results_scene.use_stereo_views(target)
    notes.append(f"both eyes in {dest / 'left'} and {dest / 'right'}, side by side in {dest / 'sbs'}")
    return " -- " + "; ".join(notes)


def _generate_extras(job, result: dict):
    scene, x = job.scene, job.extra
    target = results_scene.strips_scene(scene)
    main = next((s for s in strips.compat.vse_strips_all(target) if s.name == x.get("strip_name")), None)
    if main is None:
        return ""
    dest = Path(strips.strip_folder(main))
    idx = outputs.retime_indices(result.get("source_frames") or [], x["n_frames"])
    notes = []
    cam = bpy.data.objects.get(x["camera_name"])
    if cam is not None:  # compositing: the result behind CG through the camera
        image = strips.load_sequence_image(data.sorted_images(dest), f"EX4D Result {x['camera_name']}")
        results_scene.show_result_on_camera(cam, image, scene.frame_start, x["n_frames"])
    if result.get("exr_dir") and not (dest / "exr").is_dir():
        yield from _copy(result["exr_dir"], dest / "exr", scene.frame_start, idx, exr=True)
        notes.append(f"EXR passes in {dest / 'exr'}")
    if (
        "eyes" in result
        and result.get("right_frames_dir")
        and not strips.strips_where(target, kind=STEREO_RESULT_KIND, version_dir=str(dest))
    ):
        main["ex4d_eye"] = "left"
        base = {"kind": STEREO_RESULT_KIND, "camera": x["camera_name"], "version_dir": str(dest),
                "stereo": json.dumps(job.params.get("stereo", {}))}  # fmt: skip
        right = yield from _copy(result["right_frames_dir"], dest / "right", scene.frame_start, idx)
        if result.get("right_exr_dir"):
            yield from _copy(result["right_exr_dir"], dest / "right" / "exr", scene.frame_start, idx, exr=True)
        _add(target, scene, f"EX4D {dest.name} right", right, {**base, "eye": "right"}, mute=True)
        sbs = yield from _copy(result["sbs_dir"], dest / "sbs", scene.frame_start, idx)
        _add(target, scene, f"EX4D {dest.name} stereo", sbs, {**base, "eye": "multiview"}, multiview=True)
        if target != scene:
            results_scene.use_stereo_views(target)
        notes.append(f"the right eye in {dest / 'right'}, side by side in {dest / 'sbs'}")
    return " -- " + "; ".join(notes) if notes else ""


def draw_settings(layout, context) -> None:
    """The compositing and stereo settings (a panel's draw: no file I/O, no backend calls)."""
    scene, js = context.scene, context.scene.ex4d_job
    layout.prop(js, "results_in")
    if js.results_in == "CHANNEL":
        layout.prop(js, "results_channel")
    layout.prop(js, "export_exr")
    r = scene.render
    if r.use_multiview and r.views_format == "STEREO_3D":
        cam = scene.ex4d.novel_camera
        st = cam.data.stereo if cam is not None and cam.type == "CAMERA" else None
        text = (
            f"Stereo 3D: both eyes ({st.convergence_mode.lower()}, {st.interocular_distance:g} apart)"
            if st is not None
            else "Stereo 3D: choose a novel camera"
        )
        layout.label(text=text, icon="CAMERA_STEREO", translate=False)
        layout.prop(js, "stereo_second_eye")
