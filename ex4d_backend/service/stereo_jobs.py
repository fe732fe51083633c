"""The stereo and EXR parts of ``render_guide`` and ``generate`` (issue 18), called by ``service.jobs``.

Result fields (PROTOCOL.md "Stereo and EXR"): per eye ``<eye>_color_dir``, ``<eye>_mask_dir``,
``<eye>_color_mp4``, ``<eye>_mask_mp4`` (with ``videos``), ``<eye>_camera_npz`` (flat, so the store checks them on reuse) and
``eyes: {left: {...}, right: {...}}`` with the same fields unprefixed plus ``camera_hash`` and
``masked_share``; ``sbs_dir`` / ``sbs_mp4`` (left | right); ``exr_dir`` (and ``<eye>_exr_dir``) with
``exr: true``.
"""

from __future__ import annotations

from ..pipeline import stages
from ..pipeline.settings import GenerateSettings, RenderSettings
from ..pipeline.stereo_stage import (
    EYES,
    StereoSettings,
    check_eye,
    exr_stage,
    eye_guides,
    reuse_first_eye,
    sbs_stage,
)


def guide_fields(ctx: stages.Context, guide: stages.GuideEntry, videos: bool = False) -> dict:
    """The result fields of a guide entry (render_guide's, and each eye's); with ``videos`` also its two
    H.264 videos (``stages.guide_videos_stage``: made on first request)."""
    d = guide.dir
    out = {
        "color_dir": str(d / "color"),
        "mask_dir": str(d / "mask"),
        "camera_npz": str(d / "camera.npz"),
        "camera_hash": guide.meta["camera_hash"],
        "masked_share": guide.meta.get("masked_share", []),
    }
    if videos:
        v = stages.guide_videos_stage(ctx, guide).dir
        out.update(color_mp4=str(v / "color.mp4"), mask_mp4=str(v / "mask.mp4"))
    return out


def _flat(eyes: dict[str, dict]) -> dict:
    """``<eye>_<field>`` for every path field of each eye (the store checks those on reuse)."""
    return {f"{eye}_{k}": v for eye, f in eyes.items() for k, v in f.items() if k.endswith(("_dir", "_mp4", "_npz"))}


def guide_extras(ctx: stages.Context, p: dict, shot: stages.Shot) -> dict:
    """What ``stereo`` and ``exr`` add to a ``render_guide`` result (``shot``: its centre camera's)."""
    render = RenderSettings.from_params(p)
    out: dict = {}
    if p.get("exr"):
        out["exr_dir"] = str(exr_stage(ctx, shot, shot.camera, shot.guide, render).dir / "exr")
    s = StereoSettings.from_params(p)
    if s is None:
        return out
    eyes = eye_guides(ctx, shot, s, render)
    fields = {eye: guide_fields(ctx, e.guide, bool(p.get("videos"))) for eye, e in eyes.items()}
    if p.get("exr"):
        for eye, e in eyes.items():
            fields[eye]["exr_dir"] = str(exr_stage(ctx, shot, e.camera, e.guide, render).dir / "exr")
    l_, r_ = eyes["left"].guide, eyes["right"].guide
    sbs = sbs_stage(ctx, "guide", l_.dir / "color", r_.dir / "color", (l_.key, r_.key), shot.clip.fps)
    out.update(_flat(fields), eyes=fields, sbs_dir=str(sbs.dir / "frames"), sbs_mp4=str(sbs.dir / "video.mp4"))
    out["stereo"] = {"interocular": s.interocular, "convergence": s.convergence, "mode": s.mode, "pivot": s.pivot}
    return out


def exec_generate(ctx: stages.Context, p: dict, shot: stages.Shot, payload) -> dict:
    """``generate`` with ``stereo`` (and/or ``exr``): ``eye`` given: that eye's generation (its fields at
    the top level); else both eyes (the left eye's at the top level, ``eyes`` and the side-by-side).
    ``payload(gen, guide)``: the plain generate result fields (``service.jobs``)."""
    from ..pipeline.guide_files import read_png_folder

    eye = check_eye(p)
    s = StereoSettings.from_params(p)
    render = RenderSettings.from_params(p)
    gs = GenerateSettings.from_params(p)
    if s is None:
        targets = {"centre": (shot.camera, shot.guide)}
    else:
        eyes = eye_guides(ctx, shot, s, render)
        targets = {e: (eyes[e].camera, eyes[e].guide) for e in ([eye] if eye else EYES)}
    reuse = s is not None and s.second_eye == "reuse_first" and "right" in targets
    fields = {}
    gens = {}
    for name, (cam, guide) in targets.items():
        if reuse and name == "right":  # the right eye conditioned on the left eye's result
            left = gens.get("left") or stages.generate_stage(ctx, shot.clip, eyes["left"].guide, gs)
            guide = reuse_first_eye(ctx, shot, eyes["left"], left, eyes["right"], render)
        gen = stages.generate_stage(ctx, shot.clip, guide, gs)
        gens[name] = gen
        fields[name] = payload(gen, guide)
        if p.get("exr"):
            frames = read_png_folder(gen.dir / "frames", 3)
            fields[name]["exr_dir"] = str(exr_stage(ctx, shot, cam, guide, render, (gen, frames)).dir / "exr")
    if s is None:
        return fields["centre"]
    first = eye or "left"
    out = {**fields[first], "eye": first if eye else None}
    if eye is None:
        lg, rg = gens["left"], gens["right"]
        sbs = sbs_stage(ctx, "generate", lg.dir / "frames", rg.dir / "frames", (lg.key, rg.key), shot.clip.fps)
        out.update(_flat(fields), eyes=fields, sbs_dir=str(sbs.dir / "frames"), sbs_mp4=str(sbs.dir / "video.mp4"))
    else:
        out["eyes"] = fields
    if out["eye"] is None:
        del out["eye"]
    return out
