"""Generated from proto/cuepoint/v1 by scripts/gen_protos.py. Do not edit."""
