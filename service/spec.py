"""Objective specs: the text syntax of the command line and structural validation. No torch here.

An objective spec is a JSON-able dict with exactly one key naming its kind (docs/ARCHITECTURE.md); the CLI,
the gRPC servicer and the engine all speak it. This module turns the command-line text into a spec
(:func:`parse_objective`), checks a spec's structure and fills its defaults (:func:`normalize_objective`) and
writes a spec back as text (:func:`format_objective`). Whether a layer exists or a channel is in range needs
the model: that is ``featureviz.engine.validate``.

Text syntax (objectives are maximised)::

    LAYER:C            channel C of LAYER (mean over positions)
    LAYER:C@X,Y        neuron: channel C at column X, row Y of LAYER's activation map (or patch grid of tokens)
    LAYER:C@T          neuron of a token tensor (N, tokens, C): channel C of token T (@0: the CLS token)
    LAYER              DeepDream: mean(LAYER ** 2)
    logit:K  prob:K    class K's logit / softmax probability
    diversity:LAYER  alignment:LAYER  l1  l2  tv  blur      (regularizers; see the kinds below)
    -OBJ   2*OBJ   OBJ*0.5   OBJ / 4   A + B   A - 0.5*B   (A + B) * 2
    {...}              a whole JSON objective spec (for direction, interpolate, batch, ...)

Quoting rule for ONNX names. A bare layer name is a run of letters, digits and ``_ . / - # ~ [ ]``, not
starting with a digit or '-'. So ``/_blocks.9/Clip:12`` needs no quotes, and ``+``, ``-`` and ``/`` between
objectives must be set off by spaces (``A - B``, ``A / 2``; ``A-B`` is one name). A name with any other
character (``:``, ``@``, ``,``, spaces, ``*``, ``+``...), or a name that is a keyword (``logit``, ``prob``,
``l1``, ``l2``, ``tv``, ``blur``, ``diversity``, ``alignment``), or that starts with a digit, goes in single or
double quotes; inside quotes a backslash escapes the next character: ``'conv1/Relu:0':5``,
``"it's"`` or ``'it\\'s'``.
"""

from __future__ import annotations

import json
import math
import re

from featureviz.errors import InvalidSpec
from featureviz.errors import echo

__all__ = [
    "KINDS",
    "MAX_DEPTH",
    "parse_objective",
    "normalize_objective",
    "format_objective",
    "objective_layers",
]

MAX_DEPTH = 32  # nesting of composite objectives; sums of many terms are flat and not limited by this

_KEYWORDS = {"logit", "prob", "l1", "l2", "tv", "blur", "diversity", "alignment"}
_BARE_NAME = re.compile(r"[A-Za-z_./#~\[\]][A-Za-z0-9_./#~\[\]\-]*")
_NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_INT = re.compile(r"\d+")


# ---------------------------------------------------------------------------------------------------------------
# structure: kind -> {field: (checker, default)}; _REQUIRED marks fields without a default

_REQUIRED = object()


def _layer(value, path):
    if not isinstance(value, str) or not value:
        raise InvalidSpec(path, f"must be a non-empty layer name (string), got {echo(value)}")
    return value


def _index(value, path):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidSpec(path, f"must be an integer >= 0, got {echo(value)}")
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


_FIELDS = {
    "neuron": {"layer": (_layer, _REQUIRED), "channel": (_index, _REQUIRED), "x": (_opt_index, None),
               "y": (_opt_index, None)},
    "channel": {"layer": (_layer, _REQUIRED), "channel": (_index, _REQUIRED)},
    "layer": {"layer": (_layer, _REQUIRED)},
    "logit": {"index": (_index, _REQUIRED)},
    "prob": {"index": (_index, _REQUIRED)},
    "direction": {"layer": (_layer, _REQUIRED), "vector": (_vector, _REQUIRED), "cossim_pow": (_nonneg, 0.0)},
    "neuron_direction": {"layer": (_layer, _REQUIRED), "vector": (_vector, _REQUIRED), "x": (_opt_index, None),
                         "y": (_opt_index, None), "cossim_pow": (_nonneg, 0.0)},
    "diversity": {"layer": (_layer, _REQUIRED)},
    "alignment": {"layer": (_layer, _REQUIRED), "decay": (_positive, 2.0)},
    "l1": {"constant": (_number, 0.5)},
    "l2": {"constant": (_number, 0.5)},
    "tv": {},
    "blur": {},
}
_COMPOSITE = {"sum", "scale", "batch", "interpolate"}
KINDS = tuple(list(_FIELDS) + sorted(_COMPOSITE))


def normalize_objective(spec, path: str = "objective") -> dict:
    """Check a spec's structure and return a copy with every default filled in.

    Raises :class:`InvalidSpec` naming the dotted field path (``objective.sum[1].channel.channel``) for an
    unknown kind, a missing or unknown field, a wrong type, or nesting deeper than :data:`MAX_DEPTH`.
    """
    return _normalize(spec, path, 0)


def _normalize(spec, path, depth):
    if depth > MAX_DEPTH:
        raise InvalidSpec(path, f"objective nested deeper than {MAX_DEPTH} levels; flatten sums into one 'sum'")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise InvalidSpec(path, f"must be an object with exactly one key naming the kind, one of {', '.join(KINDS)}; "
                                f"got {_short(spec)}")
    (kind, body), = spec.items()
    here = f"{path}.{kind}"
    if kind == "sum":
        if not isinstance(body, (list, tuple)) or not body:
            raise InvalidSpec(here, "must be a non-empty list of objectives")
        return {"sum": [_normalize(term, f"{here}[{i}]", depth + 1) for i, term in enumerate(body)]}
    if kind not in _FIELDS and kind not in _COMPOSITE:
        raise InvalidSpec(path, f"unknown objective kind {echo(kind)}; known kinds: {', '.join(KINDS)}")
    if not isinstance(body, dict):
        raise InvalidSpec(here, f"must be an object of fields, got {_short(body)}")
    if kind == "scale":
        _only(body, {"factor", "objective"}, here)
        return {"scale": {"factor": _number(_get(body, "factor", here), f"{here}.factor"),
                          "objective": _normalize(_get(body, "objective", here), f"{here}.objective", depth + 1)}}
    if kind == "batch":
        _only(body, {"index", "objective"}, here)
        return {"batch": {"index": _index(_get(body, "index", here), f"{here}.index"),
                          "objective": _normalize(_get(body, "objective", here), f"{here}.objective", depth + 1)}}
    if kind == "interpolate":
        _only(body, {"a", "b"}, here)
        return {"interpolate": {"a": _normalize(_get(body, "a", here), f"{here}.a", depth + 1),
                                "b": _normalize(_get(body, "b", here), f"{here}.b", depth + 1)}}
    fields = _FIELDS[kind]
    _only(body, set(fields), here)
    out = {}
    for name, (check, default) in fields.items():
        if name in body:
            out[name] = check(body[name], f"{here}.{name}")
        elif default is _REQUIRED:
            raise InvalidSpec(f"{here}.{name}", "is required")
        else:
            out[name] = default
    if "x" in out and out["x"] is None and out["y"] is not None:
        raise InvalidSpec(f"{here}.x", "give both x and y, neither (centre), or x alone (a token index of a token "
                                       "tensor)")
    return {kind: out}


def _get(body, name, path):
    if name not in body:
        raise InvalidSpec(f"{path}.{name}", "is required")
    return body[name]


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
    stack = [spec]
    while stack:
        node = stack.pop()
        (kind, body), = node.items()
        if kind == "sum":
            stack.extend(reversed(body))
        elif kind in ("scale", "batch"):
            stack.append(body["objective"])
        elif kind == "interpolate":
            stack.extend([body["b"], body["a"]])
        elif "layer" in body:
            seen.setdefault(body["layer"])
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
        if not quoted and name in _KEYWORDS:
            if name in ("l1", "l2", "tv", "blur"):
                if has_colon:
                    if name in ("tv", "blur"):
                        self.fail(f"{name} takes no argument")
                    self.pos += 1
                    constant = self.number("the constant")
                    return {name: {"constant": constant}}
                return normalize_objective({name: {}})
            if not has_colon:
                self.fail(f"{name} needs an argument: {name}:" + ("K" if name in ("logit", "prob") else "LAYER"))
            self.pos += 1
            if name in ("logit", "prob"):
                return {name: {"index": self.integer("a class index")}}
            layer, _ = self.name()
            return normalize_objective({name: {"layer": layer}})
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
    if match and name not in _KEYWORDS:
        return name
    return "'" + name.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _number_text(value: float) -> str:
    return f"{value:g}"


def format_objective(spec: dict) -> str:
    """A readable one-line text of a spec; kinds the text syntax covers parse back to the same spec."""
    (kind, body), = spec.items()
    if kind == "sum":
        parts = []
        for i, term in enumerate(body):
            text = format_objective(term)
            if i and text.startswith("-"):
                parts.append("- " + text[1:])
            else:
                parts.append(("+ " if i else "") + text)
        return " ".join(parts)
    if kind == "scale":
        inner = format_objective(body["objective"])
        if "sum" in body["objective"]:
            inner = f"({inner})"
        if body["factor"] == -1.0:
            return "-" + inner
        return f"{_number_text(body['factor'])}*{inner}"
    if kind == "channel":
        return f"{_quote(body['layer'])}:{body['channel']}"
    if kind == "neuron":
        if body.get("x") is None:
            return json.dumps(spec, separators=(",", ":"))
        if body.get("y") is None:
            return f"{_quote(body['layer'])}:{body['channel']}@{body['x']}"
        return f"{_quote(body['layer'])}:{body['channel']}@{body['x']},{body['y']}"
    if kind == "layer":
        return _quote(body["layer"])
    if kind in ("logit", "prob"):
        return f"{kind}:{body['index']}"
    if kind in ("diversity",) or (kind == "alignment" and body.get("decay", 2.0) == 2.0):
        return f"{kind}:{_quote(body['layer'])}"
    if kind in ("l1", "l2"):
        constant = body.get("constant", 0.5)
        return kind if constant == 0.5 else f"{kind}:{_number_text(constant)}"
    if kind in ("tv", "blur"):
        return kind
    return json.dumps(spec, separators=(",", ":"))
