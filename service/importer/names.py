"""Safe names: no string of an uploaded ONNX file reaches code that Python generates or evaluates.

onnx2torch names each torch submodule after its ONNX node, and ``torch.fx`` writes module names into the Python
source of ``forward`` that it then runs (``getattr(self, "{name}")``, unescaped): a node named
``r", open("pwned", "w"), "`` ran code on import. So before any clean-up or conversion, :func:`sanitize` gives
every node ``n<i>``, every value (inputs, outputs, initializers, intermediates, subgraph values) ``v<i>`` and every
graph ``g<i>``: plain ASCII identifiers, never keywords, unique. The originals are kept in :class:`Names`
(safe -> original) and the catalog is built from them, so users address layers by the names in their file.

Other strings are dropped or normalized (none is needed to run the model): doc strings, metadata, producer,
model domain, quantization annotations, training info and model-local functions (inlined before this). A node of
a non-standard operator domain, at any depth, is refused (``CUSTOM_DOMAIN``); ``ai.onnx`` is written ``""``.
String attribute values (``auto_pad``, ``mode``) stay: they are data that reach torch functions as arguments,
and fx writes constants with ``repr``. Attribute names are checked against the operator's schema by the ONNX
checker. A name longer than :data:`MAX_NAME_CHARS` is refused (``INVALID_MODEL``): the catalog keeps every name.

Belt and braces: :func:`check_safe` refuses a graph with any other name right before conversion, and
:func:`check_graph_module` checks the converted fx graph (whose code torch regenerates on truncation).
"""

from __future__ import annotations

import contextlib
import keyword
import re
from dataclasses import dataclass
from dataclasses import field

from torch import fx

from featureviz.errors import ECHO_CHARS
from featureviz.errors import ModelImportError
from featureviz.errors import echo
from featureviz.importer._lazy import lazy
from featureviz.importer.catalog import module_name

onnx = lazy("onnx")

__all__ = ["Names", "sanitize", "finalize", "check_safe", "check_graph_module", "MAX_NAME_CHARS", "SAFE_NAME"]

MAX_NAME_CHARS = 4096
SAFE_NAME = re.compile(r"[nvg][0-9]+\Z")
_STANDARD_DOMAINS = ("", "ai.onnx")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# a safe id inside a name the clean-up built from it ("n17/featureviz/x2", "featureviz/batch/n4/0/Shape")
_EMBEDDED = re.compile(r"(?<![A-Za-z0-9])[nv][0-9]+(?![0-9])")


@dataclass
class Names:
    """The file's names by safe id (nodes ``n<i>``, values ``v<i>``); after :func:`finalize`, ``nodes`` holds the
    catalog's node name of every node (unique; ``<OpType>_<index>`` for an unnamed one)."""

    original: dict[str, str] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)  # original value name -> safe id
    nodes: dict[str, str] = field(default_factory=dict)
    added: dict[str, str] = field(default_factory=dict)  # a value name the clean-up added -> safe id

    def value(self, name: str) -> str:
        """The safe id of a value of the file (its input's name, say)."""
        return self.values[name]

    def node_name(self, safe: str) -> str:
        return self.nodes.get(safe) or self.original.get(safe, safe)

    def tensor_name(self, safe: str) -> str:
        return self.original.get(safe, safe)

    def shown(self, generated: str) -> str:
        """A name the clean-up built from safe ids, with the file's names put back (the name it had before)."""
        return _EMBEDDED.sub(lambda m: self.original.get(m.group(0), m.group(0)), generated)

    @contextlib.contextmanager
    def in_errors(self):
        """Errors raised inside name the file's nodes and values, not their safe ids (escaped, capped: still one
        line)."""
        try:
            yield
        except ModelImportError as exc:
            def named(found):
                token = found.group(0)
                if token not in self.original:
                    return token
                text = ascii(self.node_name(token) if token.startswith("n") else self.tensor_name(token))[1:-1]
                return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + "\u2026"
            raise ModelImportError(_EMBEDDED.sub(named, exc.message), reason=exc.reason) from exc


class _Renamer:
    def __init__(self, names: Names):
        self.names = names
        self.count = {"n": 0, "v": 0, "g": 0}

    def fresh(self, kind: str, original: str) -> str:
        safe = f"{kind}{self.count[kind]}"
        self.count[kind] += 1
        self.names.original[safe] = original
        return safe

    def value(self, name: str) -> str:
        if not name:
            return name  # an omitted optional input or output
        _check_length(name, "value")
        safe = self.names.values.get(name)
        if safe is None:
            safe = self.names.values[name] = self.fresh("v", name)
        return safe


def _check_length(name: str, what: str) -> None:
    if len(name) > MAX_NAME_CHARS:
        raise ModelImportError(
            f"a {what} name of the model is {len(name)} characters long ({echo(name)}), above the limit of "
            f"{MAX_NAME_CHARS}; rename it before export", reason="INVALID_MODEL")


def _rename_graph(graph, renamer: _Renamer, top: bool = True) -> None:
    graph.name = renamer.fresh("g", "")  # the file's graph name is not kept: nothing shows it
    graph.doc_string = ""
    for value in (*graph.input, *graph.output, *graph.value_info):
        value.name = renamer.value(value.name)
        value.doc_string = ""
    for tensor in graph.initializer:
        tensor.name = renamer.value(tensor.name)
        tensor.doc_string = ""
    for sparse in graph.sparse_initializer:
        sparse.values.name = renamer.value(sparse.values.name)
        sparse.indices.name = renamer.value(sparse.indices.name) if sparse.indices.name else ""
    graph.ClearField("quantization_annotation")
    for node in graph.node:
        _check_length(node.name, "node")
        if node.domain not in _STANDARD_DOMAINS:
            raise ModelImportError(
                f"operator {echo(node.op_type)} of custom domain {echo(node.domain)} (node {echo(node.name)}) has "
                "no standard definition; only ai.onnx operators can be imported (export without custom ops)",
                reason="CUSTOM_DOMAIN")
        node.domain = ""
        original = node.name
        # an unnamed node of the main graph stays unnamed until finalize: the clean-up names what it builds
        # from it by its output, as before
        node.name = renamer.fresh("n", node.name) if node.name or not top else ""
        node.doc_string = ""
        if _has_field(node, "metadata_props"):
            node.ClearField("metadata_props")
        for i, name in enumerate(node.input):
            node.input[i] = renamer.value(name)
        for i, name in enumerate(node.output):
            node.output[i] = renamer.value(name)
        for attr in node.attribute:
            attr.doc_string = ""
            for tensor in ([attr.t] if attr.HasField("t") else []) + list(attr.tensors):
                tensor.name, tensor.doc_string = "", ""  # a Constant's value: its name is the node's output
            if attr.ref_attr_name:
                raise ModelImportError(f"node {echo(original)} refers to a function attribute outside a function",
                                       reason="INVALID_MODEL")
            if attr.HasField("g"):
                _rename_graph(attr.g, renamer, top=False)
            for sub in attr.graphs:
                _rename_graph(sub, renamer, top=False)


def _has_field(message, name: str) -> bool:
    return name in message.DESCRIPTOR.fields_by_name


def sanitize(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Names]:
    """A copy of the checked, inlined ``model`` with safe names and no free text; the file's names by safe id."""
    safe = onnx.ModelProto()
    safe.CopyFrom(model)
    if safe.functions:  # inlined by load.check_model; what is left is unused
        safe.ClearField("functions")
    for name in ("doc_string", "producer_name", "producer_version", "domain", "metadata_props", "training_info"):
        safe.ClearField(name)
    opsets = {}
    for entry in safe.opset_import:
        domain = "" if entry.domain in _STANDARD_DOMAINS else entry.domain
        if domain == "":  # other domains are unused (a node of one is refused)
            opsets[domain] = max(opsets.get(domain, 0), entry.version)
    safe.ClearField("opset_import")
    for domain, version in opsets.items():
        safe.opset_import.add(domain=domain, version=version)
    names = Names()
    _rename_graph(safe.graph, _Renamer(names))
    return safe, names


def finalize(model: onnx.ModelProto, names: Names) -> onnx.ModelProto:
    """After clean-up: give the nodes and values the clean-up added safe ids too (their names, built from safe
    ids, are shown with the file's names put back), and fill ``names.nodes``: every node's catalog name, unique,
    ``<OpType>_<index>`` for an unnamed one (the names the importer always gave). In place; returns ``model``."""
    renamer = _Renamer(names)
    renamer.count = {kind: 1 + max((int(s[1:]) for s in names.original if s[0] == kind), default=-1)
                     for kind in "nvg"}
    known = set(names.original)

    def value(name: str) -> str:
        if not name or name in known:
            return name
        safe = names.added.get(name)
        if safe is None:
            safe = names.added[name] = renamer.fresh("v", names.shown(name))
        return safe

    graph = model.graph
    for v in (*graph.input, *graph.output, *graph.value_info):
        v.name = value(v.name)
    for tensor in graph.initializer:
        tensor.name = value(tensor.name)
    seen: set[str] = set()
    used: set[str] = set()
    for i, node in enumerate(graph.node):
        if node.name not in known or node.name in used or not node.name.startswith("n"):
            node.name = renamer.fresh("n", names.shown(node.name))
        used.add(node.name)
        for k, name in enumerate(node.input):
            node.input[k] = value(name)
        for k, name in enumerate(node.output):
            node.output[k] = value(name)
        shown = names.original[node.name] or f"{node.op_type}_{i}"
        base, k = shown, 1
        while shown in seen or module_name(shown) in seen:
            shown = f"{base}_{k}"
            k += 1
        seen.update((shown, module_name(shown)))
        names.nodes[node.name] = shown
    check_safe(model)
    return model


def _safe(name: str) -> bool:
    return bool(SAFE_NAME.match(name))


def _graph_names(graph):
    yield "graph", graph.name
    for v in (*graph.input, *graph.output, *graph.value_info, *graph.initializer):
        yield "value", v.name
    for node in graph.node:
        yield "node", node.name
        if node.domain:
            yield "domain", node.domain
        for name in (*node.input, *node.output):
            if name:
                yield "value", name
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _graph_names(sub)


def check_safe(model: onnx.ModelProto) -> None:
    """Refuse (as an importer bug, ``CONVERSION_FAILED``) a graph that holds any name but a safe id."""
    for what, name in _graph_names(model.graph):
        if not _safe(name):
            raise ModelImportError(f"internal error: the {what} name {echo(name)} was not replaced by a safe "
                                   "identifier before conversion; the model is refused", reason="CONVERSION_FAILED")


def check_graph_module(module) -> None:
    """Every name torch writes into the code of the converted graph (and of the traced graphs ``make_portable``
    put in it) is a plain identifier (module targets: dotted identifiers)."""
    for gm in module.modules():
        if isinstance(gm, fx.GraphModule):
            _check_graph(gm)


def _check_graph(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        parts = node.target.split(".") if isinstance(node.target, str) else []
        if node.op in ("placeholder", "call_method"):
            parts = [node.target.lstrip("*") if node.op == "placeholder" else node.target]  # *args, **kwargs
        if not all(_IDENTIFIER.match(p) and not keyword.iskeyword(p) for p in parts + [node.name]):
            raise ModelImportError(f"internal error: the converted graph names {echo(node.target)}, not a plain "
                                   "identifier; the model is refused", reason="CONVERSION_FAILED")
