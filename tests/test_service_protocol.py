"""Malformed input to ``ex4d serve``: every bad line gets an ``error`` event with a stable code and the
service keeps serving. One long-lived subprocess for the listed cases plus a random smoke; a
hypothesis fuzz over request shapes against the in-process request handler."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import random
import time

import pytest
import service_fixtures as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ex4d_backend.service import jobstore, protocol
from ex4d_backend.service.server import Server

I4 = [[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("proto")
    clip = sf.make_clip(root / "data", n_frames=5)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "depth.npy").write_bytes((clip.root / "depth.npy").read_bytes())
    os.symlink(outside / "depth.npy", clip.root / "link.npy")  # inside the allowed folder, points out
    seq = clip.root / "linked_seq"  # a sequence folder inside whose frames point outside
    seq.mkdir()
    for f in sorted(clip.footage.iterdir()):
        (outside / f.name).write_bytes(f.read_bytes())
        os.symlink(outside / f.name, seq / f.name)
    client = sf.start_client(root / "store", [clip.root])
    assert client.request("hello", timeout=120)["protocol"]
    yield clip, client, root / "store", outside
    client.close()


def _final(client, rid: str | None, timeout: float = 60.0) -> dict:
    """The next final event (``result`` / ``error``) whose id is ``rid`` (``None``: unparsable lines)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in client.poll():
            if event.get("id") == rid and event.get("event") in ("result", "error"):
                return event
        time.sleep(0.02)
    raise AssertionError(f"no final event for {rid}: {client.stderr_tail(5)}")


def _still_serving(client) -> None:
    assert client.request("hello", timeout=60)["protocol"] == protocol.PROTOCOL_VERSION


def _req(rid: str, type_: str, params: dict) -> str:
    return json.dumps({"id": rid, "type": type_, "params": params})


def _job(clip, **over) -> dict:
    return {**clip.params(), **over}


def _cam(matrix) -> dict:
    return {"camera": {"blender": {"matrix_world": [matrix] * 5, "lens": 50.0}}}


# name -> (line builder (clip, outside) -> line, request id in the error or None, code, where contains)
CASES = {
    "not_json": (lambda c, o: "this is not json", None, "bad_json", None),
    "truncated": (lambda c, o: '{"id": "t1", "type": "hello"', None, "bad_json", None),
    "array": (lambda c, o: "[1, 2, 3]", None, "bad_json", None),
    "not_utf8": (lambda c, o: b'{"id": "u1", "type": "\xff\xfe"}', None, "bad_json", None),
    "unknown_type": (lambda c, o: _req("x1", "frobnicate", {}), "x1", "unknown_type", None),
    "missing_type": (lambda c, o: '{"id": "x2"}', "x2", "invalid_request", "request"),
    "missing_id": (lambda c, o: '{"type": "hello"}', None, "invalid_request", "request"),
    "id_not_string": (lambda c, o: '{"id": 7, "type": "hello"}', None, "invalid_request", "request.id"),
    "params_not_object": (lambda c, o: '{"id": "x3", "type": "hello", "params": [1]}', "x3", "invalid_request", None),
    "unknown_field": (lambda c, o: _req("x4", "build_dwmesh", _job(c, colour="red")), "x4", "invalid_request", None),
    "missing_footage": (
        lambda c, o: _req("x5", "build_dwmesh", {"depth": {"model": "file", "path": "d.npy"}}),
        "x5",
        "invalid_request",
        "params",
    ),
    "wrong_type": (
        lambda c, o: _req("x6", "build_dwmesh", _job(c, max_frames="ten")),
        "x6",
        "invalid_request",
        "params.max_frames",
    ),
    "bool_for_int": (
        lambda c, o: _req("x7", "render_guide", _job(c, camera={"preset": "90"}, max_side=True)),
        "x7",
        "invalid_request",
        "params.max_side",
    ),
    "bad_preset": (
        lambda c, o: _req("x8", "render_guide", _job(c, camera={"preset": "45"})),
        "x8",
        "invalid_request",
        "params.camera",
    ),
    "missing_path": (
        lambda c, o: _req("p1", "build_dwmesh", _job(c, footage=str(c.root / "nope"))),
        "p1",
        "not_found",
        "nope",
    ),
    "missing_depth": (
        lambda c, o: _req("p2", "build_dwmesh", _job(c, depth={"model": "file", "path": str(c.root / "no.npy")})),
        "p2",
        "not_found",
        "no.npy",
    ),
    "footage_outside": (
        lambda c, o: _req("p3", "build_dwmesh", _job(c, footage="/etc")),
        "p3",
        "forbidden_path",
        "/etc",
    ),
    "depth_outside": (
        lambda c, o: _req("p4", "build_dwmesh", _job(c, depth={"model": "file", "path": str(o / "depth.npy")})),
        "p4",
        "forbidden_path",
        "depth.npy",
    ),
    "symlink_out": (
        lambda c, o: _req("p5", "build_dwmesh", _job(c, depth={"model": "file", "path": str(c.root / "link.npy")})),
        "p5",
        "forbidden_path",
        "link.npy",
    ),
    "sequence_frames_out": (
        lambda c, o: _req("p8", "build_dwmesh", _job(c, footage=str(c.root / "linked_seq"))),
        "p8",
        "forbidden_path",
        "linked_seq",
    ),
    "dotdot_out": (
        lambda c, o: _req("p6", "build_dwmesh", _job(c, footage=str(c.root / ".." / ".." / ".."))),
        "p6",
        "forbidden_path",
        None,
    ),
    "camera_file_outside": (
        lambda c, o: _req("p7", "render_guide", _job(c, camera={"file": "/etc/hostname"})),
        "p7",
        "forbidden_path",
        "/etc/hostname",
    ),
    "huge_int": (
        lambda c, o: _req("h1", "build_dwmesh", _job(c, max_side=10**30)),
        "h1",
        "invalid_request",
        "params.max_side",
    ),
    "huge_float": (lambda c, o: _req("h2", "build_dwmesh", _job(c, focal_px=1e300)), "h2", "invalid_request", None),
    "overflow_float": (
        lambda c, o: '{"id": "h3", "type": "build_dwmesh", "params": {"focal_px": 1e999}}',
        "h3",
        "bad_json",
        None,
    ),
    "giant_int_literal": (
        lambda c, o: '{"id": "h4", "type": "hello", "params": {"x": ' + "9" * 5000 + "}}",
        "h4",
        "bad_json",
        None,
    ),
    "huge_matrix_value": (
        lambda c, o: _req("h5", "render_guide", _job(c, **_cam([[1e300, 0, 0, 0], *I4[1:]]))),
        "h5",
        "invalid_request",
        "params.camera",
    ),
    "deep_nesting": (
        lambda c, o: '{"id": "h6", "type": "hello", "params": ' + "[" * 100000 + "]" * 100000 + "}",
        "h6",  # refused before parsing (protocol.MAX_DEPTH), the id kept (issue 17 item 7)
        "invalid_request",
        None,
    ),
    "nan_in_camera": (
        lambda c, o: _req("n1", "render_guide", _job(c, **_cam([[float("nan"), 0, 0, 0], *I4[1:]]))),
        "n1",
        "bad_json",
        None,
    ),
    "infinity_in_camera": (
        lambda c, o: _req("n2", "render_guide", _job(c, **_cam([[float("inf"), 0, 0, 0], *I4[1:]]))),
        "n2",
        "bad_json",
        None,
    ),
    "singular_camera": (
        lambda c, o: _req("n3", "render_guide", _job(c, **_cam([[0.0] * 4] * 3 + [[0, 0, 0, 1.0]]))),
        "n3",
        "bad_input",
        "params.camera",
    ),
    "sheared_camera": (
        lambda c, o: _req("n4", "render_guide", _job(c, **_cam([[1.0, 0.5, 0, 0], *I4[1:]]))),
        "n4",
        "bad_input",
        "params.camera",
    ),
    "too_few_cameras": (
        lambda c, o: _req("n5", "render_guide", _job(c, camera={"opencv": {"extrinsics": [I4] * 2}})),
        "n5",
        "bad_input",
        "params.camera",
    ),
    "lens_count": (
        lambda c, o: _req(
            "n6", "render_guide", _job(c, camera={"blender": {"matrix_world": [I4] * 5, "lens": [50.0, 40.0]}})
        ),
        "n6",
        "bad_input",
        "params.camera.blender.lens",
    ),
    "zero_fps": (
        lambda c, o: _req(
            "d1", "build_dwmesh", _job(c, max_frames=0, depth={"model": "file", "path": str(c.depth_path)}, fps=0.0)
        ),
        "d1",
        "invalid_request",
        "params.fps",
    ),
    "unknown_depth_model": (
        lambda c, o: _req("d2", "estimate_depth", {"footage": str(c.footage), "depth": {"model": "nope"}}),
        "d2",
        "bad_input",
        None,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_request_gets_stable_error(svc, name):
    clip, client, store, outside = svc
    build, rid, code, where = CASES[name]
    line = build(clip, outside)
    client.send_raw(line)
    event = _final(client, rid)
    assert event["event"] == "error", event
    err = event["error"]
    assert err["code"] == code, err
    assert err["code"] in protocol.ERROR_CODES and err["message"]
    if where is not None:
        assert where in (err.get("where") or "") + err["message"], err
    assert err["log_tail"], "every error carries the last log lines"
    _still_serving(client)


def test_error_log_tail_comes_from_the_rotating_log(svc):
    clip, client, store, outside = svc
    client.send_raw(_req("lg1", "frobnicate", {}))
    err = _final(client, "lg1")["error"]
    log_file = store / "logs" / jobstore.LOG_NAME
    text = log_file.read_text()
    assert "frobnicate" in err["log_tail"][-1] and "frobnicate" in text
    # The tail is the last lines of the log file (up to the error itself).
    lines = text.splitlines()
    assert err["log_tail"][-3:] == [x[:300] for x in lines if x in err["log_tail"][-3:]][-3:]
    assert all(x in lines for x in err["log_tail"])
    handler = jobstore.JobStore(store, [clip.root]).log_handler()
    try:
        assert isinstance(handler, logging.handlers.RotatingFileHandler)
        assert handler.maxBytes == jobstore.LOG_MAX_BYTES and handler.backupCount == jobstore.LOG_BACKUPS
    finally:
        handler.close()


def test_log_file_rotates(tmp_path, monkeypatch):
    monkeypatch.setattr(jobstore, "LOG_MAX_BYTES", 2000)
    store = jobstore.JobStore(tmp_path / "store", [tmp_path])
    logger = logging.getLogger("ex4d_backend.test_rotation")
    handler = store.log_handler()
    logger.addHandler(handler)
    try:
        for i in range(200):
            logger.warning("line %04d %s", i, "x" * 60)
    finally:
        logger.removeHandler(handler)
        handler.close()
    logs = sorted(p.name for p in (tmp_path / "store" / "logs").iterdir())
    assert logs == ["service.log", "service.log.1", "service.log.2", "service.log.3"]
    assert "line 0199" in (tmp_path / "store" / "logs" / "service.log").read_text()
    assert all(p.stat().st_size <= 2200 for p in (tmp_path / "store" / "logs").iterdir())


def test_cancel_unknown_and_duplicate_free_ids(svc):
    clip, client, store, outside = svc
    assert client.request("cancel", {"target": "never-sent"}, timeout=30) == {
        "target": "never-sent",
        "state": "unknown",
    }
    assert client.request("cancel", {}, timeout=30)["state"] == "unknown"
    jobs = client.request("jobs", timeout=30)["jobs"]
    assert all(j["state"] in ("done", "failed", "cancelled", "interrupted", "running") for j in jobs)


def test_random_garbage_smoke(svc):
    """Random mutations of valid requests, sent back to back: one final event per line, then hello."""
    clip, client, store, outside = svc
    rng = random.Random(5)
    base = [
        {"type": "hello", "params": {}},
        {"type": "build_dwmesh", "params": _job(clip, footage=str(clip.root / "missing"))},
        {"type": "render_guide", "params": _job(clip, footage="/nonexistent/x", camera={"preset": "30"})},
    ]
    values = [None, -1, 0, 1e308, "x" * 300, [], {}, True, 2**70, "../../etc/passwd"]
    ids = []
    for i in range(40):
        msg = json.loads(json.dumps(rng.choice(base)))
        rid = f"g{i}"
        msg["id"] = rid
        target = msg if rng.random() < 0.3 else msg["params"]
        key = rng.choice([*target.keys(), "extra"]) if target else "extra"
        if key != "id":
            target[key] = rng.choice(values)
        line = json.dumps(msg)
        if rng.random() < 0.2:
            line = line[: rng.randrange(1, len(line))]  # cut short: not JSON
            rid = None
        ids.append(rid)
        client.send_raw(line)
    finals = []
    deadline = time.monotonic() + 60
    while len(finals) < len(ids) and time.monotonic() < deadline:
        finals += [e for e in client.poll() if e["event"] in ("result", "error")]
        time.sleep(0.02)
    assert len(finals) == len(ids), (len(finals), client.stderr_tail(5))
    assert all(e["event"] == "result" or e["error"]["code"] in protocol.ERROR_CODES for e in finals)
    assert sorted(str(e["id"]) for e in finals) == sorted(str(i) for i in ids)
    assert not any(e["event"] == "error" and e["error"]["code"] == "internal" for e in finals)
    _still_serving(client)


# ----------------------------------------------------------------------------------------------
# In-process fuzz of the request handler (no workers: jobs stay queued, nothing runs)
# ----------------------------------------------------------------------------------------------
FIELDS = sorted({k for schema in protocol.PARAMS.values() for k in schema["properties"]})
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["/etc/passwd", "../x", "", "preset", "file", "90", "cpu"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
request_shape = st.fixed_dictionaries(
    {},
    optional={
        "id": st.one_of(st.text(min_size=1, max_size=10), json_leaf, st.text(min_size=129, max_size=130)),
        "type": st.one_of(st.sampled_from(protocol.REQUEST_TYPES), st.text(max_size=12), json_leaf),
        "params": st.one_of(st.dictionaries(st.sampled_from(FIELDS), json_value, max_size=6), json_value),
        "protocol": st.one_of(st.just("1.0"), json_leaf),
        "junk": json_value,
    },
)
VALID = [
    {"type": "hello", "params": {}},
    {"type": "jobs", "params": {}},
    {"type": "cancel", "params": {"target": "zzz"}},
    {"type": "build_dwmesh", "params": {"footage": "/f", "depth": {"model": "file", "path": "/d.npy"}}},
    {
        "type": "render_guide",
        "params": {"footage": "/f", "depth": {"model": "depthcrafter"}, "camera": {"preset": "90"}},
    },
    {
        "type": "generate",
        "params": {
            "footage": "/f",
            "depth": {"model": "file", "path": "/d"},
            "camera": {"opencv": {"extrinsics": [I4]}},
        },
    },
]


@st.composite
def mutated_valid(draw) -> str:
    """A valid request, then maybe one field of its params (or of a nested object) replaced or added."""
    msg = json.loads(json.dumps(draw(st.sampled_from(VALID))))
    msg["id"] = draw(st.text(min_size=1, max_size=8))
    if draw(st.booleans()):
        target = msg["params"]
        nested = [v for v in target.values() if isinstance(v, dict)]
        if nested and draw(st.booleans()):
            target = draw(st.sampled_from(nested))
        key = draw(st.sampled_from(sorted(target) + FIELDS[:5]) if target else st.sampled_from(FIELDS))
        target[key] = draw(json_value)
    return json.dumps(msg, allow_nan=True)


line_strategy = st.one_of(
    mutated_valid(),
    request_shape.map(lambda m: json.dumps(m, allow_nan=True)),
    json_value.map(lambda v: json.dumps(v, allow_nan=True)),
    st.binary(max_size=60),
)


class _FuzzServer(Server):
    def __init__(self, store):
        self.out = io.BytesIO()
        super().__init__(store, io.BytesIO(), self.out)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return _FuzzServer(jobstore.JobStore(root / "store", [root]))


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(line=line_strategy)
def test_fuzz_request_shapes(fuzz_server, line):
    server = fuzz_server
    server.out.seek(0)
    server.out.truncate()
    server._queue.clear()
    server._light_ids.clear()
    raw = line.encode() if isinstance(line, str) else line
    if not raw.strip():
        return
    try:
        parsed = protocol.parse_request(raw.decode("utf-8"))
        expected = None
    except protocol.ProtocolError as exc:
        parsed, expected = None, exc
    except UnicodeDecodeError:
        parsed, expected = None, protocol.ProtocolError(protocol.BAD_JSON, "not utf-8")
    server._handle(raw.strip())  # must never raise
    events = [json.loads(x) for x in server.out.getvalue().decode().splitlines()]
    for event in events:
        protocol.validate_event(event)  # every event the service sends is valid protocol
    errors = [e for e in events if e["event"] == "error"]
    if expected is not None:
        assert len(errors) == 1 and errors[0]["error"]["code"] == expected.code
        assert errors[0]["id"] == expected.id
        assert errors[0]["error"]["code"] in protocol.ERROR_CODES
    else:
        assert not errors, errors  # a valid request is accepted (jobs queue up; control ones answer)
        if parsed["type"] in protocol.JOB_TYPES:
            assert [t.id for t in server._queue] == [parsed["id"]]
        elif parsed["type"] in ("cancel", "jobs"):
            assert [e["event"] for e in events] == ["result"] and events[0]["id"] == parsed["id"]


class _Lines:
    """A thread-safe stdout stand-in collecting event lines."""

    def __init__(self):
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def flush(self) -> None:
        pass

    def events(self) -> list[dict]:
        return [json.loads(x) for x in self.data.decode().splitlines()]


def test_worker_survives_crashing_jobs_and_invalid_results(tmp_path, monkeypatch):
    """Regression: a job raising a non-Ex4dError, or returning a result that is not valid protocol (NaN),
    used to kill the GPU worker so every later job hung. Now: an ``internal`` error, and the next job runs."""
    from ex4d_backend.service import jobs as jobs_module

    outcomes = iter([RuntimeError("boom"), {"value": float("nan")}, {"ok": 1}])

    def fake_run_job(type_, params, ctx):
        ctx.progress("mesh", 0, 1, "working")
        time.sleep(0.3)  # j0 is still running when its id is reused
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(jobs_module, "run_job", fake_run_job)
    r, w = os.pipe()
    out = _Lines()
    server = Server(jobstore.JobStore(tmp_path / "store", [tmp_path]), os.fdopen(r, "rb"), out)
    params = {"footage": "x", "depth": {"model": "file", "path": "y"}}
    lines = [_req(f"j{i}", "build_dwmesh", params) for i in range(3)]
    lines.insert(1, _req("j0", "hello", {}))  # while j0 is queued or running: its id is taken
    import threading

    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    with os.fdopen(w, "wb") as stdin:
        stdin.write(("\n".join(lines) + "\n").encode())
        stdin.flush()
        deadline = time.monotonic() + 30
        while not any(e["id"] == "j2" and e["event"] in ("result", "error") for e in out.events()):
            assert time.monotonic() < deadline, out.events()
            time.sleep(0.02)
    thread.join(30)  # end of input: the service shuts down
    assert not thread.is_alive()
    finals = {e["id"]: e for e in out.events() if e["event"] in ("result", "error") and e["id"] != "j0"}
    j0 = [e for e in out.events() if e["id"] == "j0" and e["event"] in ("result", "error")]
    assert finals["j1"]["error"]["code"] == "internal" and "invalid event" in finals["j1"]["error"]["message"]
    assert [e["error"]["code"] for e in j0] == ["duplicate_id", "internal"]
    assert "RuntimeError: boom" in j0[1]["error"]["message"]
    assert finals["j2"]["result"] == {"ok": 1}
    for event in out.events():
        protocol.validate_event(event)
