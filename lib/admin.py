"""The proxy's admin web app (WSGI): JSON status now; the dashboard grows from here.

    create_admin_app(proxy, config=None) -> flask.Flask
"""
from __future__ import annotations

from flask import Flask, jsonify


def create_admin_app(proxy, config: dict | None = None) -> Flask:
    app = Flask("shroud_proxy", template_folder="../templates")
    app.config.update(config or {})

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/api/status")
    def status():
        snap = proxy.registry.snapshot()
        snap["fingerprint"] = proxy.fingerprint
        return jsonify(snap)

    return app
