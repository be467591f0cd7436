"""The HTTP API: a thin layer that authenticates, validates, writes rows and queues work.

Serve it with a WSGI server: ``gunicorn 'rgrid.api:create_app()'``.
"""

from __future__ import annotations

import botocore.exceptions
import redis.exceptions
from flask import Flask, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from rgrid.config import Settings, get_settings
from rgrid.context import server_services
from rgrid.errors import RGridError
from rgrid.queueing import create_celery_app


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or get_settings()
    app = Flask(__name__)
    # The services only: the API loads neither the pipeline nor docker-py, and queues work by
    # task name through a Celery app that imports no tasks.
    app.extensions["rgrid"] = server_services(settings)
    app.extensions["rgrid.celery"] = create_celery_app()

    from rgrid.api.blobs import bp as blobs_bp
    from rgrid.api.executions import bp as executions_bp

    app.register_blueprint(executions_bp, url_prefix="/v1")
    app.register_blueprint(blobs_bp, url_prefix="/v1")

    @app.errorhandler(RGridError)
    def _rgrid_error(exc: RGridError):
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

    @app.get("/healthz")
    def healthz():
        return jsonify(status="ok")

    @app.get("/metrics")
    def metrics():
        return generate_latest(), 200, {"Content-Type": CONTENT_TYPE_LATEST}

    return app
