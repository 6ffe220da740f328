"""The HTTP interface (FastAPI), its error replies, and running it under uvicorn.

    POST   /v1/predict        {"adapter": NAME, "inputs": [...]} -> {"adapter": NAME, "outputs": [...]}
    GET    /v1/adapters       the adapters served: name, method, task, path
    POST   /v1/adapters       {"name": NAME, "path": RUN}: serve one more run, while serving
    DELETE /v1/adapters/NAME  stop serving it
    GET    /health            "ok", and what the batcher has done (batches, rows, forward passes)

A refused request gets ``{"error": ..., "hint": ...}`` with a 4xx status; a failure inside the
model is a 500 for the request that caused it alone, and the server goes on.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..core.errors import DeltatuneError
from .batcher import Batcher
from .registry import Registry
from .requests import EXAMPLES, LoadRequest, PredictRequest, Settings, check_inputs, encode

log = logging.getLogger("deltatune.serve")
ROUTES = "POST /v1/predict, GET /v1/adapters, POST /v1/adapters, DELETE /v1/adapters/NAME, GET /health"


def create_app(registry: Registry, settings: Settings = Settings()) -> FastAPI:
    """The server's app over ``registry``; its batcher runs while the app does (its lifespan)."""
    batcher = Batcher(registry, settings.max_batch, settings.max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.close()  # uvicorn has answered the requests in flight; answer what is queued

    app = FastAPI(title="deltatune serve", lifespan=lifespan)
    _add_error_replies(app)

    @app.post("/v1/predict")
    async def predict(request: PredictRequest) -> dict[str, Any]:
        served = registry.get(request.adapter)
        check_inputs(request.inputs, settings)
        outputs = await batcher.submit(served, encode(served, request.inputs))
        return {"adapter": served.name, "outputs": outputs}

    @app.get("/v1/adapters")
    async def adapters() -> dict[str, Any]:
        return {"adapters": registry.describe()}

    @app.post("/v1/adapters", status_code=201)
    async def load(request: LoadRequest) -> dict[str, str]:
        return (await run_in_threadpool(registry.load, request.name, request.path)).describe()

    @app.delete("/v1/adapters/{name}")
    async def unload(name: str) -> dict[str, str]:
        return (await run_in_threadpool(registry.unload, name)).describe()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": registry.base, "adapters": len(registry.adapters),
                "stats": asdict(batcher.stats)}

    return app


def _add_error_replies(app: FastAPI) -> None:
    """Every error as ``{"error": ..., "hint": ...}``."""

    @app.exception_handler(DeltatuneError)
    async def refused(request: Request, error: DeltatuneError) -> JSONResponse:
        # a ServeError carries its status; any other (a run that cannot be loaded) is unprocessable
        return _reply(getattr(error, "status", 422), error.message, error.hint)

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError) -> JSONResponse:
        example = EXAMPLES.get(request.url.path)
        return _reply(400, _first_problem(error.errors()), f"send JSON such as {example}." if example else None)

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, error: HTTPException) -> JSONResponse:
        return _reply(error.status_code, f"{request.method} {request.url.path}: {error.detail}.", f"routes: {ROUTES}.")

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return _reply(500, f"internal error ({type(error).__name__}: {error}).",
                      "the server goes on serving; its log has the traceback.")


def _reply(status: int, message: str, hint: str | None) -> JSONResponse:
    return JSONResponse({"error": message, "hint": hint}, status_code=status)


def _first_problem(errors: list[dict[str, Any]]) -> str:
    """The first of pydantic's validation errors, in words."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})."
    if len(first["loc"]) == 1:  # the body as a whole: not a JSON object, or sent as a form
        return "the body is not a JSON object (send it with Content-Type: application/json)."
    where = ".".join(str(part) for part in first["loc"][1:])
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg'].lower()}{more}."


def serve(base: str | None, adapters: list[tuple[str, str]], host: str = "127.0.0.1", port: int = 8000,
          settings: Settings = Settings(), precision: str | None = None) -> None:
    """Load the adapters, then serve until SIGTERM or Ctrl-C; requests in flight are answered first.

    Args:
        base: the base model (a folder, a bundled name or a run folder); None: the first adapter's run's.
        adapters: (name, run folder) pairs.
        precision: what every adapter computes in; None: each its run's own (auto, fp32, bf16, fp16).

    Raises:
        DeltatuneError: no base model at all, or an adapter that cannot be served.
    """
    import uvicorn

    if base is None and not adapters:
        raise DeltatuneError("serve needs a base model or at least one adapter.",
                             "e.g. deltatune serve --adapter sentiment=runs/default")
    registry = Registry(base or adapters[0][1], precision)
    for name, path in adapters:
        served = registry.load(name, path)
        print(f"loaded {name}: {served.method} {served.task.name} run {served.folder} in {served.instance.key[-1]}",
              file=sys.stderr)
    # uvicorn raises SIGTERM again once it has shut down gracefully: then exit 0, as a finished server
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"serving {len(adapters)} adapter(s) on base {registry.base} at http://{host}:{port} "
          "(Ctrl-C or SIGTERM stops it after answering the requests in flight)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(registry, settings), host=host, port=port, log_level="warning")
