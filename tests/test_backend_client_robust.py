"""The add-on's backend client (``backend_client.py``, issue 17 item 11) facing bad params and bad events.

The malformed events come from a real process speaking on stdout (a stand-in backend script: the real
backend never sends such lines, which is the point of the test); the params check needs no backend.
"""

from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import service_fixtures as sf

bc = sf.bc

FAKE_BACKEND = textwrap.dedent(
    """
    import json, sys
    line = sys.stdin.readline()
    rid = json.loads(line)["id"]
    for out in (
        "[1, 2, 3]",
        json.dumps({"event": "_exit"}),
        json.dumps({"id": 5, "event": "started"}),
        json.dumps({"id": rid, "event": "progress", "stage": "x", "step": "abc", "total": None}),
        json.dumps({"id": rid, "event": "queued", "position": {"a": 1}}),
        json.dumps({"id": rid, "event": "result", "result": [1]}),
        json.dumps({"id": rid, "event": "error", "error": "boom"}),
    ):
        print(out, flush=True)
    sys.stdin.readline()
    """
)


def test_unserialisable_params_raise_at_once(tmp_path):
    """Params that are not JSON (an object, a set, NaN) raise BackendError(invalid_request) in submit and
    leave no pending request. Fails where the request is registered first and the write error is swallowed
    (the request then waits forever)."""
    client = bc.BackendClient(sys.executable, store=tmp_path / "store")
    for params in ({"x": object()}, {"x": {1, 2}}, {"x": math.nan}, {"x": b"bytes"}):
        with pytest.raises(bc.BackendError) as info:
            client.submit("hello", params)
        assert info.value.code == "invalid_request"
    assert client.requests == {} and not client.running


def test_malformed_events_never_raise_out_of_poll_or_wait(tmp_path):
    """A backend printing malformed events (a list, a fake exit marker, wrong field types, an error that is
    a string): poll() and wait() never raise, and the request ends with an error dict that has a code.
    Fails where _apply/_dispatch index events without checks (ValueError/KeyError/TypeError escape)."""
    script = tmp_path / "fake_backend.py"
    script.write_text(FAKE_BACKEND)
    wrapper = tmp_path / "python_fake"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}"\n')
    wrapper.chmod(0o755)
    client = bc.BackendClient(str(wrapper), store=tmp_path / "store")
    try:
        req = client.submit("hello", {})
        client.wait(req, 20)
        client.poll()
        assert req.done
        assert isinstance(req.error, dict) and req.error["code"] == "internal", req.error
        assert req.result is None
    finally:
        client.kill()
    json.dumps(req.error)  # still a plain protocol-shaped dict
