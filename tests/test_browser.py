"""The example pages in a real browser: headless Chromium (Debian's `chromium`, installed here when missing) driven
by playwright-core from a Node script (sdk/typescript/test/browser/pages.ts), against fluxrt on a real PostgreSQL.

The test serves the repository over HTTP on 127.0.0.1 (ES modules do not load from file://), runs fluxrt in its
nursery, and judges what the script reports seeing: texts and computed colours, online lists, messages.
"""

from __future__ import annotations

import difflib
import functools
import http.server
import re
import threading
from collections.abc import Iterator

import pytest
import trio

from .pg import ROOT
from .support.browser import ensure_chromium, see
from .support.config import token
from .support.sdk import USERS, prepare_sdk

REFERENCE = ROOT.parent / "shared" / "spec" / "realtime-api-reference.md"
REFERENCE_PAGE = ROOT / "tests" / "data" / "reference-live-users.html"
"""the reference's "HTML + JavaScript" page, copied verbatim, so that the check runs wherever the repository does"""


@pytest.fixture
def browser_tools() -> tuple[str, str]:
    return prepare_sdk(), ensure_chromium()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    # Declared as any real server declares them: the reference's page has no <meta charset>, so without this its
    # "→" would be read as windows-1252 (Python's own server leaves the charset out).
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
    }

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def pages_url() -> Iterator[str]:
    """The repository over HTTP on 127.0.0.1: the pages, and the SDK's dist/ they import."""
    handler = functools.partial(_QuietHandler, directory=str(ROOT))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


async def start_fluxrt(start_server, db):
    server = await start_server(database={"dsn": db.dsn, "poll_interval": 0.01})
    with trio.fail_after(10):
        while server.database_state() != "ok":
            await trio.sleep(0.01)
    return server


def page_env(server, pages_url: str, db) -> dict[str, str]:
    return {
        "PAGES_URL": pages_url,
        "FLUXRT_URL": f"http://127.0.0.1:{server.port}",
        "FLUXRT_WS": f"ws://127.0.0.1:{server.port}",
        "TOKEN_ALICE": token("alice"),
        "TOKEN_BOB": token("bob"),
        "SDK_TEST_DSN": db.dsn,
    }


def test_live_users_is_the_reference_page():
    """live-users.html is the reference's page; only the two lines that fix the token and the server differ."""
    theirs = REFERENCE_PAGE.read_text().splitlines()
    ours = (ROOT / "examples" / "live-users.html").read_text().splitlines()
    matcher = difflib.SequenceMatcher(a=theirs, b=ours, autojunk=False)
    changed = [theirs[i1:i2] for tag, i1, i2, _, _ in matcher.get_opcodes() if tag != "equal"]
    assert changed == [
        [
            "    const token = 'YOUR_JWT_TOKEN'",
            "    const ws = new WebSocket(`ws://localhost:8080/realtime?token=${token}`)",
        ]
    ]


def test_the_copy_of_the_reference_page_is_current():
    """Where the shared spec sits beside the repository (development machines), the copy matches it."""
    if not REFERENCE.exists():
        pytest.skip(f"{REFERENCE} is not beside this checkout; the committed copy stands in for it")
    reference = re.search(r"```html\n(.*?)```", REFERENCE.read_text(), re.S)
    assert reference is not None
    assert reference.group(1) == REFERENCE_PAGE.read_text()


@pytest.mark.timeout(600)  # the first run may install Chromium; the page itself is bounded by see()
async def test_live_users_page_shows_changes_in_colour(start_server, db, pages_url, browser_tools):
    db.sql(USERS)
    server = await start_fluxrt(start_server, db)
    seen = await see("live-users", browser_tools, page_env(server, pages_url, db))
    assert seen == [
        {"text": "Deleted: Ada Lovelace", "color": "rgb(255, 0, 0)"},
        {"text": "Updated: Ada → Ada Lovelace", "color": "rgb(0, 0, 255)"},
        {"text": "New user: Ada", "color": "rgb(0, 128, 0)"},
    ]


@pytest.mark.timeout(600)
async def test_chat_page_messages_and_online_list(start_server, db, pages_url, browser_tools):
    server = await start_fluxrt(start_server, db)
    seen = await see("chat", browser_tools, page_env(server, pages_url, db))
    assert seen["onlineBefore"] == {"alice": ["alice", "bob"], "bob": ["alice", "bob"]}
    assert seen["messages"] == {"alice": ["alice: Hello Bob"], "bob": ["alice: Hello Bob"]}
    assert seen["onlineAfter"] == ["bob"]
