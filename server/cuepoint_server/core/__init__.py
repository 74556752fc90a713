"""The domain core: sessions, evaluation, cues and engagements. Knows nothing of gRPC."""
