"""Per-device state and scenario evaluation; no I/O, no gRPC."""
