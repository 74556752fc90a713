"""Cuepoint server: scenario engine, engagement routing and the gRPC API over them."""

__version__ = "0.1.0"
