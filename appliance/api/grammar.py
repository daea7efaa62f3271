"""Bounded GBNF grammars for JSON answers (`response_format`) and forced tool calls.

We write our own converter for the JSON Schema subset clients send, instead of patching the output
of llama-cpp-python's `json_schema_to_gbnf`, because that converter's flaws are in its structure:
it spells `maxLength: n` as n nested groups (llama.cpp's parser recurses once per group, so one
250-byte request overflowed its stack and killed the daemon), its string characters admit raw
control characters (invalid JSON), it does not escape backslashes in `const`/`enum` literals, and
it raises assorted exceptions. Here every grammar is built so llama.cpp always parses it and every
output it allows is valid JSON that matches the schema:

- repetition is written `x{m,n}` on a named rule or a character class only (llama.cpp then makes
  n flat rules), with n at most `MAX_REPETITIONS`; parentheses nest at most two levels;
- the schema is bounded before any work (`MAX_SCHEMA_NODES`, `MAX_JSON_NESTING`), its nesting
  while converting (`MAX_DEPTH`, which also unrolls a recursive `$ref` to a finite depth), and the
  grammar's size (`MAX_GRAMMAR_BYTES`);
- strings exclude U+0000–U+001F, DEL and lone surrogate escapes; strings, arrays and free objects
  without a bound get a default one, and whitespace is at most a newline and 20 blanks, so a model
  that never chooses to stop (a random-weight one does not) still ends.

A schema past a bound, or using a keyword we cannot enforce (`pattern`, `not`, `uniqueItems`...),
is refused with `InvalidValue` (400) naming the field, e.g.
`response_format.json_schema.schema.properties.name.maxLength`.

The grammar allows a subset of what the schema allows, never more, except where noted: members
come in schema order, required ones first; `oneOf` is taken as `anyOf`; a number with bounds is
written as whole units or a fraction of one whole unit inside them (`0.25` in [0, 1], not `2.5e-1`);
keys of `additionalProperties` members are not kept apart from the declared ones (the one gap).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from appliance.api.schemas import ResponseFormat, Tool
from appliance.errors import InvalidRequest, InvalidValue

MAX_REPETITIONS = 1000  # maxLength, minItems, maxProperties...: llama.cpp makes one rule per unit
MAX_DEPTH = 32  # nested schema nodes (objects, arrays, anyOf, $ref) while converting
MAX_JSON_NESTING = 4 * MAX_DEPTH  # nesting of the schema document itself, checked first
MAX_SCHEMA_NODES = 2000  # dicts, lists and values in the schema document
MAX_GRAMMAR_BYTES = 64 * 1024
MAX_WHITESPACE = 20  # blanks after a newline, as in llama.cpp's grammars/json.gbnf
# Defaults where the schema gives no bound. A random-weight model almost never picks a closing
# quote among ~150k allowed tokens, so an unbounded string only ends at max_tokens.
DEFAULT_MAX_STRING = 1000
DEFAULT_MAX_ITEMS = 100  # array items and free object members
MAX_NUMBER_DIGITS = 16  # integer and fraction digits; a double holds about 16

# Keywords that constrain values in ways a grammar here cannot enforce: refused, not ignored.
UNSUPPORTED = ("not", "if", "then", "else", "patternProperties", "propertyNames",
               "dependentRequired", "dependentSchemas", "dependencies", "contains",
               "unevaluatedProperties", "unevaluatedItems", "uniqueItems", "multipleOf",
               "pattern")
ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment",
               "$defs", "definitions", "deprecated", "readOnly", "writeOnly", "format",
               "nullable", "strict"}

SPACE = f'| " " | "\\n" [ \\t]{{0,{MAX_WHITESPACE}}}'
# One decoded character of a JSON string: no control characters, DEL or lone surrogate escapes
# (llama.cpp's json.gbnf does the same but for surrogates).
CHAR = ('[^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" hex-non-surrogate)')
HEX_NON_SURROGATE = ('[0-9a-cA-CeEfF] [0-9a-fA-F]{3} | [dD] [0-7] [0-9a-fA-F]{2}')
INTEGER = f'"-"? ("0" | [1-9] [0-9]{{0,{MAX_NUMBER_DIGITS - 1}}})'
# An exponent of at most two digits keeps every number a finite double.
NUMBER = (f'{INTEGER} ("." [0-9]{{1,{MAX_NUMBER_DIGITS}}})? ([eE] [-+]? [0-9]{{1,2}})?')
FORMATS = {  # string formats we enforce; others are annotations and stay plain strings
    "date": '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])',
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{3})? '
             '("Z" | [+-] ([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9])'),
    "uuid": ' "-" '.join(f"[0-9a-fA-F]{{{n}}}" for n in (8, 4, 4, 4, 12)),
}
FORMATS["date-time"] = f'{FORMATS["date"]} "T" {FORMATS["time"]}'


def response_grammar(fmt: ResponseFormat | None) -> str | None:
    """GBNF that forces the output into the requested JSON shape (None for plain text)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return schema_grammar({"type": "object"}, "response_format")
    if fmt.json_schema is None:
        raise InvalidRequest("response_format json_schema needs a json_schema object",
                             param="response_format.json_schema")
    return schema_grammar(fmt.json_schema.schema_ or {"type": "object"},
                          "response_format.json_schema.schema")


def schema_grammar(schema: dict, param: str) -> str:
    """GBNF for one JSON value matching `schema`; `param` names the schema in errors."""
    rules = _Rules(param)
    rules.set_root(_Converter(schema, param, rules).root())
    return rules.text()


def tool_call_grammar(tools: list[Tool], name: str | None,
                      where: str = "tools.{}.function.parameters") -> str:
    """GBNF for one `<tool_call>\\n{json}\\n</tool_call>` calling `name` (or any of the tools);
    `where` names tool i's schema in errors, as the dialect's request spells it."""
    chosen = [(i, t) for i, t in enumerate(tools) if name is None or t.function.name == name]
    if not chosen:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools",
                             param="tool_choice")
    rules = _Rules("tools")
    calls = []
    for i, tool in chosen:
        param = where.format(i)
        rules.param = param
        schema = tool.function.parameters or {"type": "object"}  # arguments are an object
        arguments = _Converter(schema, param, rules).root()
        calls.append(f'"{{" space {_literal(json.dumps("name"))} space ":" space '
                     f'{_json_literal(tool.function.name)} space "," space '
                     f'{_literal(json.dumps("arguments"))} space ":" space {arguments} '
                     f'"}}" space')
    rules.param = "tools"
    rules.set_root('"<tool_call>\\n" ' + rules.add("call", " | ".join(calls))
                   + ' "\\n</tool_call>"')
    return rules.text()


# -- GBNF text ---------------------------------------------------------------------------------

def _literal(text: str) -> str:
    """A GBNF string literal matching `text` exactly."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _has_type(value: Any, kind: Any) -> bool:
    """Whether a JSON value has a JSON schema type (an unknown type name: no value has it)."""
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    types = {"string": str, "boolean": bool, "object": dict, "array": list,
             "null": type(None)}
    return isinstance(kind, str) and kind in types and isinstance(value, types[kind])


def _json_literal(value: Any) -> str:
    """A GBNF literal for `value` written as JSON (non-ASCII kept, lone surrogates escaped)."""
    text = json.dumps(value, ensure_ascii=False)
    text = re.sub("[\ud800-\udfff]", lambda m: f"\\u{ord(m.group()):04x}", text)
    return _literal(text)


class _Rules:
    """Named GBNF rules; equal bodies share one name; the total size is bounded."""

    def __init__(self, param: str) -> None:
        self.param = param  # named when the grammar grows too large
        self.bodies: dict[str, str] = {}
        self._names: dict[str, str] = {}
        self._size = 0
        for name, body in (("space", SPACE), ("char", CHAR), ("hex-non-surrogate",
                           HEX_NON_SURROGATE)):
            self.add(name, body)

    def add(self, hint: str, body: str) -> str:
        if body in self._names:
            return self._names[body]
        base = re.sub(r"[^a-zA-Z0-9-]+", "-", hint).strip("-")[:40] or "r"
        base = "root-value" if base == "root" else base
        name, n = base, 1
        while name in self.bodies:
            n += 1
            name = f"{base}-{n}"
        self._grow(name, body)
        self.bodies[name] = body
        self._names[body] = name
        return name

    def _grow(self, name: str, body: str) -> None:
        self._size += len(name.encode()) + len(body.encode()) + 5
        if self._size > MAX_GRAMMAR_BYTES:
            raise InvalidValue(f"the schema needs a grammar larger than {MAX_GRAMMAR_BYTES} bytes; "
                               "simplify it", param=self.param)

    def set_root(self, body: str) -> None:
        self._grow("root", body)
        self.bodies["root"] = body  # add() never names a rule "root"

    def text(self) -> str:
        return "".join(f"{name} ::= {body}\n" for name, body in self.bodies.items())


# -- numbers -----------------------------------------------------------------------------------

def _same_length(lo: str, hi: str) -> list[str]:
    """GBNF sequences matching the decimal numbers from lo to hi, both of the same length."""
    if lo == hi:
        return [_literal(lo)]
    rest = len(lo) - 1
    a, b = int(lo[0]), int(hi[0])
    head = f"[{a}-{b}]" if a != b else f'"{a}"'
    tail = f" [0-9]{{{rest}}}" if rest else ""
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:
        return [head + tail]
    if a == b:
        return [f'"{a}" {s}' for s in _same_length(lo[1:], hi[1:])]
    alts = [f'"{a}" {s}' for s in _same_length(lo[1:], "9" * rest)]
    if b - a > 1:
        alts.append(f"[{a + 1}-{b - 1}]{tail}")
    alts += [f'"{b}" {s}' for s in _same_length("0" * rest, hi[1:])]
    return alts


def _natural_range(lo: int, hi: int) -> list[str]:
    """GBNF sequences matching the integers lo..hi (0 <= lo <= hi), without leading zeros."""
    alts: list[str] = []
    if lo == 0:
        alts.append('"0"')
        lo = 1
    full: list[int] = []  # lengths n whose numbers 10^(n-1)..10^n-1 are all in range
    while lo <= hi:
        n = len(str(lo))
        top = min(hi, 10 ** n - 1)
        if lo == 10 ** (n - 1) and top == 10 ** n - 1:
            full.append(n)
        else:
            alts += _same_length(str(lo), str(top))
        lo = top + 1
    if full:  # consecutive lengths: one rule
        alts.append(f"[1-9] [0-9]{{{full[0] - 1},{full[-1] - 1}}}")
    return alts


def _integer_range(lo: int, hi: int) -> list[str]:
    alts = _natural_range(max(lo, 0), hi) if hi >= 0 else []
    if lo < 0:
        alts += [f'"-" {s}' for s in _natural_range(max(1, -hi), -lo)]
    return alts


# -- schemas -----------------------------------------------------------------------------------

class _Converter:
    """Walks one schema document into `rules`; `root()` returns the rule for its value."""

    def __init__(self, schema: Any, param: str, rules: _Rules) -> None:
        self.doc = schema
        self.param = param
        self.rules = rules
        self._memo: dict[tuple[str, int], str | None] = {}
        self._free: dict[int, str] = {}
        self._check_size(schema)

    def fail(self, path: tuple, message: str) -> InvalidValue:
        return InvalidValue(message, param=".".join([self.param, *map(str, path)]))

    def _check_size(self, schema: Any) -> None:
        # Iterative: a schema nested 100,000 deep must not reach Python's recursion limit.
        nodes = 0
        stack: list[tuple[Any, tuple]] = [(schema, ())]
        while stack:
            node, path = stack.pop()
            nodes += 1
            if nodes > MAX_SCHEMA_NODES:
                raise self.fail((), f"the schema has more than {MAX_SCHEMA_NODES} nodes")
            if len(path) > MAX_JSON_NESTING:
                raise self.fail(path, f"the schema nests deeper than {MAX_JSON_NESTING} levels")
            if isinstance(node, dict):
                stack += [(v, (*path, k)) for k, v in node.items()]
            elif isinstance(node, list):
                stack += [(v, (*path, i)) for i, v in enumerate(node)]

    def root(self) -> str:
        try:
            rule = self.visit(self.doc, (), 0, ())
        except RecursionError:
            raise self.fail((), "the schema nests too deeply") from None
        if rule is None:
            raise self.fail((), "no finite JSON value matches this schema")
        return rule

    # Each visit returns a rule name, or None when no value can match within MAX_DEPTH (only a
    # recursive $ref cut at the depth bound; the caller drops that alternative).
    def visit(self, schema: Any, path: tuple, depth: int, refs: tuple[str, ...]) -> str | None:
        if depth >= MAX_DEPTH:
            if len(set(refs)) < len(refs):  # inside a recursive $ref: stop unrolling here
                return None
            raise self.fail(path, f"the schema nests deeper than {MAX_DEPTH} levels")
        if schema is True or schema == {}:
            return self.free_value(depth)
        if schema is False:
            return None
        if not isinstance(schema, dict):
            raise self.fail(path, "a schema must be an object or a boolean")
        for key in UNSUPPORTED:
            if key in schema and not (key == "uniqueItems" and schema[key] is False):
                raise self.fail((*path, key), f"{key!r} is not supported in a JSON schema for "
                                              "constrained output")
        if "$ref" in schema:
            return self.ref(schema["$ref"], (*path, "$ref"), depth, refs)
        for key in ("anyOf", "oneOf"):  # oneOf as anyOf: each alternative alone is valid
            if key in schema:
                return self.union(schema, key, path, depth, refs)
        if "allOf" in schema:
            return self.visit(self.merge_all_of(schema, path), path, depth + 1, refs)
        if "const" in schema or "enum" in schema:
            key = "const" if "const" in schema else "enum"
            values = [schema["const"]] if key == "const" else schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.fail((*path, "enum"), "enum must be a non-empty array")
            # A `type` beside them still holds: {"type": "string", "enum": [1]} allows nothing.
            kinds = schema.get("type")
            if kinds is not None:
                kinds = kinds if isinstance(kinds, list) else [kinds]
                values = [v for v in values if any(_has_type(v, k) for k in kinds)]
                if not values:
                    raise self.fail((*path, key), f"no {key} value has the schema's type")
            return self.rules.add(key, "(" + " | ".join(map(_json_literal, values)) + ") space")
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind:
                raise self.fail((*path, "type"), "type must not be an empty array")
            alts = [self.visit({**schema, "type": t}, path, depth + 1, refs) for t in kind]
            return self.alternatives("types", [a for a in alts if a is not None])
        if kind is None:
            kind = self.infer_type(schema)
        return self.typed(kind, schema, path, depth, refs)

    def infer_type(self, schema: dict) -> str | None:
        if {"properties", "additionalProperties", "required", "minProperties",
                "maxProperties"} & schema.keys():
            return "object"
        if {"items", "prefixItems", "minItems", "maxItems"} & schema.keys():
            return "array"
        if {"minLength", "maxLength"} & schema.keys():
            return "string"
        if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & schema.keys():
            return "number"
        return None

    def typed(self, kind: str | None, schema: dict, path: tuple, depth: int,
              refs: tuple[str, ...]) -> str | None:
        if kind is None:
            return self.free_value(depth)
        if kind == "object":
            return self.object(schema, path, depth, refs)
        if kind == "array":
            return self.array(schema, path, depth, refs)
        if kind == "string":
            return self.string(schema, path)
        if kind in ("integer", "number"):
            return self.number(kind, schema, path)
        if kind == "boolean":
            return self.rules.add("boolean", '("true" | "false") space')
        if kind == "null":
            return self.rules.add("null", '"null" space')
        raise self.fail((*path, "type"), f"unknown type {kind!r}")

    def alternatives(self, hint: str, names: list[str]) -> str | None:
        if not names:
            return None
        return names[0] if len(names) == 1 else self.rules.add(hint, " | ".join(names))

    def union(self, schema: dict, key: str, path: tuple, depth: int,
              refs: tuple[str, ...]) -> str | None:
        options = schema[key]
        if not isinstance(options, list) or not options:
            raise self.fail((*path, key), f"{key} must be a non-empty array")
        constraining = schema.keys() - ANNOTATIONS - {key}
        if constraining:
            raise self.fail((*path, sorted(constraining)[0]),
                            f"keywords beside {key} are not supported; move them into each "
                            "alternative")
        alts = [self.visit(o, (*path, key, i), depth + 1, refs) for i, o in enumerate(options)]
        return self.alternatives(key, [a for a in alts if a is not None])

    def resolve(self, ref: Any, path: tuple) -> tuple[Any, tuple]:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise self.fail(path, "only local references ('#' or '#/...') are supported")
        node, where = self.doc, ()
        for part in ref[2:].split("/") if ref != "#" else ():
            key = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            elif isinstance(node, dict) and key in node:
                node = node[key]
            else:
                raise self.fail(path, f"$ref {ref!r} points at nothing in the schema")
            where = (*where, key)
        return node, where

    def ref(self, ref: Any, path: tuple, depth: int, refs: tuple[str, ...]) -> str | None:
        target, where = self.resolve(ref, path)
        key = (ref, depth)
        if key not in self._memo:
            self._memo[key] = self.visit(target, where, depth + 1, (*refs, ref))
        return self._memo[key]

    def merge_all_of(self, schema: dict, path: tuple) -> dict:
        """allOf of object schemas, merged into one object schema."""
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise self.fail((*path, "allOf"), "allOf must be a non-empty array")
        merged: dict[str, Any] = {"type": "object", "properties": {}, "required": []}
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        for i, part in enumerate([rest, *parts]):
            where = (*path, "allOf", i - 1) if i else path
            hops = 0
            while isinstance(part, dict) and "$ref" in part:
                part, where = self.resolve(part["$ref"], (*where, "$ref"))
                hops += 1
                if hops > MAX_DEPTH:
                    raise self.fail(where, "a chain of $ref goes round in a circle")
            if not isinstance(part, dict) or (part.get("type", "object") != "object"
                                              or part.keys() - ANNOTATIONS - {
                                                  "type", "properties", "required",
                                                  "additionalProperties"}):
                raise self.fail(where, "allOf is supported for object schemas with "
                                       "properties, required and additionalProperties only")
            props = part.get("properties", {})
            if not isinstance(props, dict):
                raise self.fail((*where, "properties"), "properties must be an object")
            merged["properties"].update(props)
            merged["required"] += [r for r in self.required(part, where)
                                   if r not in merged["required"]]
            if "additionalProperties" in part:
                merged["additionalProperties"] = part["additionalProperties"]
        return merged

    # -- values --------------------------------------------------------------------------------

    def count(self, schema: dict, key: str, path: tuple) -> int | None:
        value = schema.get(key)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail((*path, key), f"{key} must be a non-negative integer")
        if value > MAX_REPETITIONS:
            raise self.fail((*path, key), f"{key} is {value}; at most {MAX_REPETITIONS} "
                                          "is supported")
        return value

    def bounds(self, schema: dict, path: tuple, low: str, high: str,
               default: int) -> tuple[int, int]:
        lo = self.count(schema, low, path) or 0
        hi = self.count(schema, high, path)
        hi = max(default, lo) if hi is None else hi
        if lo > hi:
            raise self.fail((*path, low), f"{low} is greater than {high}")
        return lo, hi

    def repeat(self, item: str, lo: int, hi: int) -> str:
        return "" if hi == 0 else f"{item}{{{lo},{hi}}}"

    def string(self, schema: dict, path: tuple) -> str:
        fmt = schema.get("format")
        if fmt in FORMATS:
            body = self.rules.add(fmt, FORMATS[fmt])
            return self.rules.add(f"{fmt}-string", f'"\\"" {body} "\\"" space')
        lo, hi = self.bounds(schema, path, "minLength", "maxLength", DEFAULT_MAX_STRING)
        return self.rules.add("string", f'"\\"" {self.repeat("char", lo, hi)} "\\"" space')

    def number(self, kind: str, schema: dict, path: tuple) -> str:
        schema = dict(schema)
        for side in ("Minimum", "Maximum"):  # draft 4: exclusiveMinimum is a flag on minimum
            flag = schema.get(f"exclusive{side}")
            if isinstance(flag, bool):
                bound = schema.pop(side.lower(), None)
                del schema[f"exclusive{side}"]
                if flag and bound is not None:
                    schema[f"exclusive{side}"] = bound
        keys = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
        for key in keys:
            value = schema.get(key)
            if key in schema and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
                raise self.fail((*path, key), f"{key} must be a number")
        if not any(k in schema for k in keys):
            return self.rules.add(kind, f"{INTEGER if kind == 'integer' else NUMBER} space")
        limit = 10 ** MAX_NUMBER_DIGITS - 1
        # lo..hi bound the value; ilo..ihi are the integers that satisfy both bounds.
        lo = max(schema.get("minimum", -limit - 1), schema.get("exclusiveMinimum", -limit - 1))
        hi = min(schema.get("maximum", limit + 1), schema.get("exclusiveMaximum", limit + 1))
        ilo, ihi = math.ceil(lo), math.floor(hi)
        if "exclusiveMinimum" in schema and ilo == schema["exclusiveMinimum"]:
            ilo += 1
        if "exclusiveMaximum" in schema and ihi == schema["exclusiveMaximum"]:
            ihi -= 1
        ilo, ihi = max(ilo, -limit), min(ihi, limit)
        alts = _integer_range(ilo, ihi) if ilo <= ihi else []
        if kind == "number":
            # n.f lies in [n, n+1) and -n.f in (-n-1, -n]: only whole units inside the bounds.
            frac = f' "." [0-9]{{1,{MAX_NUMBER_DIGITS}}}'
            first, last = max(ilo, 0), min(math.floor(hi) - 1, limit)
            if first <= last:
                alts += [f"{s}{frac}" for s in _natural_range(first, last)]
            first, last = max(0, -ihi), min(math.floor(-lo) - 1, limit)
            if first <= last:
                alts += [f'"-" {s}{frac}' for s in _natural_range(first, last)]
            # At an exclusive whole bound e: e.f and -e.f with a fraction that is not zero.
            nonzero = f' "." [0-9]{{0,{MAX_NUMBER_DIGITS - 1}}} [1-9]'
            if ilo - 1 == lo and lo >= 0 and lo + 1 <= hi:
                alts.append(f"{_literal(str(ilo - 1))}{nonzero}")
            if ihi + 1 == hi and hi <= 0 and hi - 1 >= lo:
                alts.append(f'"-" {_literal(str(-(ihi + 1)))}{nonzero}')
        if not alts:
            raise self.fail(path, f"no {kind} written with at most {MAX_NUMBER_DIGITS} digits "
                                  "lies within the schema's bounds")
        body = self.rules.add(f"{kind}-range", " | ".join(alts))
        return self.rules.add(f"{kind}-value", f"{body} space")

    def required(self, schema: dict, path: tuple) -> list[str]:
        names = schema.get("required", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise self.fail((*path, "required"), "required must be an array of strings")
        return list(dict.fromkeys(names))

    def object(self, schema: dict, path: tuple, depth: int, refs: tuple[str, ...]) -> str | None:
        props = schema.get("properties", {})
        if not isinstance(props, dict):
            raise self.fail((*path, "properties"), "properties must be an object")
        required = self.required(schema, path)
        extra = schema.get("additionalProperties", None if props else True)
        if not isinstance(extra, (bool, dict)) and extra is not None:
            raise self.fail((*path, "additionalProperties"),
                            "additionalProperties must be a boolean or a schema")
        members: list[tuple[str, bool]] = []  # (key-value rule, required)
        for name in [*[p for p in props if p in required], *[p for p in props
                                                            if p not in required]]:
            value = self.visit(props[name], (*path, "properties", name), depth + 1, refs)
            if value is None:
                if name in required:
                    return None
                continue
            kv = f'{_json_literal(name)} space ":" space {value}'
            members.append((self.rules.add(f"{name}-kv", kv), name in required))
        for name in required:
            if name not in props:
                raise self.fail((*path, "required"), f"required names {name!r}, which is not "
                                                     "in properties")
        extra_kv = None
        if extra not in (None, False):
            value = self.visit(extra, (*path, "additionalProperties"), depth + 1, refs)
            if value is not None:
                extra_kv = self.rules.add("member", f'{self.string({}, path)} ":" space {value}')
        lo, hi = self.bounds(schema, path, "minProperties", "maxProperties",
                             DEFAULT_MAX_ITEMS + len(members))
        n_required = sum(1 for _, r in members if r)
        if lo > n_required and (members or extra_kv is None):
            raise self.fail((*path, "minProperties"), "minProperties above the number of "
                            "required properties is supported for free-form objects only")
        if hi < len(members):
            raise self.fail((*path, "maxProperties"), "maxProperties below the number of "
                            "properties is not supported")
        n_extra = hi - len(members) if extra_kv else 0
        return self.rules.add("object", self.object_body(members, extra_kv, lo, n_extra))

    def object_body(self, members: list[tuple[str, bool]], extra: str | None, lo: int,
                    n_extra: int) -> str:
        """Members in a fixed order (required ones first), then up to n_extra other members."""
        more = self.rules.add("more", f'"," space {extra}') if extra and n_extra else ""
        if not members:
            if not more:
                return '"{" space "}" space'
            body = f"{extra} {self.repeat(more, max(lo - 1, 0), n_extra - 1)}".strip()
            return f'"{{" space {body if lo else f"({body})?"} "}}" space'
        extras = self.repeat(more, 0, n_extra) if more else ""
        required = [kv for kv, r in members if r]
        optional = [kv for kv, r in members if not r]
        if required:
            body = ' "," space '.join(required)
            body += "".join(f' ("," space {kv})?' for kv in optional)
            return " ".join(p for p in ('"{" space', body, extras, '"}" space') if p)
        # Nothing required: any optional member may come first, each later one after a comma.
        firsts, tail = [], extras
        for kv in reversed(optional):
            after = self.rules.add("rest", tail) if tail else ""
            firsts.append(f"{kv} {after}".strip())
            tail = f'("," space {kv})? {after}'.strip()
        if more:
            firsts.append(f"{extra} {self.repeat(more, 0, n_extra - 1)}".strip())
        first = self.rules.add("first", " | ".join(reversed(firsts)))
        return f'"{{" space {first}? "}}" space'

    def array(self, schema: dict, path: tuple, depth: int, refs: tuple[str, ...]) -> str | None:
        prefix = schema.get("prefixItems")
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4 tuples
            prefix, items = items, schema.get("additionalItems", True)
        lo, hi = self.bounds(schema, path, "minItems", "maxItems", DEFAULT_MAX_ITEMS)
        head: list[str] = []
        if prefix is not None:
            if not isinstance(prefix, list):
                raise self.fail((*path, "prefixItems"), "prefixItems must be an array")
            if hi < len(prefix):
                raise self.fail((*path, "maxItems"), "maxItems below the number of prefixItems "
                                                     "is not supported")
            for i, sub in enumerate(prefix):
                rule = self.visit(sub, (*path, "prefixItems", i), depth + 1, refs)
                if rule is None:
                    return None
                head.append(rule)
            # The whole tuple, then only as many further items as minItems asks for.
            lo = hi = max(lo - len(prefix), 0)
        item = self.visit(items, (*path, "items"), depth + 1, refs) if hi else None
        if item is None:
            if lo:
                return None
            hi = 0
        body = ' "," space '.join(head)
        if hi:
            more = self.rules.add("more", f'"," space {item}')
            if head:
                body += " " + self.repeat(more, lo, hi)
            else:
                body = f"{item} {self.repeat(more, max(lo - 1, 0), hi - 1)}".strip()
                body = body if lo else f"({body})?"
        return self.rules.add("array", " ".join(p for p in ('"[" space', body, '"]" space') if p))

    def free_value(self, depth: int) -> str:
        """Any JSON value, its containers unrolled by depth so that nesting ends."""
        if depth in self._free:
            return self._free[depth]
        scalars = [self.string({}, ()), self.rules.add("number", f"{NUMBER} space"),
                   self.rules.add("boolean", '("true" | "false") space'),
                   self.rules.add("null", '"null" space')]
        if depth + 1 < MAX_DEPTH:
            inner = self.free_value(depth + 1)
            member = self.rules.add(f"member-{depth}", f'{scalars[0]} ":" space {inner}')
            more = self.rules.add(f"more-{depth}", f'"," space {inner}')
            array = f'"[" space ({inner} {self.repeat(more, 0, DEFAULT_MAX_ITEMS - 1)})? "]" space'
            scalars[:0] = [self.rules.add(f"object-{depth}",
                                          self.object_body([], member, 0, DEFAULT_MAX_ITEMS)),
                           self.rules.add(f"array-{depth}", array)]
        self._free[depth] = self.rules.add(f"value-{depth}", " | ".join(scalars))
        return self._free[depth]
