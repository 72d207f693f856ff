"""The react-todos example's backend: the built page, and /api/todos read and written under row-level security.

    python3 examples/react-todos/serve.py --dsn postgresql://postgres@127.0.0.1:5432/postgres [--port 8000]

The page sends the same token to fluxrt and here. Each request verifies it (HS256 with fluxrt's `auth.jwt_secret`,
from --secret or $FLUXRT_AUTH_JWT_SECRET) and runs as fluxrt judges a subscriber: `SET LOCAL ROLE authenticated` with
`request.jwt.claims` set to the token's claims, so `auth.jwt() ->> 'sub'` in the policies of schema.sql is the user.
A development server (one database connection per request, no TLS), not a pattern for production.

    GET   /api/todos          the rows this user may read
    POST  /api/todos          {"title": T}: a todo of this user's
    PATCH /api/todos/ID       {"done": B, "title": T}: change this user's todo
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import json
import os
import re
from pathlib import Path
from typing import Any

import asyncpg
import jwt

HERE = Path(__file__).resolve().parent
COLUMNS = "id, owner, title, done, shared"


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def claims_of(header: str | None, secret: str) -> dict[str, Any]:
    """The verified claims of `Authorization: Bearer JWT`; Refused(401) for none or a bad one, 403 for a role other
    than `authenticated` (this server only ever acts as the signed-in user)."""
    if header is None or not header.startswith("Bearer "):
        raise Refused(401, "send Authorization: Bearer <the token the page uses for fluxrt>")
    try:
        claims: dict[str, Any] = jwt.decode(header.removeprefix("Bearer "), secret, algorithms=["HS256"])
    except jwt.PyJWTError as error:
        raise Refused(401, f"token refused: {error}") from error
    if claims.get("role", "authenticated") != "authenticated" or not isinstance(claims.get("sub"), str):
        raise Refused(403, "this example serves signed-in users only: a token with a sub and no other role")
    return claims


async def as_user(dsn: str, claims: dict[str, Any], sql: str, *args: Any) -> list[dict[str, Any]]:
    """Run `sql` in a transaction as role `authenticated` with `claims`, as fluxrt evaluates policies for them."""
    connection = await asyncpg.connect(dsn)
    try:
        async with connection.transaction():
            await connection.execute("SELECT set_config('request.jwt.claims', $1, true)", json.dumps(claims))
            await connection.execute("SET LOCAL ROLE authenticated")
            return [dict(row) for row in await connection.fetch(sql, *args)]
    finally:
        await connection.close()


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from this folder (index.html, dist/app.js) and the API."""

    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".html": "text/html; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
    }

    def __init__(self, *args: Any, dsn: str, secret: str, quiet: bool, **kwargs: Any) -> None:
        self.dsn, self.secret, self.quiet = dsn, secret, quiet
        super().__init__(*args, directory=str(HERE), **kwargs)

    def log_message(self, format: str, *args: Any) -> None:
        if not self.quiet:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/api/todos":
            self.api(lambda claims, _: (f"SELECT {COLUMNS} FROM public.todos ORDER BY id",))
        elif self.path.startswith("/api/"):
            self.answer(404, {"error": "no such endpoint"})
        else:
            super().do_GET()

    def do_POST(self) -> None:
        if self.path != "/api/todos":
            self.answer(404, {"error": "no such endpoint"})
            return

        def insert(claims: dict[str, Any], body: dict[str, Any]) -> tuple[Any, ...]:
            title = body.get("title")
            if not isinstance(title, str) or not title.strip():
                raise Refused(400, 'expected {"title": "..."}')
            return (f"INSERT INTO public.todos (title) VALUES ($1) RETURNING {COLUMNS}", title.strip())

        self.api(insert, status=201)

    def do_PATCH(self) -> None:
        match = re.fullmatch(r"/api/todos/(\d+)", self.path)
        if match is None:
            self.answer(404, {"error": "no such endpoint"})
            return
        todo = int(match.group(1))

        def update(claims: dict[str, Any], body: dict[str, Any]) -> tuple[Any, ...]:
            done, title = body.get("done"), body.get("title")
            if not isinstance(done, bool | None) or not isinstance(title, str | None):
                raise Refused(400, 'expected {"done": true|false} and/or {"title": "..."}')
            return (
                "UPDATE public.todos SET done = coalesce($2, done), title = coalesce($3, title) WHERE id = $1 "
                f"RETURNING {COLUMNS}",
                todo,
                done,
                title,
            )

        self.api(update)

    def api(self, statement: Any, status: int = 200) -> None:
        """Answer with the rows of the statement that `statement(claims, body)` gives, run as the token's user."""
        try:
            claims = claims_of(self.headers.get("Authorization"), self.secret)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            if not isinstance(body, dict):
                raise Refused(400, "expected a JSON object")
            rows = asyncio.run(as_user(self.dsn, claims, *statement(claims, body)))
        except Refused as refused:
            self.answer(refused.status, {"error": str(refused)})
            return
        except (json.JSONDecodeError, asyncpg.PostgresError) as error:
            self.answer(400, {"error": str(error)})
            return
        if self.command == "GET":
            self.answer(status, rows)
        elif rows:
            self.answer(status, rows[0])
        else:
            self.answer(404, {"error": "no such todo of yours"})

    def answer(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def make_server(
    dsn: str, secret: str, host: str = "127.0.0.1", port: int = 8000, quiet: bool = False
) -> http.server.ThreadingHTTPServer:
    """The example's server, bound and not yet serving (port 0: a free one, in `server_address`)."""
    handler = functools.partial(Handler, dsn=dsn, secret=secret, quiet=quiet)
    return http.server.ThreadingHTTPServer((host, port), handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", required=True, help="the database fluxrt serves (schema.sql applied)")
    parser.add_argument("--secret", default=os.environ.get("FLUXRT_AUTH_JWT_SECRET"), help="fluxrt's auth.jwt_secret")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    if not args.secret:
        parser.error("pass --secret or set FLUXRT_AUTH_JWT_SECRET: the secret fluxrt verifies tokens with")
    if not (HERE / "dist" / "app.js").exists():
        parser.error(f"build the page first: cd {HERE} && npm ci && npm run build")
    server = make_server(args.dsn, args.secret, args.host, args.port)
    print(f"serving http://{args.host}:{server.server_address[1]}/?token=...&server=http://localhost:8080")
    server.serve_forever()


if __name__ == "__main__":
    main()
