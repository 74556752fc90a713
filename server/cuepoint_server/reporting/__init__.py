"""Reporting: funnels per scenario over the store (admin GetFunnel and `cuepoint report`)."""
