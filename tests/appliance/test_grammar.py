"""Bounded JSON grammars: bounds refused with the field named, and what llama.cpp makes of the rest.

The first half is pure. The second parses the grammars with llama.cpp on the tiny model's vocab,
in a child process where an input used to crash it, and checks which texts they accept.
"""

from __future__ import annotations

import ctypes
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from appliance.api.grammar import (
    DEFAULT_MAX_STRING,
    MAX_DEPTH,
    MAX_GRAMMAR_BYTES,
    MAX_REPETITIONS,
    MAX_SCHEMA_NODES,
    response_grammar,
    schema_grammar,
    tool_call_grammar,
)
from appliance.api.schemas import ChatCompletionRequest, ResponseFormat, Tool
from appliance.engine.runtime import LlamaRuntime, RuntimeOptions
from appliance.engine.sampling import GrammarRefused, SamplingParams
from appliance.errors import InvalidRequest, InvalidValue
from tests.conftest import REPO

SCHEMA = "response_format.json_schema.schema"

# The request that used to segfault the daemon (issue #10 item 1), byte for byte.
KILLER = ('{"messages":[{"role":"user","content":"hi"}],"max_tokens":1,"response_format":'
          '{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"string",'
          '"maxLength":100000}}}}')


def json_schema(schema: dict) -> ResponseFormat:
    return ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def tool(name: str, parameters: dict) -> Tool:
    return Tool.model_validate({"type": "function",
                                "function": {"name": name, "parameters": parameters}})


def refused(schema: dict) -> InvalidValue:
    with pytest.raises(InvalidValue) as caught:
        response_grammar(json_schema(schema))
    assert caught.value.status == 400 and caught.value.code == "invalid_value"
    return caught.value


def nested(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


# Examples from OpenAI's structured-output and function-calling guides.
OPENAI_EXAMPLES = {
    "event": ({"type": "object", "properties": {
        "name": {"type": "string"}, "date": {"type": "string"},
        "participants": {"type": "array", "items": {"type": "string"}}},
        "required": ["name", "date", "participants"], "additionalProperties": False},
        {"name": "Science fair", "date": "Friday", "participants": ["Alice", "Bob"]}),
    "math_reasoning": ({"type": "object", "properties": {
        "steps": {"type": "array", "items": {"type": "object", "properties": {
            "explanation": {"type": "string"}, "output": {"type": "string"}},
            "required": ["explanation", "output"], "additionalProperties": False}},
        "final_answer": {"type": "string"}},
        "required": ["steps", "final_answer"], "additionalProperties": False},
        {"steps": [{"explanation": "Subtract 7", "output": "8x = -30"}],
         "final_answer": "x = -3.75"}),
    "weather": ({"type": "object", "properties": {
        "location": {"type": "string", "description": "City and country e.g. Bogotá, Colombia"},
        "units": {"type": ["string", "null"], "enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "units"], "additionalProperties": False},
        {"location": "Bogotá, Colombia", "units": "celsius"}),
    "any_of": ({"type": "object", "properties": {"item": {"anyOf": [
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "number"}},
         "required": ["name", "age"], "additionalProperties": False},
        {"type": "object", "properties": {"number": {"type": "string"},
                                          "street": {"type": "string"}},
         "required": ["number", "street"], "additionalProperties": False}]}},
        "required": ["item"], "additionalProperties": False},
        {"item": {"number": "12", "street": "Rue \"Haute\"\n"}}),
    "defs": ({"type": "object", "properties": {
        "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}},
        "final_answer": {"type": "string"}},
        "$defs": {"step": {"type": "object", "properties": {
            "explanation": {"type": "string"}, "output": {"type": "string"}},
            "required": ["explanation", "output"], "additionalProperties": False}},
        "required": ["steps", "final_answer"], "additionalProperties": False},
        {"steps": [], "final_answer": "42"}),
    "ui_recursive": ({"type": "object", "properties": {
        "type": {"type": "string", "enum": ["div", "button", "header", "section", "field",
                                            "form"]},
        "label": {"type": "string"},
        "children": {"type": "array", "items": {"$ref": "#"}},
        "attributes": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "value": {"type": "string"}},
            "required": ["name", "value"], "additionalProperties": False}}},
        "required": ["type", "label", "children", "attributes"], "additionalProperties": False},
        {"type": "form", "label": "Sign up", "children": [
            {"type": "field", "label": "Email", "children": [], "attributes": [
                {"name": "kind", "value": "email"}]}], "attributes": []}),
    "linked_list": ({"type": "object", "properties": {"linked_list": {
        "$ref": "#/$defs/linked_list_node"}},
        "$defs": {"linked_list_node": {"type": "object", "properties": {
            "value": {"type": "number"},
            "next": {"anyOf": [{"$ref": "#/$defs/linked_list_node"}, {"type": "null"}]}},
            "additionalProperties": False, "required": ["next", "value"]}},
        "additionalProperties": False, "required": ["linked_list"]},
        {"linked_list": {"value": 1, "next": {"value": -2.5, "next": None}}}),
    "odd_keys": ({"type": "object", "properties": {
        "a  b": {"type": "boolean"}, "quote\"back\\slash": {"const": "line\nbreak"},
        "ключ": {"enum": ["значение", "🙂", None, 1.5, {"x": [1]}]}},
        "required": ["a  b", "quote\"back\\slash", "ключ"]},
        {"a  b": False, "quote\"back\\slash": "line\nbreak", "ключ": "🙂"}),
    "bounds": ({"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "when": {"type": "string", "format": "date-time"},
        "id": {"type": "string", "format": "uuid"},
        "code": {"type": "string", "minLength": 2, "maxLength": 3},
        "pair": {"type": "array", "prefixItems": [{"type": "boolean"}, {"const": "x\\y"}]},
        "nothing": {"type": "null"}},
        "required": ["age", "ratio", "when", "id", "code", "pair"]},
        {"age": 150, "ratio": 0.25, "when": "2025-01-31T23:59:00Z",
         "id": "123e4567-e89b-12d3-a456-426614174000", "code": "ab", "pair": [True, "x\\y"]}),
}


# -- bounds, with the field named ---------------------------------------------------------------

def test_the_request_that_killed_the_daemon_is_a_400_naming_max_length() -> None:
    body = ChatCompletionRequest.model_validate_json(KILLER)
    with pytest.raises(InvalidValue) as caught:
        response_grammar(body.response_format)
    assert caught.value.param == f"{SCHEMA}.maxLength"
    assert "100000" in caught.value.message and str(MAX_REPETITIONS) in caught.value.message


@pytest.mark.parametrize(("key", "kind"), [
    ("maxLength", "string"), ("minLength", "string"), ("maxItems", "array"),
    ("minItems", "array"), ("maxProperties", "object"), ("minProperties", "object")])
def test_every_repetition_is_bounded(key: str, kind: str) -> None:
    inner = {"type": kind, key: MAX_REPETITIONS + 1}
    error = refused({"type": "object", "properties": {"name": inner}})
    assert error.param == f"{SCHEMA}.properties.name.{key}"
    # At the bound it converts.
    schema_grammar({"type": kind, key: MAX_REPETITIONS}, "p")


def test_min_items_of_a_hundred_million() -> None:
    assert refused({"type": "array", "minItems": 100_000_000}).param == f"{SCHEMA}.minItems"


@pytest.mark.parametrize("value", [-1, 2.5, "10", True, None])
def test_a_count_must_be_a_natural_number(value: object) -> None:
    if value is None:  # null means absent
        schema_grammar({"type": "string", "maxLength": value}, "p")
        return
    assert refused({"type": "string", "maxLength": value}).param == f"{SCHEMA}.maxLength"


def test_min_above_max_is_refused() -> None:
    assert refused({"type": "string", "minLength": 5, "maxLength": 2}).param == \
        f"{SCHEMA}.minLength"
    assert refused({"type": "integer", "minimum": 5, "maximum": 2}).param == SCHEMA


def test_huge_integer_bounds_stay_small() -> None:
    grammar = schema_grammar({"type": "integer", "minimum": -1e300, "maximum": 1e300}, "p")
    assert len(grammar) < 2000
    grammar = schema_grammar({"type": "number", "exclusiveMinimum": 0, "maximum": 10 ** 40}, "p")
    assert len(grammar) < 4000


def test_nesting_past_the_depth_bound_names_the_deepest_field() -> None:
    schema_grammar(nested(MAX_DEPTH - 2), "p")
    error = refused(nested(MAX_DEPTH + 1))
    assert error.param.startswith(f"{SCHEMA}.properties.a.properties.a.")
    assert str(MAX_DEPTH) in error.message


def test_a_thousand_levels_is_a_400_not_a_crash() -> None:
    error = refused(nested(1000))
    assert error.param.startswith(f"{SCHEMA}.properties.a")


@pytest.mark.parametrize("schema", [
    {"$ref": "#"},
    {"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"self": {"$ref": "#"}}, "required": ["self"]},
    {"anyOf": [{"$ref": "#"}, {"type": "array", "items": {"$ref": "#"}, "minItems": 1}]},
])
def test_recursion_without_a_finite_value_is_a_400(schema: dict) -> None:
    assert "finite" in refused(schema).message


def test_recursive_ref_is_unrolled_to_a_bounded_grammar() -> None:
    schema, _ = OPENAI_EXAMPLES["ui_recursive"]
    grammar = schema_grammar(schema, "p")
    assert len(grammar) < MAX_GRAMMAR_BYTES
    # One object rule per level it may nest, no rule referring back to itself.
    assert grammar.count('"\\"children\\""') <= MAX_DEPTH


def test_schema_size_is_bounded() -> None:
    error = refused({"enum": list(range(MAX_SCHEMA_NODES))})
    assert error.param == SCHEMA and str(MAX_SCHEMA_NODES) in error.message


def test_grammar_size_is_bounded() -> None:
    props = {f"{'k' * 200}{i}": {"type": "string"} for i in range(400)}
    error = refused({"type": "object", "properties": props})
    assert error.param == SCHEMA and str(MAX_GRAMMAR_BYTES) in error.message


@pytest.mark.parametrize(("schema", "param"), [
    ({"type": "string", "pattern": "^a+$"}, "pattern"),
    ({"not": {"type": "null"}}, "not"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "strin"}, "type"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"$ref": "#/$defs/missing"}, "$ref"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]}, "required"),
    ({"anyOf": [{"type": "string"}], "maxLength": 3}, "maxLength"),
    ({"allOf": [{"type": "string"}]}, "allOf.0"),
    ({"type": "object", "properties": 3}, "properties"),
    ({"type": "object", "properties": {"a": 3}}, "properties.a"),
])
def test_unsupported_constructs_are_a_400_naming_them(schema: dict, param: str) -> None:
    assert refused(schema).param == f"{SCHEMA}.{param}"


def test_json_schema_without_a_schema_object_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as caught:
        response_grammar(ResponseFormat(type="json_schema"))
    assert caught.value.param == "response_format.json_schema"


def test_text_needs_no_grammar() -> None:
    assert response_grammar(None) is None
    assert response_grammar(ResponseFormat(type="text")) is None


def test_tool_parameters_are_bounded_with_the_tool_named() -> None:
    ok = tool("ok", {"type": "object", "properties": {"q": {"type": "string"}}})
    bad = tool("bad", {"type": "object", "properties": {"q": {"type": "string",
                                                              "maxLength": 100000}}})
    with pytest.raises(InvalidValue) as caught:
        tool_call_grammar([ok, bad], None)  # tool_choice "required"
    assert caught.value.param == "tools.1.function.parameters.properties.q.maxLength"
    with pytest.raises(InvalidValue) as caught:
        tool_call_grammar([ok, bad], "bad")
    assert caught.value.param == "tools.1.function.parameters.properties.q.maxLength"
    tool_call_grammar([ok, bad], "ok")  # the other tool is not part of a named call's grammar
    with pytest.raises(InvalidValue):
        tool_call_grammar([tool("deep", nested(1000))], None)
    with pytest.raises(InvalidRequest) as caught:
        tool_call_grammar([ok], "absent")
    assert caught.value.param == "tool_choice"


def test_openai_examples_convert() -> None:
    for name, (schema, _) in OPENAI_EXAMPLES.items():
        grammar = schema_grammar(schema, "p")
        assert grammar.startswith("space ::= ") and "\nroot ::= " in grammar, name


def test_string_characters_exclude_control_characters() -> None:
    # Every character class that can match inside a JSON string is the one `char` rule.
    for schema, _ in OPENAI_EXAMPLES.values():
        for line in schema_grammar(schema, "p").splitlines():
            name, _, body = line.partition(" ::= ")
            if "[^" in body:
                assert name == "char" and "\\x00-\\x1F" in body, line


# -- with llama.cpp --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vocab(tiny_gguf: Path) -> Iterator[LlamaRuntime]:
    runtime = LlamaRuntime(tiny_gguf, RuntimeOptions(n_gpu_layers=0, context_per_slot=64,
                                                     n_seq=1, n_threads=1))
    yield runtime
    runtime.close()


def accepts(runtime: LlamaRuntime, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets the model write exactly `text`, then stop."""
    sampler = llama_cpp.llama_sampler_init_grammar(runtime.vocab, grammar.encode(), b"root")
    assert sampler, "llama.cpp could not parse the grammar"
    end = llama_cpp.llama_vocab_eos(runtime.vocab)
    try:
        for token in [*runtime.tokenize(text, add_special=False, parse_special=False), end]:
            # Ask the sampler about this one token before accepting it: accepting a token the
            # grammar rejects throws inside llama.cpp, which would abort the process.
            data = (llama_cpp.llama_token_data * 1)()
            data[0].id, data[0].logit, data[0].p = token, 0.0, 0.0
            candidates = llama_cpp.llama_token_data_array(data, 1, -1, False)
            llama_cpp.llama_sampler_apply(sampler, ctypes.byref(candidates))
            if math.isinf(data[0].logit):
                return False
            if token != end:
                llama_cpp.llama_sampler_accept(sampler, token)
        return True
    finally:
        llama_cpp.llama_sampler_free(sampler)


def test_grammars_match_valid_instances(vocab: LlamaRuntime) -> None:
    for name, (schema, instance) in OPENAI_EXAMPLES.items():
        grammar = schema_grammar(schema, "p")
        assert accepts(vocab, grammar, json.dumps(instance, ensure_ascii=False)), name
        assert accepts(vocab, grammar, json.dumps(instance, indent=2, ensure_ascii=False)), name
        assert not accepts(vocab, grammar, json.dumps(instance)[:-1]), name


@pytest.mark.parametrize("grammar_of", ["json_object", "json_schema", "tool_call"])
def test_raw_control_characters_are_refused_in_strings(vocab: LlamaRuntime,
                                                       grammar_of: str) -> None:
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    if grammar_of == "json_object":
        grammar = response_grammar(ResponseFormat(type="json_object"))
    elif grammar_of == "json_schema":
        grammar = response_grammar(json_schema(schema))
    else:
        grammar = tool_call_grammar([tool("search", schema)], None)
    assert grammar is not None

    def wrap(value: str) -> str:
        text = '{"q": "' + value + '"}'
        if grammar_of == "tool_call":
            return '<tool_call>\n{"name": "search", "arguments": ' + text + '}\n</tool_call>'
        return text

    assert accepts(vocab, grammar, wrap("two\\nlines\\t\\u00e9 \\\"quoted\\\" \\\\ ok é"))
    for raw in ["\n", "\t", "\r", "\x00", "\x1f", "\x7f"]:
        assert not accepts(vocab, grammar, wrap(f"two{raw}lines")), repr(raw)
    assert not accepts(vocab, grammar, wrap("\\ud800"))  # a lone surrogate
    assert not accepts(vocab, grammar, wrap("\\x41"))  # not a JSON escape


def test_strings_and_whitespace_are_finite(vocab: LlamaRuntime) -> None:
    grammar = schema_grammar({"type": "object", "properties": {"q": {"type": "string"}},
                              "required": ["q"]}, "p")
    assert accepts(vocab, grammar, '{"q": "' + "a" * DEFAULT_MAX_STRING + '"}')
    assert not accepts(vocab, grammar, '{"q": "' + "a" * (DEFAULT_MAX_STRING + 1) + '"}')
    assert accepts(vocab, grammar, '{\n' + " " * 20 + '"q": ""}')
    assert not accepts(vocab, grammar, '{\n' + " " * 21 + '"q": ""}')
    assert not accepts(vocab, grammar, '{\n\n"q": ""}')


def test_bounds_hold_in_llama_cpp(vocab: LlamaRuntime) -> None:
    grammar = schema_grammar({"type": "object", "properties": {
        "n": {"type": "integer", "minimum": -5, "maximum": 120},
        "x": {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1,
                 "maxItems": 2}}, "required": ["n", "x", "tags"]}, "p")
    ok = [(-5, 2, '["a"]'), (120, 0.5, '["a", "b"]'), (0, "1.999", '["b","b"]')]
    bad = [(-6, 1, '["a"]'), (121, 1, '["a"]'), (1, 0, '["a"]'), (1, "2.5", '["a"]'),
           (1, 1, "[]"), (1, 1, '["a", "a", "a"]'), ("007", 1, '["a"]'), (1, "1e5", '["a"]')]
    for n, x, tags in ok:
        assert accepts(vocab, grammar, f'{{"n": {n}, "x": {x}, "tags": {tags}}}'), (n, x, tags)
    for n, x, tags in bad:
        assert not accepts(vocab, grammar, f'{{"n": {n}, "x": {x}, "tags": {tags}}}'), (n, x, tags)


# Parsed in a child process: a grammar that overflows llama.cpp's parser kills the process.
PARSE_SCRIPT = """
import json, sys, time
import llama_cpp
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_default_params()
params.vocab_only = True
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params)
vocab = llama_cpp.llama_model_get_vocab(model)
for grammar in json.load(sys.stdin):
    started = time.perf_counter()
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    print(json.dumps({"parsed": bool(sampler), "seconds": time.perf_counter() - started}),
          flush=True)
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
"""


def at_the_bounds() -> dict[str, str]:
    """The largest grammars each bound lets through."""
    kinds = {key: {"type": kind, key: MAX_REPETITIONS} for key, kind in [
        ("maxLength", "string"), ("minLength", "string"), ("maxItems", "array"),
        ("minItems", "array"), ("maxProperties", "object"), ("minProperties", "object")]}
    grammars = {k: schema_grammar(s, "p") for k, s in kinds.items()}
    grammars["depth"] = schema_grammar(nested(MAX_DEPTH - 2), "p")
    grammars["json_object"] = response_grammar(ResponseFormat(type="json_object")) or ""
    grammars["integer"] = schema_grammar({"type": "integer", "minimum": -10 ** 20,
                                          "maximum": 12345678901234}, "p")
    grammars["many_props"] = schema_grammar({"type": "object", "properties": {
        f"p{i}": {"type": "string", "maxLength": MAX_REPETITIONS} for i in range(60)}}, "p")
    for name, (schema, _) in OPENAI_EXAMPLES.items():
        grammars[name] = schema_grammar(schema, "p")
    grammars["tools"] = tool_call_grammar(
        [tool(n, s) for n, (s, _) in OPENAI_EXAMPLES.items()], None)
    return grammars


def test_llama_cpp_parses_every_grammar_at_the_bounds(tiny_gguf: Path) -> None:
    grammars = at_the_bounds()
    assert max(len(g) for g in grammars.values()) <= MAX_GRAMMAR_BYTES
    done = subprocess.run([sys.executable, "-c", PARSE_SCRIPT, str(tiny_gguf)],
                          input=json.dumps(list(grammars.values())), capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    results = dict(zip(grammars, map(json.loads, done.stdout.splitlines()), strict=True))
    for name, result in results.items():
        assert result["parsed"], name
        assert result["seconds"] < 2, (name, result)


def test_a_token_the_grammar_refuses_is_refused_not_an_abort(vocab: LlamaRuntime) -> None:
    """The engine forces tokens into a sequence (a spent thinking budget's close). Accepting one
    the grammar refuses throws in llama.cpp, which aborts the daemon: the chain asks first.
    Run in this process on purpose: an abort here would fail the whole test run."""
    think = vocab.think
    assert think is not None
    grammar = response_grammar(ResponseFormat(type="json_object"))
    chain = vocab.sampler(SamplingParams(grammar=grammar))
    try:
        for token in vocab.tokenize('{"a": "b', add_special=False, parse_special=False):
            chain.accept(token)
        chain.accept(think.open)  # "<think>" is text the grammar allows inside a string
        with pytest.raises(GrammarRefused):
            chain.accept(think.close_run[0])  # a raw newline inside a JSON string
        for token in vocab.tokenize('"}', add_special=False, parse_special=False):
            chain.accept(token)  # the refusal left the grammar where it was
    finally:
        chain.close()
    # A grammar that waits for </think> takes the whole forced close, as before.
    lazy = vocab.sampler(SamplingParams(grammar=grammar, grammar_after_think=True))
    try:
        for token in think.close_run:
            lazy.accept(token)
    finally:
        lazy.close()


def test_enum_and_const_keep_to_the_type_beside_them(vocab: LlamaRuntime) -> None:
    error = refused({"type": "string", "enum": [1, None]})
    assert error.param == f"{SCHEMA}.enum" and "type" in error.message
    assert refused({"type": "integer", "const": "1"}).param == f"{SCHEMA}.const"
    grammar = schema_grammar({"type": ["string", "null"], "enum": ["a", 1, None, True]}, "p")
    assert accepts(vocab, grammar, '"a"') and accepts(vocab, grammar, "null")
    assert not accepts(vocab, grammar, "1") and not accepts(vocab, grammar, "true")
    assert accepts(vocab, schema_grammar({"type": "integer", "enum": [2.0, 2.5]}, "p"), "2.0")
