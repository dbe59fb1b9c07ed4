"""JSON schemas, regexes and prompts shared by the structured-output tests and benchmark."""

from __future__ import annotations

SCHEMAS: dict[str, dict] = {
    "person": {  # nested objects, required fields
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                         "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"], "additionalProperties": False},
        },
        "required": ["name", "address"], "additionalProperties": False,
    },
    "weather": {  # enums, bounded numbers
        "type": "object",
        "properties": {"sky": {"enum": ["sunny", "cloudy", "rainy"]},
                       "celsius": {"type": "number", "minimum": -40, "maximum": 50},
                       "wind": {"type": "integer", "minimum": 0, "maximum": 12}},
        "required": ["sky", "celsius", "wind"], "additionalProperties": False,
    },
    "shopping": {  # arrays with bounds
        "type": "object",
        "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 4,
                                 "items": {"type": "object",
                                           "properties": {"item": {"type": "string", "maxLength": 15},
                                                          "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                                           "required": ["item", "qty"], "additionalProperties": False}}},
        "required": ["items"], "additionalProperties": False,
    },
    "review": {  # booleans, optional fields
        "type": "object",
        "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "recommend": {"type": "boolean"},
                       "summary": {"type": "string", "maxLength": 40}},
        "required": ["stars", "recommend"], "additionalProperties": False,
    },
    "event": {  # string formats by pattern, arrays of enums
        "type": "object",
        "properties": {"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
                       "tags": {"type": "array", "items": {"enum": ["work", "family", "sport"]}, "maxItems": 3}},
        "required": ["date", "tags"], "additionalProperties": False,
    },
}

TOPICS = ["a friend", "the weather today", "a shopping trip", "a film", "a meeting", "a holiday", "a new phone",
          "a concert", "a restaurant", "a football match"]


def json_prompt(schema_name: str, topic: str) -> str:
    return f"Answer in JSON ({schema_name}). Describe {topic}."


REGEXES: dict[str, str] = {
    "date": r"20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "email": r"[a-z]{1,10}(\.[a-z]{1,10})?@[a-z]{1,10}\.(com|org|net)",
}
CHOICES = ["positive", "negative", "neutral"]
