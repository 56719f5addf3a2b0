"""The REST routes: one module and one ``APIRouter`` per OpenAPI tag, included by ``create_app`` in ``ROUTERS`` order.

A route reads what the app holds through ``request.app.state`` (``deps``): the service (``svc``),
the settings, the authenticator and the transfer semaphore, all set by ``create_app`` and its
lifespan. The caller's ``Principal`` is a FastAPI dependency (``deps.Caller``).
"""

from . import blocks, health, pins, retrieval, specs, stats

ROUTERS = (health.router, specs.router, blocks.router, retrieval.router, pins.router, stats.router)

__all__ = ["ROUTERS"]
