"""Objective specs: the text syntax of the command line and structural validation. No torch here.

An objective spec is a JSON-able dict with exactly one key naming its kind (docs/ARCHITECTURE.md); the CLI,
the gRPC servicer and the engine all speak it: it is the proto's JSON mapping (proto field names), with one
shorthand, a ``sum``'s terms as a bare list. Each kind is declared once, in :data:`KINDS` (its fields, types,
defaults, engine class and text form); everything here and the engine's build, walk and model checks and the
proto conversion are derived from it. This module turns the command-line text into a spec
(:func:`parse_objective`), checks a spec's structure and fills its defaults (:func:`normalize_objective`) and
writes a spec back as text (:func:`format_objective`). Whether a layer exists or a channel is in range needs
the model: that is ``featureviz.engine.validate``.

Text syntax (objectives are maximised)::

    LAYER:C            channel C of LAYER (mean over positions)
    LAYER:C@X,Y        neuron: channel C at column X, row Y of LAYER's activation map (or patch grid of tokens)
    LAYER:C@T          neuron of a token tensor (N, tokens, C): channel C of token T (@0: the CLS token)
    LAYER              DeepDream: mean(LAYER ** 2)
    logit:K  prob:K    class K's logit / softmax probability
    diversity:LAYER  alignment:LAYER  l1  l2  tv  blur  bilateral   (regularizers; see the kinds below)
    prior:DATASET      the learned patch prior (EPLL) of an image set: its NLL, to subtract (- 0.1*prior:DATASET)
    match:LAYER:C@INDEX  exemplar matching (VITAL): the distance of the sorted features at LAYER to those of
                       unit LAYER:C's top-8 examples in exemplar index INDEX, to subtract (- 0.5*match:LAYER:C@IX)
    -OBJ   2*OBJ   OBJ*0.5   OBJ / 4   A + B   A - 0.5*B   (A + B) * 2
    {...}              a whole JSON objective spec (for direction, interpolate, batch, ...)

Quoting rule for ONNX names. A bare layer name is a run of letters, digits and ``_ . / - # ~ [ ]``, not
starting with a digit or '-'. So ``/_blocks.9/Clip:12`` needs no quotes, and ``+``, ``-`` and ``/`` between
objectives must be set off by spaces (``A - B``, ``A / 2``; ``A-B`` is one name). A name with any other
character (``:``, ``@``, ``,``, spaces, ``*``, ``+``...), or a name that is a keyword (``logit``, ``prob``,
``l1``, ``l2``, ``tv``, ``blur``, ``bilateral``, ``diversity``, ``alignment``, ``prior``, ``match``), or that
starts with a digit, goes in single or double quotes; inside quotes a backslash escapes the next character:
``'conv1/Relu:0':5``, ``"it's"`` or ``'it\\'s'``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from featureviz.errors import InvalidSpec
from featureviz.errors import echo

__all__ = [
    "KINDS",
    "Kind",
    "Field",
    "Keyword",
    "REQUIRED",
    "walk_spec",
    "proto_path",
    "keyword_forms",
    "MAX_DEPTH",
    "parse_objective",
    "normalize_objective",
    "format_objective",
    "objective_layers",
    "check_preprocess",
]

MAX_DEPTH = 32  # nesting of composite objectives; sums of many terms are flat and not limited by this

_BARE_NAME = re.compile(r"[A-Za-z_./#~\[\]][A-Za-z0-9_./#~\[\]\-]*")
_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INT = re.compile(r"\d+")


# ---------------------------------------------------------------------------------------------------------------
# the declaration: one Kind per objective kind (fields, types, defaults, engine class, text form). Everything below
# (normalize, layers, walk, parse, format) and elsewhere (the engine's build/walk/spec, the model checks of
# featureviz.engine.render.validate, the proto conversion of featureviz.codec) is derived from KINDS.


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()


def _layer(value, path):
    if not isinstance(value, str) or not value:
        raise InvalidSpec(path, f"must be a non-empty layer name (string), got {echo(value)}")
    return value


def _index(value, path):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidSpec(path, f"must be an integer >= 0, got {echo(value)}")
    return value


_DATASET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


def _dataset(value, path):
    """A learned prior's image set: a dataset id on a server, a name given with ``--prior-images NAME=DIR`` locally.
    Only a key to look up (never a path): letters, digits, ``_ . -``, not starting with ``.`` or ``-``, 1..128."""
    if not isinstance(value, str) or not _DATASET_NAME.fullmatch(value):
        raise InvalidSpec(path, f"must be an image set name or dataset id (letters, digits, '_', '.', '-', up to 128, "
                                f"not starting with '.' or '-'), got {echo(value)}")
    return value


def _opt_index(value, path):
    return None if value is None else _index(value, path)


def _number(value, path):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidSpec(path, f"must be a finite number, got {echo(value)}")
    return float(value)


def _nonneg(value, path):
    value = _number(value, path)
    if value < 0:
        raise InvalidSpec(path, f"must be >= 0, got {value}")
    return value


def _positive(value, path):
    value = _number(value, path)
    if value <= 0:
        raise InvalidSpec(path, f"must be > 0, got {value}")
    return value


def _vector(value, path):
    if not isinstance(value, (list, tuple)) or not value:
        raise InvalidSpec(path, "must be a non-empty list of numbers (one per channel)")
    out = [_number(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not any(out):
        raise InvalidSpec(path, "must not be all zeros")
    return out


@dataclass(frozen=True)
class Type:
    """A field type: ``check(value, path)`` returns the normalized value or raises InvalidSpec. ``role`` tells the
    model checks (``featureviz.engine.render``) what the value refers to: ``layer`` (a catalog name), ``channel``
    (of the kind's layer), ``class`` (of the model's logits), ``image`` (of the batch), ``x``/``y`` (a position in
    the layer), ``vector`` (one value per channel of the layer), ``objective``/``objectives`` (children)."""

    name: str
    check: Callable | None = None
    role: str | None = None
    text: str = ""  # the placeholder in usage messages (LAYER, K, C)


LAYER = Type("layer", _layer, "layer", "LAYER")
CHANNEL = Type("channel", _index, "channel", "C")
CLASS = Type("class", _index, "class", "K")
IMAGE = Type("image", _index, "image", "I")
X = Type("x", _opt_index, "x", "X")
Y = Type("y", _opt_index, "y", "Y")
NUMBER = Type("number", _number, None, "C")
NONNEG = Type("nonneg", _nonneg, None, "C")
POSITIVE = Type("positive", _positive, None, "C")
VECTOR = Type("vector", _vector, "vector", "V")
DATASET = Type("dataset", _dataset, "dataset", "DATASET")
OBJECTIVE = Type("objective", None, "objective")
OBJECTIVES = Type("objectives", None, "objectives")


@dataclass(frozen=True)
class Field:
    type: Type
    default: Any = REQUIRED


@dataclass(frozen=True)
class Keyword:
    """Text form ``KIND`` / ``KIND:ARG``: ``arg`` names the field written after the colon (None: no argument). The
    keyword form is written back when every other field has its default (and ``arg`` is left out at its own)."""

    arg: str | None = None


@dataclass(frozen=True)
class Kind:
    """One objective kind. ``fields`` in order (the proto message's field names); ``engine`` the class in
    ``featureviz.engine.objectives`` (by name) or a class; ``text`` a :class:`Keyword`, a function
    ``(body, fmt) -> str | None`` writing the text (None: JSON), or None (JSON); ``bare``: the one repeated field
    the body may be written as (``{"sum": [A, B]}`` is ``{"sum": {"terms": [A, B]}}``; the engine writes the bare
    list); ``min_batch``: the smallest batch the kind makes sense for; ``check``: a cross-field check
    ``(body, path)`` after the fields'."""

    name: str
    fields: dict
    engine: Any
    text: Any = None
    bare: str | None = None
    min_batch: int = 1
    check: Callable | None = None

    def children(self, body):
        """(child spec, path suffix) of a normalized body, in order."""
        for name, field in self.fields.items():
            if field.type is OBJECTIVE:
                yield body[name], f".{name}"
            elif field.type is OBJECTIVES:
                items = body if isinstance(body, (list, tuple)) else body[name]
                prefix = "" if items is body else f".{name}"
                for i, child in enumerate(items):
                    yield child, f"{prefix}[{i}]"


def _x_needs_y(body, path):
    if body.get("x") is None and body.get("y") is not None:
        raise InvalidSpec(f"{path}.x", "give both x and y, neither (centre), or x alone (a token index of a token "
                                       "tensor)")


def _text_neuron(body, fmt):
    if body.get("x") is None:
        return None
    at = f"{body['x']}" if body.get("y") is None else f"{body['x']},{body['y']}"
    return f"{_quote(body['layer'])}:{body['channel']}@{at}"


def _text_sum(body, fmt):
    terms = body if isinstance(body, (list, tuple)) else body["terms"]
    parts = []
    for i, term in enumerate(terms):
        text = fmt(term)
        parts.append(("- " + text[1:]) if i and text.startswith("-") else ("+ " if i else "") + text)
    return " ".join(parts)


def _text_scale(body, fmt):
    inner = fmt(body["objective"])
    if "sum" in body["objective"]:
        inner = f"({inner})"
    return "-" + inner if body["factor"] == -1.0 else f"{_number_text(body['factor'])}*{inner}"


KINDS: dict[str, Kind] = {kind.name: kind for kind in [
    Kind("neuron", {"layer": Field(LAYER), "channel": Field(CHANNEL), "x": Field(X, None), "y": Field(Y, None)},
         "Neuron", _text_neuron, check=_x_needs_y),
    Kind("channel", {"layer": Field(LAYER), "channel": Field(CHANNEL)}, "Channel",
         lambda body, fmt: f"{_quote(body['layer'])}:{body['channel']}"),
    Kind("layer", {"layer": Field(LAYER)}, "Layer", lambda body, fmt: _quote(body["layer"])),
    Kind("logit", {"index": Field(CLASS)}, "Logit", Keyword("index")),
    Kind("prob", {"index": Field(CLASS)}, "Prob", Keyword("index")),
    Kind("direction", {"layer": Field(LAYER), "vector": Field(VECTOR), "cossim_pow": Field(NONNEG, 0.0)},
         "Direction"),
    Kind("neuron_direction", {"layer": Field(LAYER), "vector": Field(VECTOR), "x": Field(X, None),
                              "y": Field(Y, None), "cossim_pow": Field(NONNEG, 0.0)}, "NeuronDirection",
         check=_x_needs_y),
    Kind("interpolate", {"a": Field(OBJECTIVE), "b": Field(OBJECTIVE)}, "Interpolate"),
    Kind("diversity", {"layer": Field(LAYER)}, "Diversity", Keyword("layer"), min_batch=2),
    Kind("alignment", {"layer": Field(LAYER), "decay": Field(POSITIVE, 2.0)}, "Alignment", Keyword("layer"),
         min_batch=2),
    Kind("l1", {"constant": Field(NUMBER, 0.5)}, "L1", Keyword("constant")),
    Kind("l2", {"constant": Field(NUMBER, 0.5)}, "L2", Keyword("constant")),
    Kind("tv", {}, "TotalVariation", Keyword()),
    Kind("blur", {}, "Blur", Keyword()),
    Kind("bilateral", {"sigma_space": Field(POSITIVE, 1.0), "sigma_color": Field(POSITIVE, 0.1)}, "Bilateral",
         Keyword()),
    Kind("prior", {"dataset": Field(DATASET)}, "PatchPrior", Keyword("dataset")),
    Kind("sum", {"terms": Field(OBJECTIVES)}, "Sum", _text_sum, bare="terms"),
    Kind("scale", {"factor": Field(NUMBER), "objective": Field(OBJECTIVE)}, "Scale", _text_scale),
    Kind("batch", {"index": Field(IMAGE), "objective": Field(OBJECTIVE)}, "Batch"),
]}


# --- exemplar matching (VITAL; issue 25 item 4): ``match:LAYER:C@INDEX`` --------------------------------------------


def _match_k(value, path):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSpec(path, f"must be an integer >= 1 (examples to match), got {echo(value)}")
    return value


def _opt_layer(value, path):
    return None if value is None else _layer(value, path)


INDEX = Type("index", _dataset, "index", "INDEX")  # an exemplar index id (a key to look up, never a path)
MATCH_K = Type("match_k", _match_k, None, "K")
MATCH_LAYER = Type("match_layer", _opt_layer, "match_layer", "LAYER")
MATCH_DEFAULT_K = 8


def _text_match(body, fmt):
    if body.get("k", MATCH_DEFAULT_K) != MATCH_DEFAULT_K or body.get("match_layer") is not None:
        return None  # JSON
    return f"match:{_quote(body['layer'])}:{body['channel']}@{body['index']}"


KINDS["match"] = Kind("match", {"layer": Field(LAYER), "channel": Field(CHANNEL), "index": Field(INDEX),
                                "k": Field(MATCH_K, MATCH_DEFAULT_K), "match_layer": Field(MATCH_LAYER, None)},
                      "Match", _text_match)
_TEXT_KEYWORDS = {"match"}  # kinds with their own text form, reserved like the Keyword kinds


def _keywords() -> set[str]:
    return _TEXT_KEYWORDS | {name for name, kind in KINDS.items() if isinstance(kind.text, Keyword)}


def keyword_forms() -> list[str]:
    """The keyword text forms, for usage texts: ``logit:K``, ``l1[:C]``, ``tv`` ..."""
    out = []
    for name, kind in KINDS.items():
        if isinstance(kind.text, Keyword):
            arg = kind.fields[kind.text.arg] if kind.text.arg else None
            text = "" if arg is None else f":{arg.type.text}" if arg.default is REQUIRED else f"[:{arg.type.text}]"
            out.append(name + text)
    return out


def normalize_objective(spec, path: str = "objective", *, defaults: bool = True, bare: bool = True) -> dict:
    """Check a spec's structure and types and return a copy with every default filled in.

    Raises :class:`InvalidSpec` naming the dotted field path (``objective.sum[1].channel.channel``) for an
    unknown kind, a missing or unknown field, a wrong type, or nesting deeper than :data:`MAX_DEPTH`.
    ``defaults=False`` leaves unset optional fields out (what the proto carries); ``bare=False`` writes a
    :attr:`Kind.bare` body as its field (``{"sum": {"terms": [...]}}``: the proto's JSON mapping).
    """
    return _normalize(spec, path, 0, defaults, bare)


def _normalize(spec, path, depth, defaults, bare):
    if depth > MAX_DEPTH:
        raise InvalidSpec(path, f"objective nested deeper than {MAX_DEPTH} levels; flatten sums into one 'sum'")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise InvalidSpec(path, f"must be an object with exactly one key naming the kind, one of {', '.join(KINDS)}; "
                                f"got {_short(spec)}")
    (name, body), = spec.items()
    here = f"{path}.{name}"
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise InvalidSpec(path, f"unknown objective kind {echo(name)}; known kinds: {', '.join(KINDS)}")
    shorthand = kind.bare is not None and not isinstance(body, dict)
    if shorthand:
        body = {kind.bare: body}
    elif not isinstance(body, dict):
        raise InvalidSpec(here, f"must be an object of fields, got {_short(body)}")
    _only(body, set(kind.fields), here)
    out = {}
    for field_name, field in kind.fields.items():
        where = here if shorthand and field_name == kind.bare else f"{here}.{field_name}"
        if field_name not in body:
            if field.default is REQUIRED:
                raise InvalidSpec(where, "is required")
            if defaults:
                out[field_name] = field.default
            continue
        value = body[field_name]
        if field.type is OBJECTIVE:
            value = _normalize(value, where, depth + 1, defaults, bare)
        elif field.type is OBJECTIVES:
            if not isinstance(value, (list, tuple)) or not value:
                raise InvalidSpec(where, "must be a non-empty list of objectives")
            value = [_normalize(term, f"{where}[{i}]", depth + 1, defaults, bare) for i, term in enumerate(value)]
        else:
            value = field.type.check(value, where)
            if value is None and not defaults:
                continue
        out[field_name] = value
    if kind.check is not None:
        kind.check(out, here)
    return {name: out[kind.bare] if bare and kind.bare else out}


def walk_spec(spec: dict, path: str = "objective"):
    """(kind, body, path) of every node of a spec, parents before children (iterative: long sums are fine)."""
    stack = [(spec, path)]
    while stack:
        node, here = stack.pop()
        (name, body), = node.items()
        kind = KINDS[name]
        here = f"{here}.{name}"
        yield kind, body, here
        stack.extend(reversed([(child, here + suffix) for child, suffix in kind.children(body)]))


def proto_path(path: str) -> str:
    """An engine spec path (``objective.sum[1].channel``) -> the proto's (``objective.sum.terms[1].channel``)."""
    for kind in KINDS.values():
        if kind.bare:
            path = path.replace(f"{kind.name}[", f"{kind.name}.{kind.bare}[")
    return path


def _only(body, allowed, path):
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise InvalidSpec(f"{path}.{unknown[0]}", f"unknown field; allowed: {', '.join(sorted(allowed)) or 'none'}")


def _short(value):
    text = json.dumps(value, default=repr) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def objective_layers(spec: dict) -> list[str]:
    """Layer names a (normalized) spec reads, in first-use order, without duplicates; logits are not listed."""
    seen: dict[str, None] = {}
    for kind, body, _ in walk_spec(spec):
        for name, field in kind.fields.items():
            if field.type.role == "layer":
                seen.setdefault(body[name])
    return list(seen)


# ---------------------------------------------------------------------------------------------------------------
# text -> spec


class _Parser:
    """Recursive descent over ``expr := term (('+' | '-') term)*``, ``term := unary (('*' unary) | ('/' NUM))*``,
    ``unary := '-' unary | NUM | atom | '(' expr ')'``. The text is short (a command-line argument)."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def fail(self, what: str, pos: int | None = None):
        pos = self.pos if pos is None else pos
        raise InvalidSpec("objective", f"{what} at column {pos + 1} of {self.text!r} "
                                       f"(syntax: LAYER:C, LAYER:C@X,Y, LAYER, logit:K, prob:K, -OBJ, A + 0.5*B; "
                                       f"quote names containing ':' or spaces)")

    def skip(self):
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str):
        if self.peek() != char:
            self.fail(f"expected {char!r}")
        self.pos += 1

    def parse(self):
        value = self.expr()
        if self.peek():
            self.fail(f"unexpected {self.text[self.pos]!r}")
        if isinstance(value, float):
            self.fail("a number alone is not an objective", 0)
        return value

    # values are either float (a constant) or a list of (factor, atom) terms
    def expr(self):
        terms = self.as_terms(self.term())
        while self.peek() in ("+", "-"):
            op = self.text[self.pos]
            self.pos += 1
            rhs = self.as_terms(self.term())
            terms += [(-f, a) for f, a in rhs] if op == "-" else rhs
        return terms

    def as_terms(self, value):
        if isinstance(value, float):
            self.fail("a number cannot be added to an objective")
        return value

    def term(self):
        value = self.unary()
        while self.peek() in ("*", "/"):
            op_pos = self.pos
            op = self.text[self.pos]
            self.pos += 1
            rhs = self.unary()
            if op == "/":
                if not isinstance(rhs, float):
                    self.fail("an objective can only be divided by a number", op_pos)
                if rhs == 0:
                    self.fail("division by zero", op_pos)
                rhs = 1.0 / rhs
            if isinstance(value, float) and isinstance(rhs, float):
                value = value * rhs
            elif isinstance(value, float):
                value = [(value * f, a) for f, a in rhs]
            elif isinstance(rhs, float):
                value = [(rhs * f, a) for f, a in value]
            else:
                self.fail("two objectives cannot be multiplied", op_pos)
        return value

    def unary(self):
        char = self.peek()
        if char == "-":
            self.pos += 1
            value = self.unary()
            return -value if isinstance(value, float) else [(-f, a) for f, a in value]
        if char == "(":
            self.pos += 1
            value = self.expr()
            self.expect(")")
            return value
        if char == "{":
            return [(1.0, self.json_spec())]
        match = _NUMBER.match(self.text, self.pos)
        if match and (char.isdigit() or char == "."):
            self.pos = match.end()
            return float(match.group())
        return [(1.0, self.atom())]

    def json_spec(self):
        start = self.pos
        try:
            spec, end = json.JSONDecoder().raw_decode(self.text, self.pos)
        except json.JSONDecodeError as exc:
            self.fail(f"invalid JSON objective ({exc.msg})", start)
        self.pos = end
        return normalize_objective(spec)

    def name(self) -> tuple[str, bool]:
        """A layer name and whether it was quoted."""
        char = self.peek()
        if char in ("'", '"'):
            start = self.pos
            self.pos += 1
            out = []
            while self.pos < len(self.text) and self.text[self.pos] != char:
                if self.text[self.pos] == "\\" and self.pos + 1 < len(self.text):
                    self.pos += 1
                out.append(self.text[self.pos])
                self.pos += 1
            if self.pos >= len(self.text):
                self.fail("unterminated quoted name", start)
            self.pos += 1
            if not out:
                self.fail("empty quoted name", start)
            return "".join(out), True
        match = _BARE_NAME.match(self.text, self.pos)
        if not match:
            self.fail("expected a layer name, a number or '('" if char else "expected an objective")
        self.pos = match.end()
        return match.group(), False

    def dataset_name(self) -> str:
        """A dataset name: quoted, or a bare run of letters, digits and ``_ . -`` (it may start with a digit: a
        server's dataset id is a sha256)."""
        if self.peek() in ("'", '"'):
            return self.name()[0]
        match = _DATASET_NAME.match(self.text, self.pos)
        if not match:
            self.fail("expected an image set name or dataset id")
        self.pos = match.end()
        return match.group()

    def integer(self, what: str) -> int:
        self.skip()
        match = _INT.match(self.text, self.pos)
        if not match:
            self.fail(f"expected {what} (an integer)")
        self.pos = match.end()
        return int(match.group())

    def atom(self) -> dict:
        name, quoted = self.name()
        # no whitespace is allowed inside an atom: 'a : 3' is an error, not two things
        has_colon = self.pos < len(self.text) and self.text[self.pos] == ":"
        if not quoted and name == "match" and has_colon:
            return self.match()
        if not quoted and name in _keywords():
            return self.keyword(KINDS[name], has_colon)
        if not has_colon:
            return {"layer": {"layer": name}}
        self.pos += 1
        channel = self.integer("a channel index")
        if self.pos < len(self.text) and self.text[self.pos] == "@":
            self.pos += 1
            x = self.integer("the column X (or a token index)")
            self.skip()
            if self.pos < len(self.text) and self.text[self.pos] == ",":
                self.pos += 1
                y = self.integer("the row Y")
            else:  # LAYER:C@T: token T of a token tensor
                y = None
            return {"neuron": {"layer": name, "channel": channel, "x": x, "y": y}}
        return {"channel": {"layer": name, "channel": channel}}

    def match(self) -> dict:
        """``match:LAYER:C@INDEX`` (exemplar matching, k and the match layer at their defaults; else JSON)."""
        self.pos += 1
        layer, _ = self.name()
        if self.pos >= len(self.text) or self.text[self.pos] != ":":
            self.fail("expected ':C@INDEX' after match:LAYER (syntax match:LAYER:C@INDEX)")
        self.pos += 1
        channel = self.integer("a channel index")
        if self.pos >= len(self.text) or self.text[self.pos] != "@":
            self.fail("expected '@INDEX' (an exemplar index id) after match:LAYER:C")
        self.pos += 1
        return {"match": {"layer": layer, "channel": channel, "index": self.dataset_name()}}

    def keyword(self, kind: Kind, has_colon: bool) -> dict:
        """``KIND`` or ``KIND:ARG`` of a kind with a :class:`Keyword` text form."""
        arg = kind.text.arg
        if has_colon:
            if arg is None:
                self.fail(f"{kind.name} takes no argument")
            self.pos += 1
            return {kind.name: {arg: self.argument(arg, kind.fields[arg].type)}}
        if arg is not None and kind.fields[arg].default is REQUIRED:
            self.fail(f"{kind.name} needs an argument: {kind.name}:{kind.fields[arg].type.text}")
        return {kind.name: {}}

    def argument(self, name: str, type_: Type):
        if type_.check is _layer:
            return self.name()[0]
        if type_.check is _dataset:
            return self.dataset_name()
        if type_.check in (_index, _opt_index):
            return self.integer("a class index" if type_ is CLASS else f"the {name}")
        return self.number(f"the {name}")

    def number(self, what: str) -> float:
        self.skip()
        sign = 1.0
        if self.pos < len(self.text) and self.text[self.pos] == "-":
            sign = -1.0
            self.pos += 1
        match = _NUMBER.match(self.text, self.pos)
        if not match:
            self.fail(f"expected {what} (a number)")
        self.pos = match.end()
        return sign * float(match.group())


def parse_objective(text: str) -> dict:
    """Parse the command-line objective syntax (module docstring) into a normalized spec dict.

    ``"mixed4a:97"`` -> ``{"channel": {"layer": "mixed4a", "channel": 97}}``; ``"A:1 - 0.5*B:2"`` ->
    ``{"sum": [A, {"scale": {"factor": -0.5, "objective": B}}]}``. Raises :class:`InvalidSpec` (field
    ``objective``) naming the column of the first error.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidSpec("objective", "is empty; e.g. 'LAYER:C' for a channel or 'logit:K' for a class")
    terms = _Parser(text).parse()
    specs = [atom if factor == 1.0 else {"scale": {"factor": factor, "objective": atom}} for factor, atom in terms]
    return normalize_objective(specs[0] if len(specs) == 1 else {"sum": specs})


# ---------------------------------------------------------------------------------------------------------------
# spec -> text


def _quote(name: str) -> str:
    match = _BARE_NAME.fullmatch(name)
    if match and name not in _keywords():
        return name
    return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _number_text(value: float) -> str:
    return f"{value:g}"


def format_objective(spec: dict) -> str:
    """A readable one-line text of a spec; kinds the text syntax covers parse back to the same spec."""
    (name, body), = spec.items()
    kind = KINDS.get(name)
    text = None
    if kind is not None and isinstance(kind.text, Keyword):
        text = _keyword_text(kind, body)
    elif kind is not None and kind.text is not None:
        text = kind.text(body, format_objective)
    return text if text is not None else json.dumps(spec, separators=(",", ":"))  # unknown kinds: JSON


def _keyword_text(kind: Kind, body: dict) -> str | None:
    arg = kind.text.arg
    for name, field in kind.fields.items():
        if name != arg and body.get(name, field.default) != field.default:
            return None  # only JSON says it
    if arg is None:
        return kind.name
    field = kind.fields[arg]
    value = body.get(arg, field.default)
    if field.default is not REQUIRED and value == field.default:
        return kind.name
    if field.type.check is _layer:
        return f"{kind.name}:{_quote(value)}"
    if field.type.check is _dataset:
        return f"{kind.name}:{value}"  # the name's own characters need no quotes
    return f"{kind.name}:{_number_text(value) if isinstance(value, float) else value}"



# ---------------------------------------------------------------------------------------------------------------
# preprocessing: the one rule, for a job's spec (the importer's Preprocess, the engine's validate) and an upload's
# header (the server, before any byte is stored)

MIN_STD = 1e-6  # model_input = (image - mean) / std: a smaller std makes float32 inputs of 1e6 and more
MAX_PREPROCESS_ABS = 1e6


def check_preprocess(mean, std, channel_order: str = "RGB", field: str = "preprocess") -> None:
    """Raise :class:`InvalidSpec` naming the first bad value (``preprocess.std[0]``) unless ``mean`` and ``std``
    have 1 or 3 values each, the same number, every mean a finite number within +-1e6, every std a finite number
    from 1e-6 to 1e6, and ``channel_order`` is ``RGB`` or ``BGR`` (empty: RGB)."""
    if channel_order not in ("", "RGB", "BGR"):
        raise InvalidSpec(f"{field}.channel_order", f"must be 'RGB' or 'BGR', got {echo(channel_order)}")
    try:
        mean, std = list(mean), list(std)
    except TypeError:
        raise InvalidSpec(field, f"mean and std must be lists of numbers, got {echo(mean)} and {echo(std)}") from None
    if len(mean) != len(std) or len(mean) not in (1, 3):
        raise InvalidSpec(field, f"mean and std need 1 or 3 values each (one per channel, or one for all), got "
                                 f"{echo(mean)} and {echo(std)}")
    for name, values, low in (("mean", mean, -MAX_PREPROCESS_ABS), ("std", std, MIN_STD)):
        for i, value in enumerate(values):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and low <= value <= MAX_PREPROCESS_ABS):
                raise InvalidSpec(f"{field}.{name}[{i}]", f"must be a finite number from {low:g} to "
                                                          f"{MAX_PREPROCESS_ABS:g}, got {echo(value)}")
