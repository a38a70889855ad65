"""`dpokit label serve`: the labeling page and its JSON API, a Starlette app on uvicorn over the Store.

    GET  /                      the page (static: every text reaches it as JSON, set with textContent)
    GET  /api/next?annotator=N  the comparison N is shown (sides already randomized) and N's progress
    POST /api/vote              {annotator, comparison, choice: left|right|tie|both_bad|skip, comment}
                                -> stored and committed, then the next comparison (one round trip)
    POST /api/undo              {annotator} -> the last vote taken back, its comparison shown again
    GET  /api/stats             progress, per-annotator counts, pairwise agreement

The app holds no state: the database does (store.py). It opens no path a client names. Bound to a
non-loopback address it needs an access token, sent as the `token` query parameter (the page's link) or the
X-Dpokit-Token header (the page's requests). On loopback, a request must name a loopback host, and a POST
must be JSON: another site's page can neither rebind a name to it nor send it a form.
"""

from __future__ import annotations

import hmac
import socket
from importlib import resources

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from dpokit.errors import UsageError
from dpokit.labels.results import stats
from dpokit.labels.store import Store, VoteRefused

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SIDES = {"left", "right", "tie", "both_bad", "skip"}
MAX_NAME, MAX_COMMENT = 64, 2000


def create_app(store: Store, token: str = "", host: str = "127.0.0.1") -> Starlette:
    """The app over `store`; `token`: required of every request when set; `host`: the address served (on
    loopback, requests must name a loopback host: a page on another site cannot reach it by DNS rebinding)."""
    page = resources.files("dpokit").joinpath("assets/label.html").read_text(encoding="utf-8")

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    async def next_comparison(request: Request) -> Response:
        who = _annotator(request.query_params.get("annotator"))
        return JSONResponse(await _run(_next, store, who))

    async def vote(request: Request) -> Response:
        body = await _json(request)
        who = _annotator(body.get("annotator"))
        side, cid, comment = body.get("choice"), body.get("comparison"), body.get("comment") or ""
        if side not in SIDES or not isinstance(cid, int) or not isinstance(comment, str):
            raise _Bad(f"expected comparison (an id), choice ({', '.join(sorted(SIDES))}) and comment (text)")
        return JSONResponse(await _run(_vote, store, who, cid, side, comment[:MAX_COMMENT]))

    async def undo(request: Request) -> Response:
        who = _annotator((await _json(request)).get("annotator"))
        undone = await _run(store.undo, who)
        return JSONResponse({"undone": undone, **await _run(_next, store, who)})

    async def get_stats(request: Request) -> Response:
        return JSONResponse(await _run(stats, store))

    routes = [
        Route("/", index),
        Route("/api/next", next_comparison),
        Route("/api/vote", vote, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/stats", get_stats),
    ]
    middleware = [Middleware(_TokenCheck, token=token)] if token else []
    if host in LOOPBACK:
        middleware.insert(0, Middleware(_LoopbackHost))
    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={_Bad: _bad_request, VoteRefused: _refused},
    )


class _Bad(Exception):
    pass


async def _bad_request(request: Request, err: Exception) -> Response:
    return JSONResponse({"error": str(err)}, status_code=400)


async def _refused(request: Request, err: Exception) -> Response:
    return JSONResponse({"error": str(err)}, status_code=409)


async def _json(request: Request) -> dict:
    # JSON only: a form or text/plain POST from another site's page (which a browser sends without asking
    # this server first) is refused, so no other page can vote in an annotator's name
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise _Bad("expected Content-Type: application/json")
    try:
        body = await request.json()
    except ValueError:
        raise _Bad("expected a JSON body") from None
    if not isinstance(body, dict):
        raise _Bad("expected a JSON object")
    return body


def _annotator(name) -> str:
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME or not name.isprintable():
        raise _Bad(f"annotator: expected a name (1 to {MAX_NAME} printable characters)")
    return name.strip()


async def _run(fn, *args):
    """The store's blocking SQLite work, off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _next(store: Store, who: str) -> dict:
    shown = store.next_for(who)
    progress = {"done": store.done_by(who), "left": store.left_for(who)}
    if shown is None:
        return {"comparison": None, "progress": progress}
    c, left = shown
    texts = (c.a, c.b) if left == "a" else (c.b, c.a)
    return {
        "comparison": {"id": c.id, "prompt": c.prompt, "left": texts[0], "right": texts[1]},
        "progress": progress,
    }


def _vote(store: Store, who: str, cid: int, side: str, comment: str) -> dict:
    return {"stored": store.vote(who, cid, side, comment), **_next(store, who)}


class _LoopbackHost(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next):
        host = request.headers.get("host", "")
        name = host[: host.find("]") + 1] if host.startswith("[") else host.split(":")[0]
        if name not in ("127.0.0.1", "localhost", "[::1]"):
            return JSONResponse(
                {"error": f"host {host!r}: this server answers on loopback only"}, status_code=400
            )
        return await call_next(request)


class _TokenCheck(BaseHTTPMiddleware):
    def __init__(self, app, token: str):
        super().__init__(app)
        self.token = token

    async def dispatch(self, request: Request, call_next):
        given = request.headers.get("x-dpokit-token") or request.query_params.get("token") or ""
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return JSONResponse({"error": "an access token is needed (?token=...)"}, status_code=401)
        return await call_next(request)


def bind(host: str, port: int, token: str) -> socket.socket:
    """The listening socket, bound before anything is served: a busy port or a non-loopback address without
    a token is the user's mistake, said in one line."""
    if host not in LOOPBACK and not token:
        raise UsageError(
            f"--host {host}: serving beyond this machine needs an access token: add --token SECRET (or set "
            "DPOKIT_LABEL_TOKEN); annotators open the printed link, which carries it"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UsageError(
            f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another --port"
        ) from None
    sock.listen(128)
    return sock
