"""The JSON-schema allowlist for what vLLM compiles into a grammar: the tools' parameters under a forced
``tool_choice`` or a ``strict`` tool, and a ``json_schema`` response format must keep to plain structure
(``SCHEMA_KEYWORDS``); keywords that only annotate (``SCHEMA_ANNOTATIONS``) are checked and left out."""

from __future__ import annotations

import re
from typing import Any

from gateway.validation.checks import (
    Check,
    Replace,
    boolean,
    integer,
    list_of,
    number,
    one_of,
    reject,
    string,
)

# A forced tool choice ("required", or a named function) makes vLLM constrain the output with the tools'
# parameter schemas: guided decoding by another door, and schemas have crashed vLLM's engine when compiled
# (an invalid regex, a bound past 32 bits: vllm#17248, #17894, #47312). Those schemas must then keep to
# plain structure: these keywords, local $refs, bounded numbers; regexes and formats are refused.
SCHEMA_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "items", "enum", "const", "description", "title", "default",
        "examples", "additionalProperties", "anyOf", "oneOf", "allOf", "$defs", "definitions", "$ref",
        "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum", "exclusiveMinimum",
        "exclusiveMaximum", "minProperties", "maxProperties", "nullable", "strict",
    }
)  # fmt: skip
SCHEMA_SUBSCHEMAS = ("items", "additionalProperties")  # a schema (or a boolean, for additionalProperties)
SCHEMA_MAPS = ("properties", "$defs", "definitions")  # name -> schema
SCHEMA_LISTS = ("anyOf", "oneOf", "allOf")
SCHEMA_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
SCHEMA_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
SCHEMA_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
SCHEMA_TYPE = one_of(
    {"string": string(16, SCHEMA_TYPES), "list of strings": list_of(string(16, SCHEMA_TYPES), 7)},
    message="must be a JSON type or a list of them",
)
SCHEMA_BOUND = 2**31 - 1
SCHEMA_MAX_COUNT = 4096
CYCLE_SHOWN = 8  # links of a reference cycle an error names
LOCAL_REF = re.compile(r"#/(\$defs|definitions)/[A-Za-z0-9_.-]{1,128}")
_bound = number(-SCHEMA_BOUND, SCHEMA_BOUND)
_count = integer(0, SCHEMA_MAX_COUNT)
_required = list_of(string(256), 1024)
_property_name = string(256)


def _local_ref(value: Any, path: str) -> None:
    if not isinstance(value, str) or LOCAL_REF.fullmatch(value) is None:
        reject(path, "must be a local reference (#/$defs/<name>)")


def _discriminator(value: Any, path: str) -> None:
    """OpenAPI's discriminator (pydantic's discriminated unions): the property naming the branch, and
    optionally which definition each of its values picks."""
    if not isinstance(value, dict):
        reject(path, "must be an object")
    for key, item in value.items():
        if key == "propertyName":
            _property_name(item, f"{path}.{key}")
        elif key == "mapping":
            if not isinstance(item, dict) or len(item) > 1024:
                reject(f"{path}.{key}", "must map at most 1024 values to local references")
            for name, ref in item.items():
                _local_ref(ref, f"{path}.{key}.{name}")
        else:
            reject(f"{path}.{key}", "is not a supported field")
    if "propertyName" not in value:
        reject(f"{path}.propertyName", "is required")


# Keywords that only annotate a schema (pydantic's Field(deprecated=True), discriminated unions, the
# "$schema" that zod-to-json-schema writes): accepted, checked, and left out of the schema vLLM compiles.
# They never change which outputs match, but not every backend ignores them: llguidance (vLLM's
# "guidance" backend, and "auto"'s fallback from xgrammar) refuses a key it does not know ("Unimplemented
# keys"), and knows neither "deprecated" nor "discriminator", and "$schema" steers its draft detection.
# Left out, the grammar is the same on every backend and nothing new reaches the compiler.
SCHEMA_ANNOTATIONS: dict[str, Check] = {
    "$schema": string(256),
    "$comment": string(4096),
    "deprecated": boolean,
    "readOnly": boolean,
    "writeOnly": boolean,
    "discriminator": _discriminator,
}


def forced_schema(value: Any, path: str) -> None:
    """A tool's parameters when vLLM will compile them into a grammar (see SCHEMA_KEYWORDS)."""
    if isinstance(value, bool):
        return
    if not isinstance(value, dict):
        reject(path, "must be a JSON schema object")
    annotations: list[str] = []
    for key, item in value.items():
        where = f"{path}.{key}"
        if key not in SCHEMA_KEYWORDS:
            annotation = SCHEMA_ANNOTATIONS.get(key)
            if annotation is None:
                reject(where, "is not accepted in a schema that vLLM compiles into a grammar")
            annotation(item, where)
            annotations.append(key)
        elif key in SCHEMA_SUBSCHEMAS:
            forced_schema(item, where)
        elif key in SCHEMA_MAPS:
            if not isinstance(item, dict):
                reject(where, "must map names to schemas")
            for name, sub in item.items():
                forced_schema(sub, f"{where}.{name}")
        elif key in SCHEMA_LISTS:
            _subschemas(item, where)
        elif key in SCHEMA_BOUNDS:
            _bound(item, where)
        elif key in SCHEMA_COUNTS:
            replaced = _count(item, where)
            if type(replaced) is Replace:  # 5.0: compiled as the integer it is
                value[key] = replaced.value
        elif key == "$ref":
            _local_ref(item, where)
        elif key == "type":
            SCHEMA_TYPE(item, where)
        elif key == "required":
            _required(item, where)
    for key in annotations:
        del value[key]


_subschemas = list_of(forced_schema, 64, min_items=1)


def compiled_schema(value: Any, path: str) -> None:
    """A whole schema vLLM will compile: its keywords (``forced_schema``), and its local references, each
    of which must name a definition, and none of which may lead back to itself without passing through an
    object's properties or an array's items (a rule made only of itself has no end to compile to)."""
    forced_schema(value, path)
    if not isinstance(value, dict):
        return
    defs = {
        f"#/{section}/{name}": sub
        for section in ("$defs", "definitions")
        for name, sub in value.get(section, {}).items()
    }
    for ref in _refs(value):
        if ref not in defs:
            reject(f"{path}.$ref", f"names no definition of this schema ({ref})")
    direct = {ref: list(dict.fromkeys(_direct_refs(sub))) for ref, sub in defs.items()}
    done: set[str] = set()
    for start in direct:
        _no_cycle(start, direct, done, path)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for item in node.values() for ref in _refs(item)]
    if isinstance(node, list):
        return [ref for item in node for ref in _refs(item)]
    return []


def _direct_refs(node: Any) -> list[str]:
    """The references a schema stands for without a level of structure in between (``$ref`` and the
    combinators): a cycle of these is a rule defined only by itself."""
    if not isinstance(node, dict):
        return []
    found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
    return found + [ref for key in SCHEMA_LISTS for sub in node.get(key, ()) for ref in _direct_refs(sub)]


def _no_cycle(start: str, direct: dict[str, list[str]], done: set[str], path: str) -> None:
    """Refuse a cycle of direct references reachable from ``start``; add what was checked to ``done``.

    Depth first without recursion, each definition and each reference once: a chain of thousands of
    ``$ref`` adds no JSON nesting, so it overflowed Python's stack when this recursed (a 500), and copying
    the trail at every reference cost half a second of the event loop for a 1 MiB schema."""
    if start in done:
        return
    trail, on_trail = [start], {start}
    pending = [iter(direct.get(start, ()))]
    while pending:
        target = next(pending[-1], None)
        if target is None:
            pending.pop()
            finished = trail.pop()
            on_trail.discard(finished)
            done.add(finished)
        elif target in on_trail:
            cycle = [*trail[trail.index(target) :], target]
            if len(cycle) > CYCLE_SHOWN:  # the answer names a long cycle's ends, not thousands of links
                cycle[CYCLE_SHOWN // 2 : -CYCLE_SHOWN // 2] = [f"({len(cycle) - CYCLE_SHOWN} more)"]
            reject(f"{path}.$ref", f"refers back to itself with nothing in between ({' -> '.join(cycle)})")
        elif target not in done:
            trail.append(target)
            on_trail.add(target)
            pending.append(iter(direct.get(target, ())))


def tools_forced_check(payload: dict[str, Any], *, every_tool_compiled: bool = False) -> None:
    """When vLLM will compile the tools' parameters into a grammar, each must be a schema it can compile
    safely: with a forced tool_choice, and (vLLM's structural tags) with ``auto`` when any tool is
    ``strict``, as the openai SDK's ``pydantic_function_tool`` and ``parse(tools=...)`` make them, or, on
    an upstream that enforces strict tool calling (``every_tool_compiled``), with ``auto`` always."""
    choice = payload.get("tool_choice")
    if choice == "none":
        return
    strict = every_tool_compiled or any(tool["function"].get("strict") for tool in payload["tools"])
    if choice in (None, "auto") and not strict:
        return
    for index, tool in enumerate(payload.get("tools") or ()):
        parameters = tool["function"].get("parameters")
        if parameters is not None:
            compiled_schema(parameters, f"tools[{index}].function.parameters")
