"""The HTTP API: a thin layer that authenticates, validates, writes rows and queues work.

Serve it with a WSGI server: ``gunicorn 'rgrid.api:create_app()'``.
"""

from __future__ import annotations

import hmac

import botocore.exceptions
import redis.exceptions
from flask import Flask, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException

from rgrid.api.common import MAX_REQUEST_BYTES
from rgrid.api.schemas import openapi
from rgrid.core import metrics as rgrid_metrics
from rgrid.core.config import Settings, get_settings
from rgrid.core.errors import RGridError, ServiceUnavailable
from rgrid.core.queueing import create_celery_app
from rgrid.service.context import server_services


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__)
    # The largest valid request is a 1 MiB script as JSON (escaping can double it) with its
    # requirements and arguments; anything larger is refused before it is read.
    app.config["MAX_CONTENT_LENGTH"] = MAX_REQUEST_BYTES
    # The services only: the API loads neither the pipeline nor docker-py, and queues work by
    # task name through a Celery app that imports no tasks.
    app.extensions["rgrid"] = server_services(settings)
    app.extensions["rgrid.celery"] = create_celery_app()
    rgrid_metrics.define()

    from rgrid.api.batches import bp as batches_bp
    from rgrid.api.blobs import bp as blobs_bp
    from rgrid.api.cache import bp as cache_bp
    from rgrid.api.executions import bp as executions_bp

    app.register_blueprint(executions_bp, url_prefix="/v1")
    app.register_blueprint(blobs_bp, url_prefix="/v1")
    app.register_blueprint(batches_bp, url_prefix="/v1")
    app.register_blueprint(cache_bp, url_prefix="/v1")
    _answer_errors(app)
    _own_routes(app, settings)
    return app


def _answer_errors(app: Flask) -> None:
    """Every error as a one-line JSON ``error``; an outage of a service the API needs as a
    503 (which a client retries), never a 500."""

    @app.errorhandler(RGridError)
    def _rgrid_error(exc: RGridError):
        if isinstance(exc, ServiceUnavailable):
            app.logger.warning("service unavailable: %s", exc.message)
            return jsonify(error=exc.summary), exc.http_status
        return jsonify(error=exc.message), exc.http_status

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    def _redis_down(exc: Exception):
        # A client following a run retries a 503; a 500 would end its wait for nothing.
        app.logger.warning("redis unavailable: %s", exc)
        return jsonify(error="the queue and log service (Redis) is unavailable"), 503

    @app.errorhandler(botocore.exceptions.EndpointConnectionError)
    @app.errorhandler(botocore.exceptions.ConnectionClosedError)
    def _store_down(exc: Exception):
        app.logger.warning("object store unavailable: %s", exc)
        return jsonify(error="the object store is unavailable"), 503

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return jsonify(error=exc.description), exc.code


def _own_routes(app: Flask, settings: Settings) -> None:
    """The routes outside the blueprints: health, the OpenAPI document, metrics."""

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/v1/openapi.json")
    def openapi_document():
        return jsonify(openapi(app))

    @app.get("/metrics")
    def metrics():
        """For the operator's Prometheus only: with RGRID_METRICS_TOKEN set, that bearer
        token is required; without it, only a scraper on this host (loopback) is answered."""
        token = settings.metrics_token
        if token:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), token.encode()):
                return jsonify(error="metrics need the operator's token"), 401
        elif request.remote_addr not in ("127.0.0.1", "::1"):
            return jsonify(error="not found"), 404
        # Every gunicorn process's counters (multiprocess mode), and the cache gauges read
        # from the database now: any process answers with the same numbers.
        collector = rgrid_metrics.DatabaseCacheCollector(app.extensions["rgrid"].session_factory)
        return rgrid_metrics.exposition(collector), 200, {"Content-Type": CONTENT_TYPE_LATEST}
