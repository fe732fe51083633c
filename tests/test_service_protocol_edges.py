"""Protocol edge cases against a real ``ex4d serve`` (issue 17 item 7): integers written as floats, deep
nesting, lone surrogates, over-long name components. ``internal`` must only ever mean a bug of ours, the
request id must survive, and no traceback may reach the client.
"""

from __future__ import annotations

import json
import time

import pytest
import service_fixtures as sf


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("edges")
    clip = sf.make_clip(root / "data")
    client = sf.start_client(root / "store", [clip.root])
    client.request("hello", timeout=120)
    yield clip, client, root / "store"
    client.close()


def _raw(client, line: str, rid: str | None, timeout: float = 60) -> dict:
    """Send one raw line; return the final event for ``rid`` (or the next id-less error)."""
    seen: list[dict] = []
    client.send_raw(line)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rid is not None and rid in client.requests and client.requests[rid].done:
            return client.requests[rid].error or {"result": client.requests[rid].result}
        for e in client.poll():
            seen.append(e)
            if e.get("id") == rid and e.get("event") in ("result", "error"):
                return e.get("error") or {"result": e.get("result")}
        time.sleep(0.01)
    raise AssertionError(f"no answer for {rid}: {seen}")


def _job_line(rid: str, params: dict) -> str:
    return json.dumps({"id": rid, "type": "estimate_depth", "params": params})


def test_integers_sent_as_floats(env):
    """``max_frames: 3.0`` is refused as invalid_request (3 is accepted). Fails where the schema's "integer"
    lets 3.0 through and the job then crashes with an internal TypeError."""
    clip, client, store = env
    base = {"footage": str(clip.footage), "depth": {"model": "file", "path": str(clip.depth_path)}}
    for field, value in (("max_frames", 3.0), ("max_side", 32.0)):
        req, events = sf.run(client, "estimate_depth", {**base, field: value}, timeout=60)
        assert req.error is not None and req.error["code"] == "invalid_request", (field, req.error)
        assert not [e for e in events if e["event"] == "log" and "Traceback" in e.get("message", "")]
    ok = client.request("estimate_depth", {**base, "max_frames": 3}, timeout=120)
    assert ok["n_frames"] == 3


def test_deep_nesting_keeps_the_request_id(env):
    """980 levels of nesting inside depth.options: a clean invalid_request error sent to that request's id.
    Fails where the nesting reaches json / jsonschema / the cache key's recursion limit (internal, id lost)."""
    clip, client, store = env
    deep = "[" * 980 + "]" * 980
    line = (
        f'{{"id": "deep-1", "type": "estimate_depth", "params": {{"footage": "{clip.footage}", "depth": {{"model": "file", '
        f'"path": "{clip.depth_path}", "options": {{"o": {deep}}}}}}}}}'
    )
    err = sf.bc.Request("deep-1", "estimate_depth", {})
    client.requests["deep-1"] = err
    got = _raw(client, line, "deep-1")
    assert got["code"] == "invalid_request", got
    line = '{"id": "deep-2", "type": "hello", "params": {"x": %s}}' % ('{"a": ' * 5000 + "1" + "}" * 5000)
    client.requests["deep-2"] = sf.bc.Request("deep-2", "hello", {})
    assert _raw(client, line, "deep-2")["code"] == "invalid_request"


def test_lone_surrogate_id_loses_no_log_line(env):
    """A request id with a lone surrogate is refused (invalid_request, to that id), and later requests are
    still written to the log file. Fails where the surrogate breaks the UTF-8 log handler (lines lost) or
    the request is served."""
    clip, client, store = env
    rid = "sur-\ud800"
    client.requests[rid] = sf.bc.Request(rid, "hello", {})
    got = _raw(client, json.dumps({"id": rid, "type": "hello"}), rid)
    assert got["code"] == "invalid_request", got
    after = client.submit("hello")
    client.wait(after, 60)
    log_text = (store / "logs" / "service.log").read_text(encoding="utf-8", errors="replace")
    assert f"request {after.id}: hello" in log_text


def test_long_name_component_is_a_user_error(env):
    """A 300-character file name component: a user error (not found / bad input), never internal. Fails where
    the ENAMETOOLONG OSError of stat() escapes as a crash."""
    clip, client, store = env
    for path in (clip.root / ("a" * 300), clip.root / ("b" * 300) / "c.mp4", clip.root / ("\u00e9" * 200)):
        for type_, params in (
            ("probe_footage", {"footage": str(path)}),
            ("estimate_depth", {"footage": str(path), "depth": {"model": "file", "path": str(clip.depth_path)}}),
        ):
            req, events = sf.run(client, type_, params, timeout=60)
            assert req.error is not None and req.error["code"] in ("bad_input", "not_found"), req.error
            assert not [e for e in events if e["event"] == "log" and "Traceback" in e.get("message", "")]
