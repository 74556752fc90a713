"""The browser's way in: the associate desk and the admin console over HTTP, JSON and a WebSocket.

Handlers are thin adapters over the same core the gRPC services use (core/); sign-in goes through
the same Authenticator (api/auth.py). Static pages ship in static/ (no build step, no internet).
"""

from .server import HttpServer

__all__ = ["HttpServer"]
