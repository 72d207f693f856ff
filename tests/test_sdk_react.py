"""@fluxbase/react (sdk/react): the hooks under Node's test runner against a fake server, and the react-todos example
in headless Chromium against a real fluxrt and PostgreSQL.

Python prepares, Node tests, as for the TypeScript SDK (test_sdk_typescript.py): `npm ci` only when a node_modules
is missing or stale, `tsc` for the SDK and the hooks, esbuild for the example. The browser scenario
(sdk/typescript/test/browser/pages.ts, react-todos) runs fluxrt itself, to restart it under the pages; this file
serves the example with its own backend (examples/react-todos/serve.py, which answers /api/todos under the table's
row-level security) and judges what the pages showed.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Iterator
from types import ModuleType

import pytest

from .support.browser import ensure_chromium, home_trusting, see
from .support.config import SECRET, token
from .support.sdk import REACT, REACT_TODOS, node_fluxrt, prepare_react, run_node_tests
from .support.tls import make_ca


@pytest.fixture
def node() -> str:
    return prepare_react()


def example_backend() -> ModuleType:
    """examples/react-todos/serve.py as a module (the example is no package)."""
    spec = importlib.util.spec_from_file_location("react_todos_serve", REACT_TODOS / "serve.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def todos_site(db) -> Iterator[str]:
    """The example's page and API on a free port, on the scratch database with schema.sql applied."""
    db.sql((REACT_TODOS / "schema.sql").read_text())
    server = example_backend().make_server(db.dsn, SECRET, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(300)
async def test_hooks_against_a_fake_server(node):
    """StrictMode, unmount, changed arguments, latest callbacks, presence, broadcast, connection state, useLiveRows'
    load/buffer/resume/reload, and server rendering."""
    await run_node_tests(node, sorted((REACT / "build" / "unit").glob("*.test.js")), {}, cwd=REACT)


@pytest.mark.timeout(600)  # the first run may install Chromium; the pages themselves are bounded by see()
async def test_react_todos_two_users_restart_and_presence(node, db, tmp_path, todos_site):
    env, log = node_fluxrt(db.dsn, tmp_path)
    env |= {
        "PAGES_URL": todos_site,
        "FLUXRT_URL": env["SDK_TEST_URL"],
        "TOKEN_ALICE": token("alice"),
        "TOKEN_BOB": token("bob"),
    }
    seen = await see("react-todos", (node, ensure_chromium()), env, log)
    # Each user's own todos and the shared one, never carol's private ones or each other's.
    assert seen["loaded"] == {"alice": ["alice:a1", "carol:s1"], "bob": ["bob:b1", "carol:s1"]}
    assert seen["changed"] == {
        "alice": ["alice:a1 (edited) ✓", "alice:a2", "carol:s2"],
        "bob": ["bob:b2", "carol:s2"],
    }
    # Changed while fluxrt was down, delivered when each page resumed its channel: no second load.
    assert seen["restarted"] == {
        "alice": ["alice:a1 (edited) ✓", "carol:s2", "alice:a3", "carol:s3"],
        "bob": ["bob:b2 ✓", "carol:s2", "carol:s3"],
    }
    # Added and ticked on alice's page (through serve.py), shown from what fluxrt delivered; not on bob's.
    assert seen["fromThePage"] == {
        "alice": ["alice:a1 (edited) ✓", "carol:s2", "alice:a3 ✓", "carol:s3", "alice:a4", "carol:s4"],
        "bob": ["bob:b2 ✓", "carol:s2", "carol:s3", "carol:s4"],
    }
    assert seen["loads"] == {"before": {"alice": 1, "bob": 1}, "afterRestart": {"alice": 1, "bob": 1}}
    assert seen["sockets"]["alice"] >= 2 and seen["sockets"]["bob"] >= 2, "each page connected again"
    # The scenario fails unless both online lists showed alice and bob, before and after the restart.
    assert seen["online"]["afterBobLeft"] == ["alice"]


@pytest.mark.timeout(600)  # as above: the first run may install Chromium (and certutil)
async def test_react_todos_over_wss(node, db, tmp_path, todos_site):
    """The example page with server=https://127.0.0.1:PORT, against a fluxrt that serves TLS with a certificate from
    a CA made at test time: a row inserted shows in alice's list over wss://, and a browser without the CA is refused.

    Chromium trusts the CA the way a user or an administrator would make it trust a private CA on Linux: in the NSS
    database of its HOME (~/.pki/nssdb, made with certutil), so the chain and the host name are verified as for any
    site; no flag ignores certificate errors (neither --ignore-certificate-errors nor a pinned key with
    --ignore-certificate-errors-spki-list). The page stays on serve.py's http://: a WebSocket to wss:// from it is
    no mixed content (that is an https:// page loading http:// or ws://), and the page is not what is under test.
    """
    ca = make_ca(tmp_path / "ca")
    env, log = node_fluxrt(db.dsn, tmp_path, tls=ca.server_settings())
    untrusting = tmp_path / "untrusting"
    untrusting.mkdir()
    env |= {
        "PAGES_URL": todos_site,
        "FLUXRT_URL": env["SDK_TEST_URL"],
        "TOKEN_ALICE": token("alice"),
        # Node (it starts fluxrt and asks its /health) trusts the CA through this; Chromium through its HOME.
        "NODE_EXTRA_CA_CERTS": str(ca.ca_cert),
        "HOME": str(home_trusting(tmp_path / "home", ca.ca_cert)),
        "UNTRUSTING_HOME": str(untrusting),
    }
    seen = await see("react-todos-over-wss", (node, ensure_chromium()), env, log)
    port = env["SDK_TEST_URL"].rsplit(":", 1)[1]
    assert seen["shown"] == ["alice:t1", "alice:t2"]
    assert seen["sockets"] == [f"wss://127.0.0.1:{port}/realtime?token={env['TOKEN_ALICE']}"]
    assert seen["connection"].endswith(": OPEN"), seen["connection"]
    assert "ERR_CERT_AUTHORITY_INVALID" in seen["without"]["refusal"], seen["without"]
    assert seen["without"]["listStatus"] != "live", seen["without"]
