"""Scenario files: the admin-facing language for when and how to engage."""
