"""Job store housekeeping: last-use stamps, sizes per stage and per shot, least-recently-used cleaning.

Every use of a stage result (computed or reused) touches ``<store>/usage/<stage>-<key>`` (its mtime is
the last use; an entry without a stamp counts from its ``meta.json``). ``clean`` removes whole entries,
least recently used first, and never one that

- a live process holds (``JobStore.is_held(stage, key)``: its per-stage lock), or
- a running job may be reading: used at or after the start of a job whose state is ``running`` and whose
  process is alive.

Sizes are the sum of the files' sizes (``st_size``), as ``du --apparent-size`` counts them.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

STAGES = ("frames", "depth", "mesh", "camera", "guide", "guide_videos", "generate")
USAGE = "usage"


def _usage_file(store, stage: str, key: str) -> Path:
    return Path(store.root) / USAGE / f"{stage}-{key}"


def touch(store, stage: str, key: str) -> None:
    """Record a use of the ``stage``/``key`` entry now."""
    f = _usage_file(store, stage, key)
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.touch()
        os.utime(f)
    except OSError:  # a read-only store still serves
        pass


def tree_size(path: Path) -> int:
    """Bytes of every regular file under ``path`` (or of the file), not following links."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size
    return total


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    size: int
    last_used: float
    shot: str | None

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "key": self.key,
            "path": str(self.path),
            "size": self.size,
            "last_used": self.last_used,
            "shot": self.shot,
        }


def entries(store) -> list[Entry]:
    """Every complete stage entry of the store (folders with ``meta.json``)."""
    from ..service.jobstore import META, read_json

    out = []
    cache = Path(store.root) / "cache"
    for d in sorted(cache.iterdir()) if cache.is_dir() else []:
        if d.name.startswith(".") or not d.is_dir() or "-" not in d.name:
            continue
        stage, key = d.name.split("-", 1)
        meta_file = d / META
        if not meta_file.is_file():
            continue
        meta = read_json(meta_file) or {}
        usage = _usage_file(store, stage, key)
        last = usage.stat().st_mtime if usage.exists() else meta_file.stat().st_mtime
        shot = key if stage == "frames" else meta.get("shot")
        out.append(Entry(stage, key, d, tree_size(d), last, shot))
    return out


def info(store) -> dict:
    """Sizes of the store: total, per stage, per shot (the footage it came from), and the jobs folder."""
    es = entries(store)
    footage = {e.key: None for e in es if e.stage == "frames"}
    from ..service.jobstore import META, read_json

    for e in es:
        if e.stage == "frames":
            footage[e.key] = (read_json(e.path / META) or {}).get("footage")
    stages = {s: {"entries": 0, "size": 0} for s in STAGES}
    shots: dict[str, dict] = {}
    for e in es:
        st = stages.setdefault(e.stage, {"entries": 0, "size": 0})
        st["entries"] += 1
        st["size"] += e.size
        sid = e.shot or "unknown"
        shot = shots.setdefault(
            sid, {"shot": sid, "footage": footage.get(sid), "size": 0, "stages": {}, "last_used": 0}
        )
        shot["size"] += e.size
        shot["stages"][e.stage] = shot["stages"].get(e.stage, 0) + e.size
        shot["last_used"] = max(shot["last_used"], e.last_used)
    jobs = tree_size(Path(store.root) / "jobs") if (Path(store.root) / "jobs").exists() else 0
    cache_size = sum(e.size for e in es)
    return {
        "store": str(store.root),
        "size": cache_size + jobs,
        "cache_size": cache_size,
        "jobs_size": jobs,
        "stages": stages,
        "shots": sorted(shots.values(), key=lambda s: -s["last_used"]),
        "entries": len(es),
    }


def _protected_since(store) -> float | None:
    """Start time of the oldest running job of a live process (entries used since then are protected)."""
    from ..service.jobstore import _pid_alive, read_json

    oldest = None
    for state_file in (Path(store.root) / "jobs").glob("*/state.json"):
        state = read_json(state_file) or {}
        if state.get("state") in ("running", "queued") and _pid_alive(state.get("pid")):
            started = float(state.get("updated") or state.get("created") or 0.0)
            started = min(started, float(state.get("created") or started))
            oldest = started if oldest is None else min(oldest, started)
    return oldest


def _held(store, e: Entry) -> bool:
    return store.is_held(e.stage, e.key)


def clean(
    store, *, older_than_days: float | None = None, max_size_bytes: int | None = None, dry_run: bool = False
) -> dict:
    """Remove stage entries: every entry unused for more than ``older_than_days``, then, least recently used
    first, until the cache is at most ``max_size_bytes``. Neither given: remove every entry that may go.
    Returns what was removed and kept back."""
    now = time.time()
    es = sorted(entries(store), key=lambda e: e.last_used)
    guard = _protected_since(store)
    removable, kept_back = [], []
    for e in es:
        if _held(store, e) or (guard is not None and e.last_used >= guard - 1.0):
            kept_back.append(e)
        else:
            removable.append(e)
    doomed: list[Entry] = []
    if older_than_days is None and max_size_bytes is None:
        doomed = list(removable)
    else:
        if older_than_days is not None:
            doomed = [e for e in removable if now - e.last_used > older_than_days * 86400.0]
        if max_size_bytes is not None:
            size = sum(e.size for e in es) - sum(e.size for e in doomed)
            for e in removable:  # least recently used first
                if size <= max_size_bytes:
                    break
                if e not in doomed:
                    doomed.append(e)
                    size -= e.size
    removed = []
    for e in doomed:
        if not dry_run and not _remove_entry(store, e):  # taken since the listing
            kept_back.append(e)
            continue
        removed.append(e)
    return {
        "removed": [e.to_dict() for e in removed],
        "removed_size": sum(e.size for e in removed),
        "kept_back": [e.to_dict() for e in kept_back],
        "dry_run": dry_run,
        **{k: v for k, v in info(store).items() if k in ("size", "cache_size")},
    }


def _remove_entry(store, e: Entry) -> bool:
    """Move the entry aside under the stage's commit lock (it vanishes whole, never racing a commit), then
    delete it and its stamp. False when it was taken (locked) meanwhile."""
    import uuid

    from ..service.jobstore import COMMIT

    aside = e.path.with_name(f".{e.path.name}.corrupt-clean{uuid.uuid4().hex[:8]}")
    with store.stage_lock(COMMIT, e.path.name):
        if _held(store, e):
            return False
        try:
            os.rename(e.path, aside)
        except OSError:
            return False
    shutil.rmtree(aside, ignore_errors=True)
    _usage_file(store, e.stage, e.key).unlink(missing_ok=True)
    return True


# ----------------------------------------------------------------------------------------------
# The size limit (a setting of the store: <store>/store_settings.json {"max_size_gb": ...})
# ----------------------------------------------------------------------------------------------
SETTINGS = "store_settings.json"


def get_limit_gb(store) -> float | None:
    """The store's size limit in GB (1e9 bytes), or None (no limit)."""
    from ..service.jobstore import read_json

    value = (read_json(Path(store.root) / SETTINGS) or {}).get("max_size_gb")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def set_limit_gb(store, gb: float | None) -> None:
    """Set (or with None / 0 remove) the store's size limit; every finished job then cleans down to it."""
    from ..service.jobstore import write_json

    write_json(Path(store.root) / SETTINGS, {"max_size_gb": float(gb) if gb else None})


def enforce_limit(store) -> dict | None:
    """Clean least-recently-used entries down to the store's limit, if it has one and is over it."""
    gb = get_limit_gb(store)
    if gb is None:
        return None
    limit = int(gb * 1e9)
    if sum(e.size for e in entries(store)) <= limit:
        return None
    return clean(store, max_size_bytes=limit)
