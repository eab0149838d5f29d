"""The console: where operators look at findings, coverage and trends, served by the backend under /console.

``setup(app)`` adds its routes (``backend.app.create_app`` calls it). See ``handlers`` for the HTTP side and its
security (sessions, CSRF, headers), ``queries`` for what each page shows, ``operators`` for who may sign in
(``runtime-backend operator create``).
"""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    from backend.console.handlers import add_routes

    add_routes(app)
