"""Experiment configuration: defaults and validation against the JSON schema.

The schema is ``workflow/schemas/config.schema.yaml`` (JSON Schema written in YAML,
every key with a description and a default). :func:`validate_config` fills defaults and
reports the *first* problems as one readable message per key, naming the key path
(``spa.symmetry``) and the allowed values, instead of a validator traceback.
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from .errors import InputError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


def load_schema(path=None) -> dict:
    """The config schema as a dict."""
    path = Path(path or SCHEMA_PATH)
    with open(path) as fh:
        return yaml.safe_load(fh)


def load_yaml(path) -> dict:
    """Read a YAML config file with a clear error for syntax problems."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "config file does not exist", "copy config/spa_example.yaml or config/spi_example.yaml and edit it")
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML ({exc})", "fix the indentation or quoting at the line shown") from None
    if not isinstance(data, dict):
        raise InputError(path, "the config must be a mapping of keys to values", "see config/README.md")
    return data


def _fill_defaults(node: dict, schema: dict) -> dict:
    props = schema.get("properties", {})
    for key, sub in props.items():
        if key not in node and "default" in sub:
            node[key] = copy.deepcopy(sub["default"])
        val = node.get(key)
        if isinstance(val, dict) and "properties" in sub:
            _fill_defaults(val, sub)
    return node


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _describe(error) -> str:
    key = _key(error.absolute_path)
    schema = error.schema
    v = error.validator
    if v == "additionalProperties":
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        where = _key(error.absolute_path)
        return (f"unknown key {', '.join(repr(e) for e in extra)} under {where}; "
                f"allowed keys: {', '.join(allowed)}")
    if v == "enum":
        allowed = ", ".join("null" if a is None else str(a) for a in schema["enum"])
        return f"config key '{key}': {error.instance!r} is not allowed; allowed values: {allowed}"
    if v == "required":
        return f"config section '{key}' is missing a required key: {error.message.split(' is a required')[0]}"
    if v == "pattern":
        desc = schema.get("description", "")
        return f"config key '{key}': {error.instance!r} is not allowed. {desc}".strip()
    if v == "type":
        t = schema["type"]
        t = " or ".join(t) if isinstance(t, list) else t
        return f"config key '{key}': {error.instance!r} should be of type {t}"
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        return f"config key '{key}': {error.message}. {schema.get('description', '')}".strip()
    return f"config key '{key}': {error.message}"


def validate_config(config: dict, schema: dict | None = None, source: str | None = None) -> dict:
    """Fill defaults into a copy of ``config`` and validate it.

    Raises
    ------
    InputError
        Naming the config file (``source``), every offending key and the allowed values.
    """
    import jsonschema

    schema = schema or load_schema()
    cfg = _fill_defaults(copy.deepcopy(config), schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        lines = []
        for err in errors:
            # for nullable sections, report the object branch's problems, not the "null" branch
            if err.validator in ("anyOf", "oneOf") and err.context:
                err = err.context[0]
            msg = _describe(err)
            if msg not in lines:
                lines.append(msg)
        raise InputError(source or "config", "; ".join(lines[:5]), "see config/README.md for every key and its allowed values")
    return cfg


def iter_keys(schema: dict | None = None, prefix: str = ""):
    """Yield ``(dotted_key, type, default, description)`` for every key of the schema."""
    schema = schema or load_schema()
    for key, sub in schema.get("properties", {}).items():
        dotted = f"{prefix}{key}"
        t = sub.get("type", "")
        t = " or ".join(t) if isinstance(t, list) else t
        if "enum" in sub:
            t = ", ".join("null" if e is None else str(e) for e in sub["enum"])
        default = sub.get("default", "(required)")
        desc = " ".join(str(sub.get("description", "")).split())
        yield dotted, t, default, desc
        if "properties" in sub:
            yield from iter_keys(sub, prefix=dotted + ".")


def markdown_table(schema: dict | None = None) -> str:
    """A Markdown table of every config key (key, type/allowed, default, meaning)."""
    rows = ["| key | type / allowed | default | meaning |", "|---|---|---|---|"]
    for key, t, default, desc in iter_keys(schema):
        d = "null" if default is None else ("(required)" if default == "(required)" else f"`{default}`")
        if default == {}:
            d = ""
        rows.append(f"| `{key}` | {t} | {d} | {desc} |")
    return "\n".join(rows) + "\n"
