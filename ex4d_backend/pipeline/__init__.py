"""The stage pipeline every entry point runs: frames, depth, mesh, camera, guide, generate.

- ``settings``: one dataclass per stage (defaults from ``constants``);
- ``camera``: camera specs -> checked camera paths (one set of checks for CLI and service);
- ``guide``: the one guide-rendering path (chunking, CUDA pinned double-buffering, frame-0 rule);
- ``stages``: the cached stages in the job store (content-hash keys, per-stage locks, atomic writes);
- ``housekeeping``: store size per stage and shot, least-recently-used cleaning.
"""
