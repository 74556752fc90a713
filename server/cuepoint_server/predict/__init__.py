"""Predictive scores: per declared outcome, P(outcome reached within the session | journey so far).

features.py turns what the engine keeps about a device into a feature vector, model.py is one online
model per outcome (river), registry.py keeps the models and the journeys being scored, trainer.py
persists the models and makes sure only one process trains at a time.
"""
