"""The web application of `discover serve`: a JSON API (OpenAPI schema at /openapi.json) and HTML
pages over one store, read-only. Every route is a GET; a request names a model by checkpoint id
(8 hex digits or more) or by the spec it was scanned under. User errors are one-line 4xx answers,
never tracebacks; there is no SQL over HTTP."""

from __future__ import annotations

import logging

from discover.errors import DiscoverError, NotFound, NotScanned, QueryError, StoreBusy
from discover.serve import data, pages
from discover.serve.catalog import Snapshot
from discover.serve.probe import Prober

log = logging.getLogger("discover.serve")

LIMIT_MAX = 500


def create_app(store_root, *, device: str | None = None, refresh_s: float = 2.0, host: str = "127.0.0.1"):
    from fastapi import FastAPI, Query, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    snap = Snapshot(store_root, refresh_s=refresh_s)
    prober = Prober(device=device)
    app = FastAPI(title="discover", version=_version(), docs_url=None, redoc_url=None,
                  description="Neurons of language models: search, statistics, verdicts and studies from a "
                              "discover store (read-only).")
    app.state.snapshot, app.state.prober = snap, prober
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    # only requests addressed to this server by name: a web page elsewhere cannot reach it by DNS rebinding
    hosts = ["127.0.0.1", "localhost", "::1", "[::1]"] + ([host] if host not in ("0.0.0.0", "::") else ["*"])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)

    def wants_html(request: Request) -> bool:
        return not request.url.path.startswith("/api") and request.url.path != "/openapi.json"

    def answer(request: Request, status: int, message: str):
        message = " ".join(str(message).split())[:500]  # one line
        if wants_html(request):
            return HTMLResponse(pages.error_page(status, message), status_code=status)
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        e = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in e.get("loc", ())[1:]) or "request"
        return answer(request, 422, f"parameter {where}: {e.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return answer(request, exc.status_code, exc.detail if isinstance(exc.detail, str) else "error")

    @app.exception_handler(QueryError)
    async def _query(request: Request, exc: QueryError):
        return answer(request, 404 if isinstance(exc, (NotScanned, NotFound)) else 400, str(exc))

    @app.exception_handler(DiscoverError)
    async def _discover(request: Request, exc: DiscoverError):
        return answer(request, 503 if isinstance(exc, StoreBusy) else 400, str(exc))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return answer(request, 500, f"internal error ({type(exc).__name__}); the server log has the details")

    limit_q = Query(50, ge=1, le=LIMIT_MAX, description="rows per page")
    offset_q = Query(0, ge=0, le=10_000_000)

    # ------------------------------------------------------------------------ API
    @app.get("/api/models", summary="every scanned checkpoint")
    def api_models():
        with snap.store() as st:
            return data.models(st)

    @app.get("/api/token", summary="neurons most congruent with a token, both signs, every model")
    def api_token(text: str | None = Query(None, max_length=200, description='token text, e.g. " an"'),
                  token_id: int | None = Query(None, ge=0), top: int = Query(10, ge=1, le=200),
                  model: str | None = Query(None, max_length=300)):
        with snap.store() as st:
            return data.search(st, text, token_id, top, model)

    @app.get("/api/neuron/{model}/{neuron}", summary="one neuron: statistics, roles, examples, verdicts, history")
    def api_neuron(model: str, neuron: str, examples: int = Query(8, ge=0, le=50),
                   similar: int = Query(8, ge=0, le=50)):
        with snap.store() as st:
            return data.neuron(st, model, neuron, examples=examples, similar=similar)

    @app.get("/api/roles", summary="role candidates, strongest first, paged")
    def api_roles(model: str | None = Query(None, max_length=300), role: str = Query("prediction", max_length=40),
                  offset: int = offset_q, limit: int = limit_q):
        with snap.store() as st:
            return data.roles(st, model or data.default_model(st), role, offset, limit)

    @app.get("/api/verdicts", summary="the latest verify run's hypotheses, paged")
    def api_verdicts(model: str | None = Query(None, max_length=300), verdict: str | None = Query(None, max_length=20),
                     kind: str | None = Query(None, max_length=20), offset: int = offset_q, limit: int = limit_q):
        with snap.store() as st:
            return data.verdicts(st, model or data.default_model(st), verdict or None, kind or None, offset, limit)

    @app.get("/api/studies/{model}", summary="the latest token study of each token")
    def api_studies(model: str):
        with snap.store() as st:
            return data.studies(st, model)

    @app.get("/api/study/{study_id}", summary="one token study")
    def api_study(study_id: str):
        with snap.store() as st:
            return data.study(st, study_id)

    @app.get("/api/probe", summary="a neuron's activation on every token of a text; top neurons at one position")
    def api_probe(model: str = Query(..., max_length=300), text: str = Query(..., max_length=4000),
                  neuron: str | None = Query(None, max_length=40), position: int | None = Query(None, ge=0),
                  top: int = Query(10, ge=1, le=100)):
        with snap.store() as st:
            return _probe(st, prober, model, text, neuron, position, top)

    # ---------------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home():
        with snap.store() as st:
            return pages.home(data.models(st))

    @app.get("/search", response_class=HTMLResponse, include_in_schema=False)
    def search_page(q: str = Query("", max_length=200), top: int = Query(10, ge=1, le=200)):
        num = q[1:]
        text, tid = (None, int(num)) if q.startswith("#") and num.isascii() and num.isdigit() else (q, None)
        with snap.store() as st:
            return pages.search(data.search(st, text, tid, top), q)

    @app.get("/neuron/{model}/{neuron}", response_class=HTMLResponse, include_in_schema=False)
    def neuron_page(model: str, neuron: str):
        with snap.store() as st:
            return pages.neuron(data.neuron(st, model, neuron))

    @app.get("/roles", response_class=HTMLResponse, include_in_schema=False)
    def roles_page(model: str | None = Query(None, max_length=300), role: str = Query("prediction", max_length=40),
                   offset: int = offset_q, limit: int = limit_q):
        from discover.roles import ROLES

        with snap.store() as st:
            return pages.roles_page(data.roles(st, model or data.default_model(st), role, offset, limit), ROLES)

    @app.get("/verdicts", response_class=HTMLResponse, include_in_schema=False)
    def verdicts_page(model: str | None = Query(None, max_length=300), verdict: str | None = Query(None, max_length=20),
                      kind: str | None = Query(None, max_length=20), offset: int = offset_q, limit: int = limit_q):
        with snap.store() as st:
            res = data.verdicts(st, model or data.default_model(st), verdict or None, kind or None, offset, limit)
            return pages.verdicts_page(res, verdict or None, kind or None)

    @app.get("/model/{model}", response_class=HTMLResponse, include_in_schema=False)
    def model_page(model: str):
        from discover.report import build_report, render_html

        with snap.store() as st:
            return render_html(build_report(st, model, cards=60))

    @app.get("/studies/{model}", response_class=HTMLResponse, include_in_schema=False)
    def studies_page(model: str):
        with snap.store() as st:
            return pages.studies_page(model, data.studies(st, model))

    @app.get("/study/{study_id}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(study_id: str):
        with snap.store() as st:
            return pages.study_page(data.study(st, study_id))

    @app.get("/probe", response_class=HTMLResponse, include_in_schema=False)
    def probe_page(model: str | None = Query(None, max_length=300), text: str = Query("", max_length=4000),
                   neuron: str | None = Query(None, max_length=40), position: int | None = Query(None, ge=0)):
        with snap.store() as st:
            model = model or data.default_model(st)[:12]
            res = err = None
            if text:
                try:
                    res = _probe(st, prober, model, text, neuron or None, position, 10)
                except QueryError as e:
                    err = str(e)
            return pages.probe_page(model, neuron, text, res, err)

    @app.get("/docs/api", response_class=PlainTextResponse, include_in_schema=False)
    def api_docs():
        lines = ["discover serve: JSON API (OpenAPI schema at /openapi.json). Every route is GET.", ""]
        for r in app.routes:
            if getattr(r, "include_in_schema", False) and getattr(r, "path", "").startswith("/api"):
                lines.append(f"GET {r.path}  {r.summary or ''}")
        return "\n".join(lines)

    return app


def _probe(store, prober, model: str, text: str, neuron: str | None, position: int | None, top: int) -> dict:
    from discover.names import layout_of
    from discover.query import check_neuron

    ckpt = store.resolve_model(model)
    target = None
    if neuron:
        target = layout_of(ckpt).parse(neuron)
        check_neuron(ckpt, *target)
    return prober.probe(store, ckpt, text, neuron=target, position=position, top=top)


def _version() -> str:
    from discover import __version__

    return __version__


def serve(store_root, *, host: str = "127.0.0.1", port: int = 8000, device: str | None = None) -> None:
    """Run the server until interrupted; prints its URL once it listens."""
    import socket
    import sys

    import uvicorn

    from discover.errors import ServeError

    try:  # a clear line now, rather than uvicorn's log after startup
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise ServeError(f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host") from None
    app = create_app(store_root, device=device, host=host)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"discover serve: warning: listening on {host}, not only this machine: anyone who can reach "
              f"{host}:{port} can read this store", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host

    async def announce():
        import asyncio

        while not server.started:
            await asyncio.sleep(0.05)
        print(f"discover serve: http://{shown}:{port}/  (store {app.state.snapshot.root}; Ctrl-C stops)", flush=True)

    async def main():
        import asyncio

        task = asyncio.create_task(announce())
        await server.serve()
        task.cancel()

    import asyncio
    import signal

    class _Stop(Exception):
        pass

    def stop(signum, frame):  # uvicorn shuts down on SIGTERM, then re-raises it: end here, cleaned up
        raise _Stop

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        asyncio.run(main())
    except (_Stop, KeyboardInterrupt):  # Ctrl-C or a service manager's stop: the normal end
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.state.snapshot.close()
