"""JSON Schema of scenario files, generated from the models so it cannot drift.

Committed as scenarios/scenario.schema.json for editors (YAML language
servers read `# yaml-language-server: $schema=...`); a test regenerates it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import TypeAdapter

from .model import ScenarioFile, ScenarioSpec

__all__ = ["scenario_schema", "scenario_schema_text"]


def scenario_schema() -> dict[str, Any]:
    adapter: TypeAdapter[Any] = TypeAdapter(ScenarioSpec | list[ScenarioSpec] | ScenarioFile)
    schema = adapter.json_schema(by_alias=True, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://cuepoint.dev/schemas/scenario.v1.json",
        "title": "Cuepoint scenario file",
        "description": "One scenario, a list of scenarios, or {scenarios: [...]}.",
        **schema,
    }


def scenario_schema_text() -> str:
    return json.dumps(scenario_schema(), indent=2, sort_keys=True) + "\n"
