"""JSON Schema -> GBNF (llama.cpp grammar) for constrained generation.

The grammar accepts a subset of the valid documents, as close to all of them as a context-free
grammar allows: keys appear in declared order, whitespace between tokens is bounded by `max_ws`,
numbers have bounded digit counts and encodings are canonical.  Everything it accepts is valid
(except where `oneOf` branches overlap: they become a plain alternation).  Constraints it cannot
express raise UnsupportedSchemaError naming the JSON pointer of the offending part, instead of
being silently dropped.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

from router.structured.errors import Unsatisfiable, UnsupportedSchemaError
from router.structured.gbnf_builder import GrammarBuilder
from router.structured.gbnf_primitives import (
    FORMAT_RULES,
    alternation,
    gbnf_literal,
    is_atomic,
    quantified,
    sequence,
)
from router.structured.numeric_ranges import integer_range, number_range
from router.structured.regex_gbnf import RegexUnsupported, regex_to_gbnf
from router.structured.schema_merge import (
    ARRAY_KEYWORDS,
    NUMBER_KEYWORDS,
    OBJECT_KEYWORDS,
    STRING_KEYWORDS,
    TYPE_NAMES,
    EmptyIntersection,
    MergeConflict,
    Schema,
    constraints,
    fold_nullable,
    merge_schemas,
    unsupported_keyword,
)
from router.structured.schema_values import (
    count_keyword,
    enum_values,
    escape_pointer,
    json_literal,
    key_contents_excluding,
    literal_allowed,
    numeric_bound,
)

_QUOTE = '"\\""'
_MAX_MERGE_DEPTH = 32

__all__ = [
    "UnsupportedSchemaError",
    "add_schema",
    "json_object_gbnf",
    "schema_rules",
    "schema_to_gbnf",
]


class _Converter:
    """One schema document turned into rules of a shared builder, all named under `prefix`."""

    def __init__(self, builder: GrammarBuilder, root: Any, prefix: str, strict: bool) -> None:
        self.b = builder
        self.root = root
        self.prefix = prefix
        self.strict = strict
        self.refs: dict[str, str] = {}  # JSON pointer -> rule name
        self.rule_pointer: dict[str, str] = {}
        self.leading: dict[str, set[str]] = {}  # rule -> refs reachable before any input

    def run(self) -> str:
        name = self.b.reserve(self.prefix)
        self.refs[""] = name
        self.rule_pointer[name] = "#"
        self.b.define(name, self.visit(self.root, "#", name, lead=name))
        self.check_left_recursion()
        return name

    # --- dispatch -------------------------------------------------------------------------------

    def visit(self, schema: Any, ptr: str, hint: str, lead: str | None) -> str:
        """A GBNF expression for the JSON texts valid under `schema`.

        `lead` is the $ref rule whose first token we are still producing (None once a token
        such as `{` has been consumed); it is used to detect left recursion.
        """
        schema = self.check(schema, ptr)
        if schema is True:
            return "json-value"
        if "$ref" in schema:
            rest = {k: v for k, v in constraints(schema).items() if k != "$ref"}
            if not rest:
                return self.ref(schema["$ref"], ptr, lead)
            schema = self.merge([schema], ptr)
        if "allOf" in schema:
            schema = self.merge([schema], ptr)
        if "anyOf" in schema or "oneOf" in schema:
            return self.alternatives(schema, ptr, hint, lead)
        if "enum" in schema or "const" in schema:
            return self.literals(schema, ptr)
        types = self.types(schema, ptr)
        if types is None:
            return "json-value"
        return alternation([self.typed(t, schema, ptr, hint) for t in types])

    def check(self, schema: Any, ptr: str) -> Any:
        if schema is True:
            return True
        if schema is False:
            raise Unsatisfiable(ptr, "schema 'false' matches nothing")
        if not isinstance(schema, dict):
            raise UnsupportedSchemaError(ptr, "a schema must be an object or a boolean")
        bad = unsupported_keyword(schema)
        if bad is not None:
            raise UnsupportedSchemaError(f"{ptr}/{bad}", f"keyword '{bad}' is not supported")
        if "type" in schema:
            types = schema["type"]
            names = [types] if isinstance(types, str) else types
            if not isinstance(names, list) or not names or not set(names) <= set(TYPE_NAMES):
                raise UnsupportedSchemaError(f"{ptr}/type", f"invalid type {types!r}")
        schema = fold_nullable(schema)
        return True if not constraints(schema) else schema

    def types(self, schema: Schema, ptr: str) -> list[str] | None:
        if "type" in schema:
            raw = schema["type"]
            types = [raw] if isinstance(raw, str) else list(dict.fromkeys(raw))
        else:  # infer from the keywords: a subset of "anything", and what the author meant
            keys = set(schema)
            groups = [
                ("object", OBJECT_KEYWORDS),
                ("array", ARRAY_KEYWORDS),
                ("string", STRING_KEYWORDS),
                ("number", NUMBER_KEYWORDS),
            ]
            types = [name for name, kws in groups if keys & kws]
            if not types:
                return None
        if "number" in types and "integer" in types:
            types.remove("integer")
        return types

    def typed(self, type_name: str, schema: Schema, ptr: str, hint: str) -> str:
        if type_name == "null":
            return "json-null"
        if type_name == "boolean":
            return "json-bool"
        if type_name == "string":
            return self.string(schema, ptr)
        if type_name in ("integer", "number"):
            integer = type_name == "integer"
            lo = numeric_bound(schema, ptr, integer=integer, lower=True)
            hi = numeric_bound(schema, ptr, integer=integer, lower=False)
            if lo is not None and hi is not None and lo > hi:
                raise Unsatisfiable(ptr, f"no {type_name} lies between the bounds")
            return integer_range(lo, hi) if integer else number_range(lo, hi)
        if type_name == "object":
            return self.object(schema, ptr, hint)
        return self.array(schema, ptr, hint)

    def as_rule(self, expr: str, hint: str) -> str:
        return expr if is_atomic(expr) else self.b.add(hint, expr)

    # --- composition ----------------------------------------------------------------------------

    def flatten(self, schema: Any, ptr: str, depth: int) -> list[Schema]:
        """`schema` split into parts with no top-level `$ref`/`allOf` (their intersection)."""
        if depth > _MAX_MERGE_DEPTH:
            raise UnsupportedSchemaError(ptr, "allOf/$ref nesting too deep (recursive allOf?)")
        schema = self.check(schema, ptr)
        if schema is True:
            return []
        rest = dict(schema)
        parts: list[Schema] = []
        if "$ref" in rest:
            target, target_ptr = self.resolve(rest.pop("$ref"), ptr)
            parts += self.flatten(target, target_ptr, depth + 1)
        if "allOf" in rest:
            subs = rest.pop("allOf")
            if not isinstance(subs, list) or not subs:
                raise UnsupportedSchemaError(f"{ptr}/allOf", "allOf must be a non-empty list")
            for i, sub in enumerate(subs):
                parts += self.flatten(sub, f"{ptr}/allOf/{i}", depth + 1)
        return [*parts, rest]

    def merge(self, schemas: list[Any], ptr: str) -> Any:
        parts = [p for s in schemas for p in self.flatten(s, ptr, 0)]
        merged: Schema = {}
        try:
            for part in parts:
                merged = merge_schemas(merged, part)
        except EmptyIntersection as exc:
            raise Unsatisfiable(ptr, str(exc)) from exc
        except MergeConflict as exc:
            raise UnsupportedSchemaError(ptr, str(exc)) from exc
        return self.check(merged, ptr)

    def alternatives(self, schema: Schema, ptr: str, hint: str, lead: str | None) -> str:
        if "anyOf" in schema and "oneOf" in schema:
            raise UnsupportedSchemaError(ptr, "anyOf and oneOf together are not supported")
        key = "anyOf" if "anyOf" in schema else "oneOf"
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise UnsupportedSchemaError(f"{ptr}/{key}", f"{key} must be a non-empty list")
        rest = {k: v for k, v in constraints(schema).items() if k != key}
        alts = []
        for i, branch in enumerate(branches):
            bptr = f"{ptr}/{key}/{i}"
            try:
                sub = self.merge([rest, branch], bptr) if rest else branch
                alts.append(self.visit(sub, bptr, f"{hint}-{i}", lead))
            except Unsatisfiable:
                continue
        if not alts:
            raise Unsatisfiable(f"{ptr}/{key}", "no branch can be satisfied")
        return alternation(alts)

    def literals(self, schema: Schema, ptr: str) -> str:
        rest = {k: v for k, v in schema.items() if k not in ("enum", "const")}
        types = self.types(rest, ptr) if "type" in rest else None
        kept = [v for v in enum_values(schema, ptr) if literal_allowed(v, rest, types, ptr)]
        if not kept:
            raise Unsatisfiable(ptr, "no enum/const value satisfies the other keywords")
        return alternation([json_literal(v, ptr) for v in kept])

    # --- references -----------------------------------------------------------------------------

    def resolve(self, ref: Any, ptr: str) -> tuple[Any, str]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise UnsupportedSchemaError(f"{ptr}/$ref", "only local references ('#...') work")
        pointer = unquote(ref[1:])
        if pointer and not pointer.startswith("/"):
            raise UnsupportedSchemaError(f"{ptr}/$ref", "anchor references are not supported")
        node = self.root
        for token in pointer.split("/")[1:]:
            token = token.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise UnsupportedSchemaError(f"{ptr}/$ref", f"cannot resolve {ref!r}")
        return node, "#" + pointer

    def ref(self, ref: Any, ptr: str, lead: str | None) -> str:
        target, target_ptr = self.resolve(ref, ptr)
        pointer = target_ptr[1:]
        if pointer not in self.refs:
            last = pointer.rsplit("/", 1)[-1] or "ref"
            name = self.b.reserve(f"{self.prefix}-{last}")
            self.refs[pointer] = name
            self.rule_pointer[name] = target_ptr
            self.b.define(name, self.visit(target, target_ptr, name, lead=name))
        name = self.refs[pointer]
        if lead is not None:
            self.leading.setdefault(lead, set()).add(name)
        return name

    def check_left_recursion(self) -> None:
        """Reject $ref cycles that consume no input: llama.cpp refuses left-recursive grammars."""
        done: set[str] = set()

        def walk(node: str, path: list[str]) -> None:
            if node in path:
                raise UnsupportedSchemaError(
                    self.rule_pointer[node], "recursive $ref that consumes no input first"
                )
            if node in done:
                return
            for nxt in sorted(self.leading.get(node, ())):
                walk(nxt, [*path, node])
            done.add(node)

        for start in sorted(self.leading):
            walk(start, [])

    # --- types ----------------------------------------------------------------------------------

    def string(self, schema: Schema, ptr: str) -> str:
        lo = count_keyword(schema, "minLength", ptr) or 0
        hi = count_keyword(schema, "maxLength", ptr)
        fmt = schema.get("format")
        known = fmt if isinstance(fmt, str) and fmt in FORMAT_RULES else None  # others: annotation
        if "pattern" in schema:
            if known or lo or hi is not None:
                raise UnsupportedSchemaError(ptr, "pattern with format or length limits")
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise UnsupportedSchemaError(f"{ptr}/pattern", "pattern must be a string")
            try:
                return sequence(_QUOTE, regex_to_gbnf(pattern), _QUOTE)
            except RegexUnsupported as exc:
                raise UnsupportedSchemaError(f"{ptr}/pattern", str(exc)) from exc
        if known:
            if lo or hi is not None:
                raise UnsupportedSchemaError(ptr, f"format {known!r} with length limits")
            return FORMAT_RULES[known]
        if hi is not None and lo > hi:
            raise Unsatisfiable(ptr, "minLength exceeds maxLength")
        if lo == 0 and hi is None:
            return "json-string"
        return sequence(_QUOTE, quantified("json-char", lo, hi), _QUOTE)

    def object(self, schema: Schema, ptr: str, hint: str) -> str:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(props, dict):
            raise UnsupportedSchemaError(f"{ptr}/properties", "properties must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise UnsupportedSchemaError(f"{ptr}/required", "required must list strings")
        extra = schema.get("additionalProperties", not self.strict)
        entries = [(n, s, n in required, f"{ptr}/properties/{escape_pointer(n)}") for n, s in props.items()]
        undeclared = [n for n in dict.fromkeys(required) if n not in props]
        entries += [(n, extra, True, f"{ptr}/required") for n in undeclared]
        kvs: list[str] = []
        needed: list[bool] = []
        for name, sub, is_required, sub_ptr in entries:
            if sub is False:
                if is_required:
                    raise Unsatisfiable(sub_ptr, f"required property {name!r} is not allowed")
                continue
            value = self.as_rule(self.visit(sub, sub_ptr, f"{hint}-{name}", None), f"{hint}-{name}")
            key = gbnf_literal(json.dumps(name, ensure_ascii=False))
            kvs.append(self.b.add(f"{hint}-{name}-kv", sequence(key, "ws", '":"', "ws", value)))
            needed.append(is_required)
        extra_kv = None
        if extra is not False:
            eptr = f"{ptr}/additionalProperties"
            value = self.as_rule(self.visit(extra, eptr, f"{hint}-extra", None), f"{hint}-extra")
            declared = [*props, *required]
            key = "json-string"
            if declared:
                key = sequence(_QUOTE, key_contents_excluding(declared), _QUOTE)
                key = self.b.add(f"{hint}-extra-key", key)
            extra_kv = self.b.add(f"{hint}-extra-kv", sequence(key, "ws", '":"', "ws", value))
        self.check_property_counts(schema, ptr, sum(needed), len(kvs), extra_kv is not None)
        return self.members(kvs, needed, extra_kv, hint)

    def check_property_counts(
        self, schema: Schema, ptr: str, n_required: int, n_declared: int, open_ended: bool
    ) -> None:
        """Accept minProperties/maxProperties only where they cannot change validity here."""
        low = count_keyword(schema, "minProperties", ptr)
        high = count_keyword(schema, "maxProperties", ptr)
        if low is not None and low > n_required:
            raise UnsupportedSchemaError(f"{ptr}/minProperties", "exceeds the required properties")
        if high is not None and (open_ended or high < n_declared):
            raise UnsupportedSchemaError(f"{ptr}/maxProperties", "could be exceeded")

    def members(self, kvs: list[str], needed: list[bool], extra_kv: str | None, hint: str) -> str:
        """Object body: declared keys in order (optional ones skippable), then extra keys."""
        comma = ("ws", '","', "ws")
        tail = quantified(sequence(*comma, extra_kv), 0, None) if extra_kv else '""'
        rests = [""] * len(kvs) + [tail]  # rests[i]: what may follow once kvs[i-1] was written
        for i in range(len(kvs) - 1, 0, -1):
            item = sequence(*comma, kvs[i])
            body = sequence(item if needed[i] else quantified(item, 0, 1), rests[i + 1])
            rests[i] = self.b.add(f"{hint}-rest-{i}", body) if rests[i + 1] != '""' else body
        firsts = []
        for i, kv in enumerate(kvs):
            firsts.append(sequence(kv, rests[i + 1]))
            if needed[i]:
                break
        else:
            if extra_kv:
                firsts.append(sequence(extra_kv, tail))
        if not firsts:
            return '"{" ws "}"'
        body = alternation(firsts)
        if any(needed):
            return sequence('"{"', "ws", body, "ws", '"}"')
        return sequence('"{"', "ws", quantified(sequence(body, "ws"), 0, 1), '"}"')

    def array(self, schema: Schema, ptr: str, hint: str) -> str:
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-2019 tuple form
            prefix, prefix_ptr = items, f"{ptr}/items"
            rest, rest_ptr = schema.get("additionalItems", True), f"{ptr}/additionalItems"
        else:
            prefix, prefix_ptr = schema.get("prefixItems", []), f"{ptr}/prefixItems"
            rest, rest_ptr = items, f"{ptr}/items"
        if not isinstance(prefix, list):
            raise UnsupportedSchemaError(prefix_ptr, "must be a list of schemas")
        lo = count_keyword(schema, "minItems", ptr) or 0
        hi = count_keyword(schema, "maxItems", ptr)
        caps = [len(prefix)] if rest is False else []
        caps += [i for i, sub in enumerate(prefix) if sub is False][:1]
        if caps:
            hi = min(caps) if hi is None else min(hi, *caps)
        if hi is not None and lo > hi:
            raise Unsatisfiable(ptr, "no array length satisfies the item constraints")
        if hi == 0:
            return '"[" ws "]"'
        k = len(prefix) if hi is None else min(len(prefix), hi)
        elems = [
            self.as_rule(self.visit(sub, f"{prefix_ptr}/{i}", f"{hint}-{i}", None), f"{hint}-{i}")
            for i, sub in enumerate(prefix[:k])
        ]
        item = None
        if hi is None or hi > len(prefix):
            item = self.as_rule(self.visit(rest, rest_ptr, f"{hint}-item", None), f"{hint}-item")
        comma = ("ws", '","', "ws")
        more = None if hi is None else hi - max(k, 1)
        if k == 0:
            assert item is not None
            body = sequence(item, quantified(sequence(*comma, item), max(lo - 1, 0), more))
        else:
            tail = quantified(sequence(*comma, item), max(lo - k, 0), more) if item else '""'
            body = sequence(elems[-1], tail)
            for i in range(k - 2, -1, -1):
                nxt = sequence(*comma, body)
                body = sequence(elems[i], nxt if i + 1 < lo else quantified(nxt, 0, 1))
        if lo == 0:
            return sequence('"["', "ws", quantified(sequence(body, "ws"), 0, 1), '"]"')
        return sequence('"["', "ws", body, "ws", '"]"')


# --- public API ---------------------------------------------------------------------------------


def add_schema(builder: GrammarBuilder, schema: Any, prefix: str, *, strict: bool = False) -> str:
    """Convert `schema` into rules of `builder`, all named from `prefix`; returns its rule name.

    `strict` treats a missing additionalProperties as false (OpenAI strict function calling).
    """
    return _Converter(builder, schema, prefix, strict).run()


def schema_rules(
    schema: Any, prefix: str, *, strict: bool = False, max_ws: int = 2
) -> tuple[str, dict[str, str]]:
    """The rule name matching `schema` and every rule it needs (shared `json-*` ones included)."""
    builder = GrammarBuilder(max_ws=max_ws)
    name = add_schema(builder, schema, prefix, strict=strict)
    return name, builder.rules([name])


def schema_to_gbnf(schema: dict[str, Any], *, max_ws: int = 2, strict: bool = False) -> str:
    """A complete GBNF grammar whose `root` matches JSON documents valid under `schema`."""
    builder = GrammarBuilder(max_ws=max_ws)
    add_schema(builder, schema, "root", strict=strict)
    return builder.render("root")


def json_object_gbnf(max_ws: int = 2) -> str:
    """A grammar for any JSON object (response_format json_object)."""
    builder = GrammarBuilder(max_ws=max_ws)
    builder.define(builder.reserve("root"), "json-object")
    return builder.render("root")
