"""``ex4d serve``: the job protocol the Blender add-on drives (see ``ex4d_backend/PROTOCOL.md``).

Modules: ``protocol`` (message schemas, version), ``jobstore`` (content-keyed job folders, atomic
results, the rotating log), ``jobs`` (job definitions calling the backend APIs), ``server`` (the
stdin/stdout loop with one GPU worker).
"""
