"""Signalling pathway graphs: signed, annotated, validated, with a small curated library.

A :class:`PathwayGraph` wraps a :class:`networkx.DiGraph` of signalling nodes. Each node
has a ``role`` (ligand, receptor, adaptor, kinase, gtpase, phosphatase,
transcription_factor, hormone, enzyme, phenotype), the HGNC ``genes`` it stands for (used
to map omics and drug targets onto nodes) and, for phenotype nodes, an ``output``
(proliferation, death or biomarker, the latter with the name of the observable, e.g.
``psa``). Edges carry a sign (+1 activation, -1 inhibition), an optional default weight
and an optional ``feedback`` flag for edges that close a regulatory loop. A graph holds
no parameters and no solver state: the model decides the dynamics (see
``docs/pathways.md``).

Files: JSON (the native node-link format, exact round trip), GraphML (networkx), SIF
(``A<TAB>1<TAB>B``, plus an optional ``.nodes.tsv`` table of roles and genes) and BoolNet
``.bnet`` (signs read from the logic). Every reader collects *all* problems, each located
by file, line and field with what was expected, what was received and how to fix it, and
raises one :class:`GraphError` listing them.

>>> from twin.graph import load_pathway
>>> g = load_pathway("mapk_pi3k")
>>> g.nodes_for_gene("BRAF")
['RAF']
>>> g.targets_of("trametinib")
['MEK']

networkx is imported inside the functions that need it, so ``import twin`` stays light.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field as _dc_field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from .drugs import Drug, catalogue, known_drug_names, lookup_drug
from .errors import InputError, Problem, ProblemList, close_matches

__all__ = [
    "ROLES",
    "OUTPUTS",
    "Node",
    "Edge",
    "PathwayGraph",
    "GraphError",
    "GraphProblem",
    "GraphWarning",
    "read_pathway",
    "read_json",
    "write_json",
    "read_sif",
    "write_sif",
    "read_graphml",
    "write_graphml",
    "from_bnet",
    "from_networkx",
    "graph_from_dict",
    "validate_graph",
    "load_pathway",
    "list_pathways",
]

ROLES: tuple[str, ...] = (
    "ligand",
    "receptor",
    "adaptor",
    "kinase",
    "gtpase",
    "phosphatase",
    "transcription_factor",
    "hormone",
    "enzyme",
    "phenotype",
)
OUTPUTS: tuple[str, ...] = ("proliferation", "death", "biomarker")

FORMAT = "twin-pathway/1"
_NODE_KEYS = ("id", "role", "output", "biomarker", "genes", "description", "references")
_EDGE_KEYS = ("source", "target", "sign", "weight", "feedback", "self_loop", "description", "references")
_META_KEYS = ("name", "title", "description", "citation", "doi", "url", "license", "version", "derived_from", "notes", "references")
_TOP_KEYS = ("format",) + _META_KEYS + ("nodes", "edges")
_REFERENCE_KEYS = ("citation", "doi", "url", "used_for")

# HGNC approved symbols: upper-case letters and digits, hyphen-separated parts, and the
# "orf" of open-reading-frame names (C1orf112). Mouse/rat symbols (Braf) fail on purpose.
_HGNC = re.compile(r"^[A-Z][A-Z0-9]*(?:orf[0-9]+)?(?:-[A-Z0-9]+)*$")
_DOI = re.compile(r"^10\.\d{4,9}/\S+$")
_SIF_WORDS = {"1": 1, "+1": 1, "-1": -1, "activates": 1, "inhibits": -1}
MAX_SAME_KIND = 10  # more problems of one kind in one file are summarised in one line


# --------------------------------------------------------------------------------------
# Problems and errors
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphProblem(Problem):
    """A :class:`~twin.errors.Problem` located by *line* (``row`` holds the 1-based line)."""

    @property
    def line(self) -> int | None:
        return self.row

    @property
    def location(self) -> str:
        loc = self.file
        if self.row is not None:
            loc += f" line {self.row}"
        if self.field is not None:
            loc += f", field '{self.field}'"
        return loc


class GraphError(InputError):
    """A pathway graph (file or in-memory) has errors; ``problems`` lists every finding."""

    def __init__(self, path: str, problems: Iterable[Problem]):
        self.path = str(path)
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        others = [p for p in self.problems if p.severity != "error"]
        head = f"{self.path}: {len(errors)} problem(s) prevent loading this pathway graph"
        body = "\n".join(p.format() for p in errors + others)
        super().__init__(f"{head}\n{body}")

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


class GraphWarning(UserWarning):
    """A pathway graph loaded, but with findings worth checking (see ``graph.problems``)."""


class _Collector:
    """Collects located problems, summarising after MAX_SAME_KIND of one kind."""

    def __init__(self, file: str):
        self.file = file
        self.problems = ProblemList()
        self._counts: dict[str, int] = {}

    def add(self, severity: str, kind: str, message: str, *, line=None, field=None, expected=None, received=None, fix=None):
        n = self._counts.get(kind, 0) + 1
        self._counts[kind] = n
        if n <= MAX_SAME_KIND:
            self.problems.items.append(
                GraphProblem(severity, self.file, message, row=line, field=field, expected=expected, received=received, fix=fix)
            )
        elif n == MAX_SAME_KIND + 1:
            self.problems.items.append(
                GraphProblem(severity, self.file, f"more problems of the same kind ({kind}); fix the ones above and load the file again")
            )

    def error(self, kind: str, message: str, **kw):
        self.add("error", kind, message, **kw)

    def warning(self, kind: str, message: str, **kw):
        self.add("warning", kind, message, **kw)

    def note(self, kind: str, message: str, **kw):
        self.add("note", kind, message, **kw)

    @property
    def has_errors(self) -> bool:
        return bool(self.problems.errors)


def _received(v: Any) -> str:
    if v is None:
        return "nothing (null)"
    if isinstance(v, str):
        return repr(v) if v.strip() else "an empty string"
    return f"{v!r} ({type(v).__name__})"


# --------------------------------------------------------------------------------------
# Nodes and edges
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One signalling node.

    Attributes
    ----------
    name : identifier, unique in its graph (e.g. ``RAF``).
    role : one of :data:`ROLES`, or ``None`` where a file gives no role (imports).
    genes : HGNC symbols the node stands for (``RAF`` -> ARAF, BRAF, RAF1).
    output : for phenotype nodes, one of :data:`OUTPUTS`.
    biomarker : for ``output == "biomarker"``, the observable it produces (e.g. ``psa``).
    description : one or two sentences: what the node represents.
    references : short citations supporting the node.
    """

    name: str
    role: str | None = None
    genes: tuple[str, ...] = ()
    output: str | None = None
    biomarker: str | None = None
    description: str = ""
    references: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """The node as a JSON record (empty fields left out)."""
        d: dict[str, Any] = {"id": self.name}
        if self.role is not None:
            d["role"] = self.role
        if self.output is not None:
            d["output"] = self.output
        if self.biomarker is not None:
            d["biomarker"] = self.biomarker
        if self.genes:
            d["genes"] = list(self.genes)
        if self.description:
            d["description"] = self.description
        if self.references:
            d["references"] = list(self.references)
        return d


@dataclass(frozen=True)
class Edge:
    """One signed, directed interaction ``source -> target``.

    Attributes
    ----------
    source, target : node names.
    sign : +1 (activation) or -1 (inhibition).
    weight : optional default magnitude (> 0) of the interaction; the model may use it as
        the centre of a prior. ``None``: the model's default.
    feedback : the edge closes a regulatory loop (e.g. ERK -| EGFR); descriptive, used to
        order nodes in layers and to explain adaptive resistance.
    description, references : what the edge represents and its support.
    """

    source: str
    target: str
    sign: int
    weight: float | None = None
    feedback: bool = False
    description: str = ""
    references: tuple[str, ...] = ()

    @property
    def self_loop(self) -> bool:
        return self.source == self.target

    def to_dict(self) -> dict:
        """The edge as a JSON record (defaults left out; ``self_loop`` written when true)."""
        d: dict[str, Any] = {"source": self.source, "target": self.target, "sign": self.sign}
        if self.weight is not None:
            d["weight"] = self.weight
        if self.feedback:
            d["feedback"] = True
        if self.self_loop:
            d["self_loop"] = True
        if self.description:
            d["description"] = self.description
        if self.references:
            d["references"] = list(self.references)
        return d


# --------------------------------------------------------------------------------------
# Building and validating: one path for every reader
# --------------------------------------------------------------------------------------


@dataclass
class _Rec:
    """A raw node or edge record with where it came from."""

    data: dict
    line: int | None = None
    prefix: str | None = None  # field prefix, e.g. "nodes[3]"
    lines: dict = _dc_field(default_factory=dict)  # key -> line

    def where(self, key: str | None) -> dict:
        fieldname = key if self.prefix is None else (self.prefix if key is None else f"{self.prefix}.{key}")
        return {"line": self.lines.get(key, self.line), "field": fieldname}


def _clean_str_list(value, what: str, rec: _Rec, key: str, col: _Collector, label: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        col.error(
            f"{key} not a list",
            f"{label}: '{key}' must be a list of {what}",
            expected=f"a list of {what}, e.g. [\"BRAF\", \"RAF1\"]" if key == "genes" else f"a list of {what}",
            received=_received(value),
            fix=f"write '{key}' as a JSON list",
            **rec.where(key),
        )
        return ()
    out = []
    for v in value:
        if not isinstance(v, str) or not v.strip():
            col.error(f"{key} item", f"{label}: every item of '{key}' must be a non-empty string", expected=what, received=_received(v), fix=f"remove or correct the item in '{key}'", **rec.where(key))
            continue
        out.append(v.strip())
    return tuple(out)


def _check_meta(meta: dict, col: _Collector, lines: dict, top_prefix: str | None = None) -> dict:
    out: dict[str, Any] = {}
    for key, value in meta.items():
        line = lines.get(key)
        fieldname = key if top_prefix is None else f"{top_prefix}.{key}"
        if key == "references":
            if not isinstance(value, list):
                col.error("metadata type", "'references' must be a list of {citation, doi} objects", line=line, field=fieldname, expected='[{"citation": "Author et al. 2013 Journal 1:2", "doi": "10..."}]', received=_received(value), fix="write references as a list")
                continue
            refs = []
            for i, r in enumerate(value):
                if isinstance(r, str):
                    r = {"citation": r}
                if not isinstance(r, dict) or not isinstance(r.get("citation"), str):
                    col.error("reference", f"reference {i + 1} has no citation text", line=lines.get(("references", i), line), field=f"references[{i}].citation", expected="an object with a 'citation' string", received=_received(r), fix="add \"citation\": \"Author et al. YEAR Journal vol:pages\"")
                    continue
                bad = [k for k in r if k not in _REFERENCE_KEYS]
                for k in bad:
                    col.error("unknown key", f"unknown key '{k}' in reference {i + 1}.{close_matches(k, _REFERENCE_KEYS)}", line=lines.get(("references", i), line), field=f"references[{i}].{k}", expected=", ".join(_REFERENCE_KEYS), received=repr(k), fix="rename or remove the key")
                doi = r.get("doi")
                if doi is not None and (not isinstance(doi, str) or not _DOI.match(doi)):
                    col.warning("doi", f"reference {i + 1}: '{doi}' does not look like a DOI", line=lines.get(("references", i), line), field=f"references[{i}].doi", expected="10.NNNN/suffix (without https://doi.org/)", received=_received(doi), fix="give the bare DOI or leave it out")
                refs.append({k: r[k] for k in _REFERENCE_KEYS if k in r})
            out[key] = refs
            continue
        if not isinstance(value, str):
            col.error("metadata type", f"metadata '{key}' must be text", line=line, field=fieldname, expected="a string", received=_received(value), fix=f"quote the value of '{key}'")
            continue
        if key == "doi" and not _DOI.match(value):
            col.warning("doi", f"'{value}' does not look like a DOI", line=line, field=fieldname, expected="10.NNNN/suffix (without https://doi.org/)", received=repr(value), fix="give the bare DOI or leave it out")
        out[key] = value
    return out


def _parse_sign(value, *, text_ok: bool) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)) and value in (1, -1):
        return int(value)
    if text_ok and isinstance(value, str):
        return _SIF_WORDS.get(value.strip().lower())
    return None


def _parse_bool(value, *, text_ok: bool) -> bool | None:
    if isinstance(value, bool):
        return value
    if text_ok and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _build(
    node_recs: list[_Rec],
    edge_recs: list[_Rec],
    meta: dict,
    col: _Collector,
    *,
    implicit_nodes: bool = False,
    text_values: bool = False,
    allow_self_loops: bool = False,
    meta_lines: dict | None = None,
) -> tuple[dict[str, Node], dict[tuple[str, str], Edge], dict]:
    """Validate raw records; return nodes, edges and metadata (problems go to ``col``)."""
    metadata = _check_meta(meta, col, meta_lines or {})
    nodes: dict[str, Node] = {}
    first_seen: dict[str, _Rec] = {}
    for rec in node_recs:
        d = rec.data
        nid = d.get("id")
        label = f"node {nid!r}" if isinstance(nid, str) else "node"
        for k in d:
            if k not in _NODE_KEYS:
                col.error("unknown key", f"{label}: unknown key '{k}'.{close_matches(k, _NODE_KEYS)}", expected=", ".join(_NODE_KEYS), received=repr(k), fix="rename or remove the key", **rec.where(k))
        if not isinstance(nid, str) or not nid.strip():
            col.error("node id", "node without an 'id'", expected="a non-empty string naming the node", received=_received(nid), fix="give every node a unique id", **rec.where("id"))
            continue
        nid = nid.strip()
        if nid in first_seen:
            first = first_seen[nid]
            col.error("duplicate node", f"node '{nid}' is defined twice" + (f" (first at line {first.line})" if first.line else ""), expected="unique node ids", received=repr(nid), fix="merge the two definitions or rename one", **rec.where("id"))
            continue
        first_seen[nid] = rec
        role = d.get("role")
        if role is not None and (not isinstance(role, str) or role not in ROLES):
            hint = close_matches(role, ROLES) if isinstance(role, str) else ""
            col.error("unknown role", f"{label}: unknown role {role!r}.{hint}", expected="one of " + ", ".join(ROLES), received=_received(role), fix="use one of the roles listed", **rec.where("role"))
            role = None
        output = d.get("output")
        biomarker = d.get("biomarker")
        if role == "phenotype":
            if output is None:
                col.error("phenotype output", f"{label}: a phenotype node needs an 'output'", expected="one of " + ", ".join(OUTPUTS), received="nothing (field absent)", fix='add e.g. "output": "proliferation"', **rec.where("output"))
            elif output not in OUTPUTS:
                hint = close_matches(output, OUTPUTS) if isinstance(output, str) else ""
                col.error("phenotype output", f"{label}: unknown output {output!r}.{hint}", expected="one of " + ", ".join(OUTPUTS), received=_received(output), fix="use one of the outputs listed", **rec.where("output"))
                output = None
        elif output is not None:
            col.error("output on non-phenotype", f"{label}: only phenotype nodes have an 'output' (this node's role is {role!r})", expected="role 'phenotype' or no 'output'", received=f"output {output!r}", fix='set "role": "phenotype" or remove "output"', **rec.where("output"))
            output = None
        if output == "biomarker":
            if not isinstance(biomarker, str) or not biomarker.strip():
                col.error("biomarker name", f"{label}: a biomarker output needs the observable's name in 'biomarker'", expected='a name, e.g. "psa"', received=_received(biomarker), fix='add "biomarker": "psa" (or your observable)', **rec.where("biomarker"))
                biomarker = None
            else:
                from .observables import canonical_observable

                if canonical_observable(biomarker) is None:
                    col.warning("unknown biomarker", f"{label}: biomarker '{biomarker}' is not a known observable", expected="a name from twin.observables.OBSERVABLES (psa, ca125, cea, ...)", received=repr(biomarker), fix="use a known observable or declare it in the patient file", **rec.where("biomarker"))
        elif biomarker is not None:
            col.error("biomarker without output", f"{label}: 'biomarker' is given but the output is not 'biomarker'", expected='"output": "biomarker" together with "biomarker"', received=_received(biomarker), fix='set "output": "biomarker" or remove "biomarker"', **rec.where("biomarker"))
            biomarker = None
        genes = _clean_str_list(d.get("genes"), "HGNC symbols", rec, "genes", col, label)
        seen_g: set[str] = set()
        for g in genes:
            if g in seen_g:
                col.warning("duplicate gene", f"{label}: gene '{g}' is listed twice", received=repr(g), fix="list each gene once", **rec.where("genes"))
            seen_g.add(g)
            if not _HGNC.match(g):
                up = g.upper()
                hint = f" Did you mean '{up}'?" if _HGNC.match(up) else ""
                col.warning("gene symbol", f"{label}: '{g}' is not a plausible HGNC symbol (human genes are upper case: BRAF, PIK3CA, C1orf112).{hint}", expected="an HGNC approved symbol", received=repr(g), fix="use the human HGNC symbol; omics and drug targets are matched by it", **rec.where("genes"))
        genes = tuple(dict.fromkeys(genes))
        desc = d.get("description", "")
        if not isinstance(desc, str):
            col.error("description", f"{label}: 'description' must be text", expected="a string", received=_received(desc), fix="quote the description", **rec.where("description"))
            desc = ""
        refs = _clean_str_list(d.get("references"), "citations", rec, "references", col, label)
        nodes[nid] = Node(nid, role, genes, output, biomarker.strip() if isinstance(biomarker, str) else None, desc, refs)

    edges: dict[tuple[str, str], Edge] = {}
    edge_rec: dict[tuple[str, str], _Rec] = {}
    for rec in edge_recs:
        d = rec.data
        for k in d:
            if k not in _EDGE_KEYS:
                col.error("unknown key", f"edge: unknown key '{k}'.{close_matches(k, _EDGE_KEYS)}", expected=", ".join(_EDGE_KEYS), received=repr(k), fix="rename or remove the key", **rec.where(k))
        ends = []
        for key in ("source", "target"):
            v = d.get(key)
            if not isinstance(v, str) or not v.strip():
                col.error("edge end", f"edge without a '{key}'", expected="a node id", received=_received(v), fix=f"name the {key} node", **rec.where(key))
                ends.append(None)
                continue
            v = v.strip()
            if v not in nodes:
                if implicit_nodes:
                    nodes[v] = Node(v)
                else:
                    col.error("undefined node", f"edge {d.get('source')} -> {d.get('target')}: {key} '{v}' is not a defined node.{close_matches(v, nodes)}", expected="the id of a node listed under 'nodes'", received=repr(v), fix=f"add a node with id '{v}' or correct the name", **rec.where(key))
                    ends.append(None)
                    continue
            ends.append(v)
        src, tgt = ends
        label = f"edge {src or d.get('source')} -> {tgt or d.get('target')}"
        raw_sign = d.get("sign")
        sign = _parse_sign(raw_sign, text_ok=text_values)
        if sign is None:
            col.error("sign", f"{label}: the sign must be +1 (activation) or -1 (inhibition)", expected="1 or -1" + (" (or the words activates / inhibits)" if text_values else ""), received=_received(raw_sign) if "sign" in d else "nothing (field absent)", fix="write 1 for activation, -1 for inhibition", **rec.where("sign"))
        weight = d.get("weight")
        if weight is not None:
            if text_values and isinstance(weight, str):
                try:
                    weight = float(weight)
                except ValueError:
                    pass
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                col.error("weight", f"{label}: the weight must be a positive number (the sign carries the direction)", expected="a number > 0, e.g. 1.0", received=_received(weight), fix="give the magnitude only, or leave 'weight' out", **rec.where("weight"))
                weight = None
            else:
                weight = float(weight)
        feedback = _parse_bool(d.get("feedback", False), text_ok=text_values)
        if feedback is None:
            col.error("feedback", f"{label}: 'feedback' must be true or false", expected="true or false", received=_received(d.get("feedback")), fix="write true or false (without quotes)", **rec.where("feedback"))
            feedback = False
        declared_loop = _parse_bool(d.get("self_loop", False), text_ok=text_values)
        if declared_loop is None:
            col.error("self_loop", f"{label}: 'self_loop' must be true or false", expected="true or false", received=_received(d.get("self_loop")), fix="write true or false (without quotes)", **rec.where("self_loop"))
            declared_loop = False
        desc = d.get("description", "")
        if not isinstance(desc, str):
            col.error("description", f"{label}: 'description' must be text", expected="a string", received=_received(desc), fix="quote the description", **rec.where("description"))
            desc = ""
        refs = _clean_str_list(d.get("references"), "citations", rec, "references", col, label)
        if src is None or tgt is None:
            continue
        if src == tgt and not (declared_loop or allow_self_loops):
            col.error("self-loop", f"{label}: self-loop on '{src}' is not declared", expected='a declared self-loop ("self_loop": true) or two different nodes', received=f"{src} -> {tgt}", fix='add "self_loop": true if the node really regulates itself, otherwise correct the source or target', **rec.where("target"))
            continue
        if src != tgt and declared_loop:
            col.error("self_loop", f"{label}: 'self_loop' is true but source and target differ", expected="self_loop only on an edge from a node to itself", received=f"{src} -> {tgt}", fix="remove 'self_loop'", **rec.where("self_loop"))
        if sign is None:
            continue
        key = (src, tgt)
        if key in edges:
            first = edge_rec[key]
            where_first = f" (first at line {first.line})" if first.line else ""
            if edges[key].sign != sign:
                col.error("conflicting edge", f"{label} is given twice with conflicting signs{where_first}: {edges[key].sign:+d} and {sign:+d}", expected="one sign per pair of nodes", received=f"{edges[key].sign:+d} and {sign:+d}", fix="keep the sign the source supports; a dual effect needs an intermediate node", **rec.where("sign"))
            else:
                col.warning("duplicate edge", f"{label} is given twice with the same sign{where_first}; the first is kept", received=f"sign {sign:+d} twice", fix="remove the duplicate", **rec.where("source"))
            continue
        edges[key] = Edge(src, tgt, sign, weight, bool(feedback), desc, refs)
        edge_rec[key] = rec

    _check_structure(nodes, edges, edge_rec, first_seen, col)
    return nodes, edges, metadata


def _check_structure(nodes, edges, edge_rec, node_rec, col: _Collector, *, require_output: bool = True) -> None:
    """Whole-graph checks: outputs present, phenotypes are sinks, loops, reachability."""
    import networkx as nx

    def where_node(n, key=None):
        rec = node_rec.get(n)
        return rec.where(key) if rec is not None else {"line": None, "field": key}

    def where_edge(k, key=None):
        rec = edge_rec.get(k)
        return rec.where(key) if rec is not None else {"line": None, "field": key}

    phen = [n for n, v in nodes.items() if v.role == "phenotype"]
    if require_output and not phen and nodes:
        col.error(
            "no output",
            "the graph has no phenotype output node, so nothing it does can affect the tumour",
            expected="at least one node with role 'phenotype' and output proliferation, death or biomarker",
            received="no phenotype node among " + ", ".join(list(nodes)[:8]) + (" ..." if len(nodes) > 8 else ""),
            fix='add e.g. {"id": "PROLIFERATION", "role": "phenotype", "output": "proliferation"} and edges into it (SIF: a .nodes.tsv table or outputs=...)',
            field="nodes",
        )
    for (s, t), e in edges.items():
        if nodes[s].role == "phenotype":
            col.error("phenotype with outputs", f"phenotype node '{s}' has an outgoing edge to '{t}'", expected="phenotype nodes are sinks (outputs only receive edges)", received=f"{s} -> {t}", fix=f"remove the edge, or give '{s}' a signalling role and add a separate phenotype node", **where_edge((s, t), "source"))
    if col.has_errors:
        return  # reachability and loop warnings would only echo the errors (dropped edges)
    g = nx.DiGraph()
    g.add_nodes_from(nodes)
    g.add_edges_from(edges)
    for (s, t), e in edges.items():
        if e.feedback and s != t and not nx.has_path(g, t, s):
            col.warning("feedback not a loop", f"edge {s} -> {t} is marked feedback but '{t}' has no path back to '{s}', so it closes no loop", expected="feedback edges close a cycle", received=f"{s} -> {t}", fix="remove 'feedback' or add the missing edges of the loop", **where_edge((s, t), "feedback"))
    if phen:
        reach = set(phen)
        for p in phen:
            reach |= nx.ancestors(g, p)
        for n in nodes:
            if n not in reach:
                col.warning("dead end", f"node '{n}' has no path to any phenotype node, so it cannot affect an output", expected="every node upstream of a proliferation, death or biomarker node", received=f"'{n}' (successors: {', '.join(g.successors(n)) or 'none'})", fix="add the missing edge towards an output, or remove the node", **where_node(n, "id"))


def _raise_or_warn(col: _Collector, warn: bool = True) -> None:
    if col.has_errors:
        raise GraphError(col.file, col.problems)
    if warn and col.problems.warnings:
        msgs = "\n".join(p.format() for p in col.problems.warnings)
        warnings.warn(f"{col.file}: {len(col.problems.warnings)} warning(s)\n{msgs}", GraphWarning, stacklevel=3)


# --------------------------------------------------------------------------------------
# PathwayGraph
# --------------------------------------------------------------------------------------


class PathwayGraph:
    """A signed, annotated signalling graph (immutable; a networkx DiGraph inside).

    Build one from a file (:func:`read_pathway`, :func:`load_pathway` for the bundled
    library) or from records::

        PathwayGraph(
            nodes=[{"id": "EGFR", "role": "receptor", "genes": ["EGFR"]},
                   {"id": "PROLIFERATION", "role": "phenotype", "output": "proliferation"}],
            edges=[{"source": "EGFR", "target": "PROLIFERATION", "sign": 1}],
            metadata={"name": "toy"},
        )

    The constructor validates (raising :class:`GraphError` listing every problem).
    Nodes are given by name; :meth:`node` returns the full :class:`Node`.
    """

    __slots__ = ("_nodes", "_edges", "_meta", "_g", "_gene_index", "problems")

    def __init__(self, nodes: Iterable[Node | Mapping], edges: Iterable[Edge | Mapping] = (), metadata: Mapping | None = None, *, source: str = "<PathwayGraph>"):
        col = _Collector(source)
        node_recs = [_Rec(n.to_dict() if isinstance(n, Node) else dict(n), prefix=f"nodes[{i}]") for i, n in enumerate(nodes)]
        edge_recs = [_Rec(e.to_dict() if isinstance(e, Edge) else dict(e), prefix=f"edges[{i}]") for i, e in enumerate(edges)]
        meta = dict(metadata or {})
        for k in list(meta):
            if k not in _META_KEYS:
                col.error("unknown key", f"unknown metadata key '{k}'.{close_matches(k, _META_KEYS)}", field=k, expected=", ".join(_META_KEYS), received=repr(k), fix="rename or remove the key")
                del meta[k]
        n, e, m = _build(node_recs, edge_recs, meta, col)
        _raise_or_warn(col)
        self._init(n, e, m, col.problems)

    # internal constructor: parts already validated
    @classmethod
    def _from_parts(cls, nodes: dict[str, Node], edges: dict[tuple[str, str], Edge], metadata: dict, problems: ProblemList | None = None) -> "PathwayGraph":
        self = cls.__new__(cls)
        self._init(nodes, edges, metadata, problems or ProblemList())
        return self

    def _init(self, nodes, edges, metadata, problems):
        import networkx as nx

        self._nodes = dict(nodes)
        self._edges = dict(edges)
        self._meta = json.loads(json.dumps(metadata))  # deep copy of plain data
        self.problems = problems
        g = nx.DiGraph(**{k: v for k, v in self._meta.items() if not isinstance(v, list)})
        for name, nd in self._nodes.items():
            g.add_node(name, role=nd.role, genes=list(nd.genes), output=nd.output, biomarker=nd.biomarker, description=nd.description)
        for (s, t), ed in self._edges.items():
            g.add_edge(s, t, sign=ed.sign, weight=ed.weight, feedback=ed.feedback, description=ed.description)
        self._g = nx.freeze(g)
        idx: dict[str, list[str]] = {}
        for name, nd in self._nodes.items():
            for gene in nd.genes:
                idx.setdefault(gene.upper(), []).append(name)
        self._gene_index = idx

    # -- identity ------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The graph's name (``metadata['name']``), or an empty string."""
        return self._meta.get("name", "")

    @property
    def metadata(self) -> dict:
        """A copy of the metadata (name, title, description, citation, doi, references, ...)."""
        return json.loads(json.dumps(self._meta))

    @property
    def citation(self) -> str:
        return self._meta.get("citation", "")

    @property
    def doi(self) -> str:
        return self._meta.get("doi", "")

    def __repr__(self) -> str:
        return f"<PathwayGraph {self.name or '(unnamed)'}: {len(self._nodes)} nodes, {len(self._edges)} edges>"

    def __len__(self) -> int:
        return len(self._nodes)

    def __iter__(self):
        return iter(self._nodes)

    def __contains__(self, name) -> bool:
        return name in self._nodes

    def __eq__(self, other) -> bool:
        if not isinstance(other, PathwayGraph):
            return NotImplemented
        return self._nodes == other._nodes and self._edges == other._edges and self._meta == other._meta

    __hash__ = None  # type: ignore[assignment]

    # -- nodes and edges -----------------------------------------------------------
    @property
    def nodes(self) -> tuple[str, ...]:
        """Node names, in file order."""
        return tuple(self._nodes)

    @property
    def edges(self) -> tuple[Edge, ...]:
        """All edges, in file order."""
        return tuple(self._edges.values())

    def _check_node(self, name: str) -> str:
        if name not in self._nodes:
            raise InputError(f"'{name}' is not a node of pathway graph {self.name or '(unnamed)'}.{close_matches(name, self._nodes)} Nodes: {', '.join(self._nodes)}")
        return name

    def node(self, name: str) -> Node:
        """The :class:`Node` called ``name`` (``InputError`` with close matches if absent)."""
        return self._nodes[self._check_node(name)]

    def edge(self, source: str, target: str) -> Edge:
        """The edge ``source -> target`` (``InputError`` if absent)."""
        self._check_node(source)
        self._check_node(target)
        try:
            return self._edges[(source, target)]
        except KeyError:
            raise InputError(f"pathway graph {self.name or '(unnamed)'} has no edge {source} -> {target}; edges out of {source}: {', '.join(t for t, _ in self.outputs(source)) or 'none'}") from None

    def has_edge(self, source: str, target: str) -> bool:
        return (source, target) in self._edges

    def role(self, name: str) -> str | None:
        return self.node(name).role

    def genes(self, name: str) -> tuple[str, ...]:
        """HGNC symbols node ``name`` stands for."""
        return self.node(name).genes

    def all_genes(self) -> list[str]:
        """Every gene of every node, sorted, each once."""
        return sorted({g for n in self._nodes.values() for g in n.genes})

    def inputs(self, name: str) -> list[tuple[str, int]]:
        """``[(source, sign), ...]`` of the edges into ``name``, in file order."""
        self._check_node(name)
        return [(s, e.sign) for (s, t), e in self._edges.items() if t == name]

    def outputs(self, name: str) -> list[tuple[str, int]]:
        """``[(target, sign), ...]`` of the edges out of ``name``, in file order."""
        self._check_node(name)
        return [(t, e.sign) for (s, t), e in self._edges.items() if s == name]

    def feedback_edges(self) -> list[Edge]:
        return [e for e in self._edges.values() if e.feedback]

    def phenotype_nodes(self, output: str | None = None) -> list[str]:
        """Phenotype nodes, all or those with the given output (proliferation, death, biomarker)."""
        if output is not None and output not in OUTPUTS:
            raise InputError(f"unknown phenotype output {output!r}; expected one of {', '.join(OUTPUTS)}.{close_matches(str(output), OUTPUTS)}")
        return [n for n, v in self._nodes.items() if v.role == "phenotype" and (output is None or v.output == output)]

    def biomarkers(self) -> dict[str, str]:
        """``{observable: node}`` for the biomarker outputs (e.g. ``{'psa': 'PSA'}``)."""
        return {v.biomarker: n for n, v in self._nodes.items() if v.output == "biomarker" and v.biomarker}

    # -- genes and drugs -----------------------------------------------------------
    def nodes_for_gene(self, gene: str) -> list[str]:
        """Nodes whose ``genes`` include ``gene`` (HGNC symbol, case-insensitive); ``[]`` if none."""
        return list(self._gene_index.get(str(gene).strip().upper(), []))

    def targets_of(self, drug: str | Drug) -> list[str]:
        """Nodes whose genes intersect the drug's catalogue targets (``[]`` if it acts elsewhere).

        ``drug`` is a catalogue name or synonym (see :func:`twin.drugs.lookup_drug`) or a
        :class:`~twin.drugs.Drug`. An unknown name raises ``InputError`` with close matches.
        """
        if isinstance(drug, Drug):
            d = drug
        else:
            d = lookup_drug(drug)
            if d is None:
                raise InputError(f"unknown drug {drug!r}.{close_matches(str(drug), known_drug_names())} Known drugs are listed in twin/data/drugs.toml.")
        targets = {t.upper() for t in d.targets}
        return [n for n, v in self._nodes.items() if targets & {g.upper() for g in v.genes}]

    def coverage(self, drugs: Iterable[str] | None = None) -> dict[str, list[str]]:
        """``{drug: target nodes}`` for the given drugs (default: the whole catalogue)."""
        names = list(drugs) if drugs is not None else list(catalogue())
        return {n: self.targets_of(n) for n in names}

    # -- structure -----------------------------------------------------------------
    def has_cycles(self, *, ignore_feedback: bool = False) -> bool:
        """Whether the graph has a directed cycle (self-loops included).

        With ``ignore_feedback=True`` edges marked ``feedback`` are left out first: a
        curated graph whose loops are all marked is then acyclic.
        """
        import networkx as nx

        g = self._structural(ignore_feedback=ignore_feedback, drop_self_loops=False)
        return not nx.is_directed_acyclic_graph(g)

    def topological_layers(self) -> list[list[str]]:
        """Nodes in upstream-to-downstream layers.

        Feedback edges and self-loops are ignored; any cycle that remains is collapsed
        (its nodes share a layer). Layer 0 holds the inputs (ligands, basal nodes).
        """
        import networkx as nx

        g = self._structural(ignore_feedback=True, drop_self_loops=True)
        cond = nx.condensation(g)
        order = {n: i for i, n in enumerate(self._nodes)}
        layers = []
        for gen in nx.topological_generations(cond):
            members = [n for c in gen for n in cond.nodes[c]["members"]]
            layers.append(sorted(members, key=order.__getitem__))
        return layers

    def _structural(self, *, ignore_feedback: bool, drop_self_loops: bool):
        import networkx as nx

        g = nx.DiGraph()
        g.add_nodes_from(self._nodes)
        for (s, t), e in self._edges.items():
            if ignore_feedback and e.feedback:
                continue
            if drop_self_loops and s == t:
                continue
            g.add_edge(s, t)
        return g

    def to_networkx(self):
        """A mutable copy as :class:`networkx.DiGraph` (node/edge attributes, metadata in ``.graph``)."""
        g = self._g.copy()
        g.graph.update(self.metadata)
        for n in g.nodes:
            g.nodes[n]["genes"] = list(g.nodes[n]["genes"])
        return g

    def subgraph(self, nodes: Iterable[str]) -> "PathwayGraph":
        """The graph restricted to ``nodes`` (and the edges among them); not re-validated.

        A subgraph may lack phenotype outputs; call :meth:`validate` to check it.
        """
        keep = [self._check_node(n) for n in nodes]
        keep_set = set(keep)
        sub_nodes = {n: v for n, v in self._nodes.items() if n in keep_set}
        sub_edges = {k: e for k, e in self._edges.items() if k[0] in keep_set and k[1] in keep_set}
        meta = self.metadata
        if self.name:
            meta["derived_from"] = self.name
        return PathwayGraph._from_parts(sub_nodes, sub_edges, meta)

    def validate(self) -> ProblemList:
        """Run every check again (useful after :meth:`subgraph`); returns the problems."""
        col = _Collector(self.name or "<PathwayGraph>")
        doc = self.to_dict()
        _build([_Rec(d, prefix=f"nodes[{i}]") for i, d in enumerate(doc["nodes"])], [_Rec(d, prefix=f"edges[{i}]") for i, d in enumerate(doc["edges"])], {k: doc[k] for k in _META_KEYS if k in doc}, col)
        return col.problems

    # -- serialisation -------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON document (``format``, metadata, ``nodes``, ``edges``)."""
        doc: dict[str, Any] = {"format": FORMAT}
        for k in _META_KEYS:
            if k in self._meta:
                doc[k] = json.loads(json.dumps(self._meta[k]))
        doc["nodes"] = [n.to_dict() for n in self._nodes.values()]
        doc["edges"] = [e.to_dict() for e in self._edges.values()]
        return doc

    def to_json(self) -> str:
        """Canonical JSON text: metadata first, one node / edge / reference per line."""
        return _dumps(self.to_dict())


# --------------------------------------------------------------------------------------
# JSON
# --------------------------------------------------------------------------------------


def _dumps(doc: dict) -> str:
    lines = ["{"]
    keys = list(doc)
    for i, k in enumerate(keys):
        v = doc[k]
        comma = "," if i < len(keys) - 1 else ""
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"  {json.dumps(k)}: [")
            for j, item in enumerate(v):
                lines.append("    " + json.dumps(item, ensure_ascii=False) + ("," if j < len(v) - 1 else ""))
            lines.append(f"  ]{comma}")
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class _Frame:
    __slots__ = ("kind", "path", "index", "key", "expect_key")

    def __init__(self, kind, path):
        self.kind, self.path, self.index, self.key, self.expect_key = kind, path, 0, None, kind == "obj"


def _json_lines(text: str) -> dict[tuple, int]:
    """Line (1-based) where each JSON value / key starts, by path (("nodes", 3, "role"))."""
    pos: dict[tuple, int] = {}
    stack: list[_Frame] = []
    line, i, n = 1, 0, len(text)

    def value_start() -> tuple:
        if not stack:
            return ()
        f = stack[-1]
        path = f.path + ((f.index,) if f.kind == "arr" else (f.key,))
        pos.setdefault(path, line)
        return path

    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c in " \t\r:":
            i += 1
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            f = stack[-1] if stack else None
            if f is not None and f.kind == "obj" and f.expect_key:
                try:
                    f.key = json.loads(text[i : j + 1])
                except ValueError:
                    f.key = text[i + 1 : j]
                f.expect_key = False
                pos.setdefault(f.path + (f.key,), line)
            else:
                value_start()
            i = j + 1
        elif c in "{[":
            path = value_start()
            stack.append(_Frame("obj" if c == "{" else "arr", path))
            i += 1
        elif c in "}]":
            if stack:
                stack.pop()
            i += 1
        elif c == ",":
            if stack:
                f = stack[-1]
                if f.kind == "arr":
                    f.index += 1
                else:
                    f.expect_key = True
            i += 1
        else:
            value_start()
            while i < n and text[i] not in ",}]\n \t\r":
                i += 1
    return pos


def _graph_from_doc(doc: Any, col: _Collector, lines: dict[tuple, int] | None = None) -> tuple[dict, dict, dict]:
    lines = lines or {}
    if not isinstance(doc, dict):
        col.error("document", "a pathway JSON file must hold one object", line=1, expected='{"name": ..., "nodes": [...], "edges": [...]}', received=type(doc).__name__, fix="wrap the content in { }")
        return {}, {}, {}
    for k in doc:
        if k not in _TOP_KEYS:
            col.error("unknown key", f"unknown top-level key '{k}'.{close_matches(k, _TOP_KEYS)}", line=lines.get((k,)), field=k, expected=", ".join(_TOP_KEYS), received=repr(k), fix="rename or remove the key")
    fmt = doc.get("format", FORMAT)
    if fmt != FORMAT:
        col.error("format", f"unsupported format {fmt!r}", line=lines.get(("format",)), field="format", expected=repr(FORMAT), received=_received(fmt), fix=f'write "format": "{FORMAT}" or leave it out')
    recs = {}
    for key in ("nodes", "edges"):
        items = doc.get(key, [])
        if not isinstance(items, list):
            col.error("not a list", f"'{key}' must be a list of objects", line=lines.get((key,)), field=key, expected="a JSON list", received=_received(items), fix=f'write "{key}": [ ... ]')
            items = []
        if key == "nodes" and not items:
            col.error("no nodes", "the graph has no nodes", line=lines.get((key,)), field=key, expected="a list of node objects", received="nothing" if key not in doc else "an empty list", fix='add "nodes": [{"id": ..., "role": ...}, ...]')
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                col.error("not an object", f"{key}[{i}] must be an object", line=lines.get((key, i)), field=f"{key}[{i}]", expected='{"id": ...}' if key == "nodes" else '{"source": ..., "target": ..., "sign": 1}', received=_received(item), fix="write the item as a JSON object")
                continue
            kl = {k: lines[(key, i, k)] for k in item if (key, i, k) in lines}
            out.append(_Rec(item, line=lines.get((key, i)), prefix=f"{key}[{i}]", lines=kl))
        recs[key] = out
    meta = {k: doc[k] for k in _META_KEYS if k in doc}
    meta_lines = {k: lines.get((k,)) for k in meta}
    for i, _ in enumerate(meta.get("references", []) if isinstance(meta.get("references"), list) else []):
        meta_lines[("references", i)] = lines.get(("references", i))
    return _build(recs["nodes"], recs["edges"], meta, col, meta_lines=meta_lines)


def graph_from_dict(doc: Mapping, *, source: str = "<dict>") -> PathwayGraph:
    """Build a graph from a JSON document already parsed into a dict."""
    col = _Collector(source)
    n, e, m = _graph_from_doc(dict(doc), col)
    _raise_or_warn(col)
    return PathwayGraph._from_parts(n, e, m, col.problems)


def _read_text(path: Path, col: _Collector) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        col.error("missing file", "file not found", expected="an existing file", received=str(path), fix="check the path")
    except UnicodeDecodeError as exc:
        col.error("encoding", f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})", expected="UTF-8 text", received="undecodable bytes", fix="save the file as UTF-8")
    return None


def _json_parts(path: Path, col: _Collector):
    text = _read_text(path, col)
    if text is None:
        return None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        col.error("json syntax", f"not valid JSON: {exc.msg}", line=exc.lineno, expected="JSON (double-quoted strings, no trailing commas, no comments)", received=f"column {exc.colno}: {text.splitlines()[exc.lineno - 1].strip()[:80]!r}" if text.splitlines() else "an empty file", fix="fix the syntax at that line")
        return None
    return _graph_from_doc(doc, col, _json_lines(text))


def read_json(path: str | Path) -> PathwayGraph:
    """Read a pathway graph from the native JSON format (see ``docs/pathways.md``)."""
    path = Path(path)
    col = _Collector(str(path))
    parts = _json_parts(path, col)
    _raise_or_warn(col)
    return PathwayGraph._from_parts(*parts, col.problems)


def write_json(graph: PathwayGraph, path: str | Path) -> Path:
    """Write ``graph`` as canonical JSON; reading it back gives an equal graph."""
    from ._atomic import atomic_write_text

    atomic_write_text(path, graph.to_json())
    return Path(path)


# --------------------------------------------------------------------------------------
# SIF (+ optional node table)
# --------------------------------------------------------------------------------------

_NODE_TABLE_COLUMNS = ("node", "role", "output", "biomarker", "genes", "description")


def _node_table_path(sif: Path) -> Path:
    return sif.with_name(sif.stem + ".nodes.tsv")


def _read_node_table(path: Path, col: _Collector) -> list[_Rec]:
    text = _read_text(path, col)
    if text is None:
        return []
    tcol = col
    recs = []
    header = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        cells = raw.split("\t")
        if header is None:
            header = [c.strip().lower() for c in cells]
            if "node" not in header:
                tcol.add("error", "node table header", f"{path.name}: the node table needs a header with a 'node' column", line=lineno, expected="tab-separated columns: " + ", ".join(_NODE_TABLE_COLUMNS), received=repr(raw[:80]), fix="add the header line")
                return []
            for h in header:
                if h not in _NODE_TABLE_COLUMNS:
                    tcol.add("error", "unknown column", f"{path.name}: unknown column '{h}'.{close_matches(h, _NODE_TABLE_COLUMNS)}", line=lineno, field=h, expected=", ".join(_NODE_TABLE_COLUMNS), received=repr(h), fix="rename or remove the column")
            continue
        row = {h: (cells[i].strip() if i < len(cells) else "") for i, h in enumerate(header)}
        d: dict[str, Any] = {"id": row.get("node", "")}
        for k in ("role", "output", "biomarker", "description"):
            if row.get(k):
                d[k] = row[k]
        if row.get("genes"):
            d["genes"] = [g.strip() for g in row["genes"].split(",") if g.strip()]
        recs.append(_Rec(d, line=lineno, prefix=None, lines={}))
    return recs


class _FileCollector(_Collector):
    """Collector view that reports problems under another file name (node tables)."""

    def __init__(self, parent: _Collector, file: str):
        self.file = file
        self.problems = parent.problems
        self._counts = parent._counts


def read_sif(
    path: str | Path,
    *,
    nodes: str | Path | None = None,
    outputs: Mapping[str, str] | None = None,
    name: str | None = None,
    allow_self_loops: bool = False,
) -> PathwayGraph:
    """Read a SIF file: ``source<TAB>relation<TAB>target [target ...]`` per line.

    ``relation`` is ``1``/``+1``/``activates`` or ``-1``/``inhibits``. Blank lines and lines
    starting with ``#`` are skipped; a line with one name declares an isolated node.

    SIF has no roles or genes. They come from a tab-separated node table (columns
    ``node, role, output, biomarker, genes, description``; genes comma-separated): the
    file ``nodes`` or, by default, ``NAME.nodes.tsv`` beside ``NAME.sif`` when present
    (:func:`write_sif` writes it). ``outputs`` marks phenotype nodes without a table,
    e.g. ``{"Proliferation": "proliferation", "Apoptosis": "death", "PSA": "biomarker:psa"}``.
    Weights, feedback flags, descriptions and metadata need JSON or GraphML.
    """
    path = Path(path)
    col = _Collector(str(path))
    text = _read_text(path, col)
    node_recs: list[_Rec] = []
    table = Path(nodes) if nodes is not None else _node_table_path(path)
    if nodes is not None or table.exists():
        node_recs = _read_node_table(table, _FileCollector(col, str(table)))
    edge_recs: list[_Rec] = []
    seen_nodes: list[str] = []
    for lineno, raw in enumerate((text or "").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        cells = [c.strip() for c in raw.split("\t")] if "\t" in raw else line.split()
        cells = [c for c in cells if c != ""]
        if len(cells) == 1:
            seen_nodes.append(cells[0])
            continue
        if len(cells) == 2:
            col.error("sif columns", "a SIF line needs source, relation and target", line=lineno, expected="source<TAB>1|-1<TAB>target", received=repr(raw[:80]), fix="add the missing column (tab-separated)")
            continue
        src, rel, targets = cells[0], cells[1], cells[2:]
        sign: Any = _parse_sign(rel, text_ok=True)
        if sign is None:
            col.error("sign", f"unknown relation {rel!r} ({src} -> {', '.join(targets)}): the sign must be +1 or -1", line=lineno, field="relation", expected="1, -1, activates or inhibits", received=repr(rel), fix="write 1 for activation, -1 for inhibition")
            continue
        for tgt in targets:
            edge_recs.append(_Rec({"source": src, "target": tgt, "sign": sign}, line=lineno, prefix=None))
    declared = {r.data.get("id") for r in node_recs}
    for n in seen_nodes:
        if n not in declared:
            node_recs.append(_Rec({"id": n}, line=None))
            declared.add(n)
    # nodes named in edges but not in the table: added (role unknown) in order of appearance
    for r in edge_recs:
        for k in ("source", "target"):
            v = r.data[k]
            if v not in declared:
                node_recs.append(_Rec({"id": v}, line=r.line))
                declared.add(v)
    _apply_outputs(node_recs, outputs, col)
    meta = {"name": name or path.stem}
    n, e, m = _build(node_recs, edge_recs, meta, col, implicit_nodes=False, text_values=True, allow_self_loops=allow_self_loops)
    _raise_or_warn(col)
    return PathwayGraph._from_parts(n, e, m, col.problems)


def _apply_outputs(node_recs: list[_Rec], outputs: Mapping[str, str] | None, col: _Collector) -> None:
    if not outputs:
        return
    by_id = {r.data.get("id"): r for r in node_recs}
    for nodename, spec in outputs.items():
        rec = by_id.get(nodename)
        if rec is None:
            col.error("outputs", f"outputs names node '{nodename}', which is not in the graph.{close_matches(nodename, [k for k in by_id if isinstance(k, str)])}", field="outputs", expected="a node of the file", received=repr(nodename), fix="correct the node name")
            continue
        out, _, marker = str(spec).partition(":")
        rec.data["role"] = "phenotype"
        rec.data["output"] = out
        if marker:
            rec.data["biomarker"] = marker


def write_sif(graph: PathwayGraph, path: str | Path, *, node_table: bool = True) -> Path:
    """Write ``graph`` as SIF (``A<TAB>1<TAB>B``) and, by default, ``NAME.nodes.tsv`` with roles and genes."""
    from ._atomic import atomic_write_text

    path = Path(path)
    lines = [f"{e.source}\t{e.sign}\t{e.target}" for e in graph.edges]
    linked = {e.source for e in graph.edges} | {e.target for e in graph.edges}
    lines += [n for n in graph.nodes if n not in linked]
    atomic_write_text(path, "\n".join(lines) + "\n")
    if node_table:
        rows = ["\t".join(_NODE_TABLE_COLUMNS)]
        for n in graph.nodes:
            nd = graph.node(n)
            cells = [n, nd.role or "", nd.output or "", nd.biomarker or "", ",".join(nd.genes), nd.description.replace("\t", " ").replace("\n", " ")]
            rows.append("\t".join(cells))
        atomic_write_text(_node_table_path(path), "\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------------------
# GraphML (networkx)
# --------------------------------------------------------------------------------------


def _graphml_line_finder(text: str):
    node_line: dict[str, int] = {}
    edge_line: dict[tuple[str, str], int] = {}
    n_re = re.compile(r"<node\b[^>]*\bid=\"([^\"]*)\"")
    s_re = re.compile(r"\bsource=\"([^\"]*)\"")
    t_re = re.compile(r"\btarget=\"([^\"]*)\"")
    for i, line in enumerate(text.splitlines(), start=1):
        m = n_re.search(line)
        if m:
            node_line.setdefault(_xml_unescape(m.group(1)), i)
        if "<edge" in line:
            s, t = s_re.search(line), t_re.search(line)
            if s and t:
                edge_line.setdefault((_xml_unescape(s.group(1)), _xml_unescape(t.group(1))), i)
    return node_line, edge_line


def _xml_unescape(s: str) -> str:
    from xml.sax.saxutils import unescape

    return unescape(s, {"&quot;": '"', "&apos;": "'"})


def _records_from_networkx(g, node_line=None, edge_line=None):
    node_line = node_line or {}
    edge_line = edge_line or {}
    node_recs = []
    for n, attrs in g.nodes(data=True):
        d: dict[str, Any] = {"id": str(n)}
        for k, v in attrs.items():
            if v is None or (isinstance(v, str) and v == "" and k != "id"):
                continue
            if k == "genes":
                d[k] = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else v
            elif k == "references" and isinstance(v, str):
                try:
                    d[k] = json.loads(v)
                except ValueError:
                    d[k] = [v]
            else:
                d[k] = v
        node_recs.append(_Rec(d, line=node_line.get(str(n)), prefix=f"node[{n}]"))
    edge_recs = []
    for s, t, attrs in g.edges(data=True):
        d = {"source": str(s), "target": str(t)}
        for k, v in attrs.items():
            if v is None or (isinstance(v, str) and v == ""):
                continue
            if k == "references" and isinstance(v, str):
                try:
                    d[k] = json.loads(v)
                except ValueError:
                    d[k] = [v]
            elif k == "id":
                continue
            else:
                d[k] = v
        edge_recs.append(_Rec(d, line=edge_line.get((str(s), str(t))), prefix=f"edge[{s}->{t}]"))
    meta_raw = dict(g.graph)
    meta: dict[str, Any] = {}
    if "metadata_json" in meta_raw:
        try:
            meta = json.loads(meta_raw.pop("metadata_json"))
        except ValueError:
            meta = {}
    for k, v in meta_raw.items():
        if k in _META_KEYS and k not in meta and isinstance(v, str):
            meta[k] = v
    return node_recs, edge_recs, meta


def from_networkx(g, *, name: str | None = None, source: str = "<networkx>") -> PathwayGraph:
    """Build (and validate) a graph from a networkx DiGraph with twin's node/edge attributes."""
    col = _Collector(source)
    if not g.is_directed():
        col.error("undirected", "the graph is undirected; signalling edges have a direction", expected="a directed graph", received=type(g).__name__, fix="build a networkx.DiGraph")
        _raise_or_warn(col)
    nr, er, meta = _records_from_networkx(g)
    if name:
        meta["name"] = name
    meta = {k: v for k, v in meta.items() if k in _META_KEYS}
    n, e, m = _build(nr, er, meta, col, text_values=True)
    _raise_or_warn(col)
    return PathwayGraph._from_parts(n, e, m, col.problems)


def read_graphml(path: str | Path) -> PathwayGraph:
    """Read GraphML written by :func:`write_graphml` (or another tool using the same attributes)."""
    import networkx as nx
    from xml.etree.ElementTree import ParseError

    path = Path(path)
    col = _Collector(str(path))
    text = _read_text(path, col)
    if text is None:
        _raise_or_warn(col)
    try:
        g = nx.parse_graphml(text)
    except ParseError as exc:
        line = exc.position[0] if getattr(exc, "position", None) else None
        col.error("xml syntax", f"not valid XML: {exc}", line=line, expected="a GraphML document", received="malformed XML", fix="fix the XML at that line")
        _raise_or_warn(col)
    except (nx.NetworkXError, KeyError, ValueError) as exc:
        col.error("graphml", f"networkx cannot read this GraphML: {exc}", expected="GraphML as written by networkx.write_graphml", received=str(exc)[:120], fix="re-export the graph as GraphML with typed attributes")
        _raise_or_warn(col)
    if not g.is_directed():
        col.error("undirected", "the GraphML graph is undirected; signalling edges have a direction", expected='<graph edgedefault="directed">', received="edgedefault undirected", fix='set edgedefault="directed"')
        _raise_or_warn(col)
    nl, el = _graphml_line_finder(text)
    nr, er, meta = _records_from_networkx(g, nl, el)
    unknown = [k for k in meta if k not in _META_KEYS]
    meta = {k: v for k, v in meta.items() if k in _META_KEYS}
    for k in unknown:
        col.note("graph attribute", f"graph attribute '{k}' is not pathway metadata and was not kept", field=k)
    n, e, m = _build(nr, er, meta, col, text_values=True)
    _raise_or_warn(col)
    return PathwayGraph._from_parts(n, e, m, col.problems)


def write_graphml(graph: PathwayGraph, path: str | Path) -> Path:
    """Write ``graph`` as GraphML (networkx); genes comma-joined, metadata as JSON text."""
    import networkx as nx

    from ._atomic import atomic_write_text

    g = nx.DiGraph()
    g.graph["name"] = graph.name
    g.graph["metadata_json"] = json.dumps(graph.metadata, ensure_ascii=False, sort_keys=True)
    for n in graph.nodes:
        nd = graph.node(n)
        attrs = {"role": nd.role, "output": nd.output, "biomarker": nd.biomarker, "genes": ",".join(nd.genes), "description": nd.description}
        if nd.references:
            attrs["references"] = json.dumps(list(nd.references), ensure_ascii=False)
        g.add_node(n, **{k: v for k, v in attrs.items() if v is not None})
    for e in graph.edges:
        attrs = {"sign": e.sign, "feedback": e.feedback, "description": e.description}
        if e.weight is not None:
            attrs["weight"] = e.weight
        if e.self_loop:
            attrs["self_loop"] = True
        if e.references:
            attrs["references"] = json.dumps(list(e.references), ensure_ascii=False)
        g.add_edge(e.source, e.target, **attrs)
    text = "\n".join(nx.generate_graphml(g)) + "\n"
    atomic_write_text(path, text)
    return Path(path)


# --------------------------------------------------------------------------------------
# BoolNet .bnet (signs from the logic)
# --------------------------------------------------------------------------------------

_BNET_TOKEN = re.compile(r"\s*(?:(?P<id>[A-Za-z0-9_][A-Za-z0-9_.]*)|(?P<op>[&|!()])|(?P<bad>\S))")
_BNET_OUTPUTS = {"proliferation": "proliferation", "apoptosis": "death", "death": "death", "cell_death": "death"}


def _bnet_literals(expr: str) -> tuple[dict[str, set[int]], str | None]:
    """``{variable: {+1, -1}}`` from a BoolNet expression (sign by parity of enclosing '!')."""
    toks: list[tuple[str, str]] = []
    for m in _BNET_TOKEN.finditer(expr):
        if m.group("id") is not None:
            toks.append(("id", m.group("id")))
        elif m.group("op") is not None:
            toks.append(("op", m.group("op")))
        elif m.group("bad") is not None:
            return {}, f"unexpected character {m.group('bad')!r}"
    lits: dict[str, set[int]] = {}
    pos = 0

    def peek():
        return toks[pos] if pos < len(toks) else (None, None)

    def expr_(neg):
        nonlocal pos
        term(neg)
        while peek() == ("op", "|"):
            pos += 1
            term(neg)

    def term(neg):
        nonlocal pos
        factor(neg)
        while peek() == ("op", "&"):
            pos += 1
            factor(neg)

    def factor(neg):
        nonlocal pos
        kind, val = peek()
        if (kind, val) == ("op", "!"):
            pos += 1
            factor(not neg)
        elif (kind, val) == ("op", "("):
            pos += 1
            expr_(neg)
            if peek() != ("op", ")"):
                raise ValueError("missing ')'")
            pos += 1
        elif kind == "id":
            pos += 1
            if val in ("0", "1", "true", "false", "True", "False"):
                return
            lits.setdefault(val, set()).add(-1 if neg else 1)
        else:
            raise ValueError(f"expected a variable, '!' or '(' but found {val!r}" if val else "the expression ends too early")

    try:
        if not toks:
            raise ValueError("empty expression")
        expr_(False)
        if pos != len(toks):
            raise ValueError(f"unexpected {toks[pos][1]!r}")
    except ValueError as exc:
        return {}, str(exc)
    return lits, None


def from_bnet(
    path: str | Path,
    *,
    outputs: Mapping[str, str] | None = None,
    strip_prefix: str | None = "auto",
    name: str | None = None,
    metadata: Mapping | None = None,
) -> PathwayGraph:
    """Import a BoolNet ``.bnet`` Boolean network as a signed graph.

    Each ``target, expression`` line gives the target's inputs; a literal under an odd
    number of ``!`` is an inhibition (``!(A | B)`` inhibits by A and by B). A variable
    that appears with both signs is reported as a conflicting edge. ``X, X`` (an input
    kept constant by a self-loop, as pyboolnet writes them) becomes an input node without
    an edge; constants ``0``/``1`` give input nodes. Other self-references are declared
    self-loops. ``strip_prefix="auto"`` removes a ``v_`` prefix carried by every
    variable (biodivine-boolean-models files). ``outputs`` maps nodes to phenotype
    outputs; by default ``Proliferation`` and ``Apoptosis`` (any case) are detected.
    Roles and genes are not in the file: annotate them in the JSON after import.
    """
    path = Path(path)
    col = _Collector(str(path))
    text = _read_text(path, col) or ""
    rules: list[tuple[int, str, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if "," not in line:
            col.error("bnet line", "a .bnet line needs 'target, expression'", line=lineno, expected="target, boolean expression", received=repr(raw[:80]), fix="add the comma and the update function")
            continue
        tgt, expr = (s.strip() for s in line.split(",", 1))
        if tgt.lower() == "targets" and expr.lower() == "factors":
            continue
        rules.append((lineno, tgt, expr))
    names = {t for _, t, _ in rules}
    parsed = []
    for lineno, tgt, expr in rules:
        lits, err = _bnet_literals(expr)
        if err:
            col.error("bnet expression", f"cannot read the update function of '{tgt}': {err}", line=lineno, field=tgt, expected="an expression of variables with & | ! and parentheses", received=repr(expr[:80]), fix="correct the expression")
            continue
        parsed.append((lineno, tgt, expr, lits))
        names |= set(lits)
    prefix = ""
    if strip_prefix == "auto":
        prefix = "v_" if names and all(n.startswith("v_") for n in names) else ""
    elif strip_prefix:
        prefix = strip_prefix

    def clean(n: str) -> str:
        return n[len(prefix) :] if prefix and n.startswith(prefix) else n

    node_recs: list[_Rec] = []
    seen: set[str] = set()

    def add_node(n, line):
        if n not in seen:
            seen.add(n)
            node_recs.append(_Rec({"id": n}, line=line))

    edge_recs: list[_Rec] = []
    for lineno, tgt, expr, lits in parsed:
        t = clean(tgt)
        add_node(t, lineno)
        if set(lits) == {tgt} and lits[tgt] == {1}:
            col.note("input", f"'{t}' is an input (its rule keeps it constant)", line=lineno, field=t)
            continue
        for var, signs in lits.items():
            s = clean(var)
            add_node(s, lineno)
            for sign in sorted(signs, reverse=True):
                edge_recs.append(_Rec({"source": s, "target": t, "sign": sign, "self_loop": s == t}, line=lineno, prefix=None, lines={}))
    outs = dict(outputs) if outputs is not None else {r.data["id"]: _BNET_OUTPUTS[r.data["id"].lower()] for r in node_recs if r.data["id"].lower() in _BNET_OUTPUTS}
    _apply_outputs(node_recs, outs, col)
    meta = {"name": name or path.stem}
    meta.update(dict(metadata or {}))
    n, e, m = _build(node_recs, edge_recs, meta, col)
    _raise_or_warn(col)
    return PathwayGraph._from_parts(n, e, m, col.problems)


# --------------------------------------------------------------------------------------
# Dispatch, validation, library
# --------------------------------------------------------------------------------------

_READERS = {".json": "json", ".sif": "sif", ".graphml": "graphml", ".bnet": "bnet"}


def read_pathway(path: str | Path, **kw) -> PathwayGraph:
    """Read a graph file by its suffix: ``.json``, ``.graphml``, ``.sif``, ``.bnet``."""
    path = Path(path)
    kind = _READERS.get(path.suffix.lower())
    if kind is None:
        raise GraphError(str(path), [GraphProblem("error", str(path), f"unknown pathway file type '{path.suffix}'", expected=", ".join(_READERS), received=repr(path.suffix), fix="rename the file with one of the suffixes listed, or call the matching reader")])
    return {"json": read_json, "sif": read_sif, "graphml": read_graphml, "bnet": from_bnet}[kind](path, **kw)


def validate_graph(path: str | Path, **kw) -> ProblemList:
    """Every problem of a graph file (errors, warnings, notes) without raising."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", GraphWarning)
            g = read_pathway(path, **kw)
    except GraphError as exc:
        return ProblemList(list(exc.problems))
    return g.problems


def _library():
    return resources.files("twin").joinpath("data/pathways")


def list_pathways() -> list[str]:
    """Names of the bundled curated graphs (``load_pathway(name)``)."""
    return sorted(p.name[:-5] for p in _library().iterdir() if p.name.endswith(".json"))


def load_pathway(name: str) -> PathwayGraph:
    """A bundled curated graph by name (see ``list_pathways()`` and ``docs/pathways.md``)."""
    names = list_pathways()
    key = str(name).strip().lower().replace("-", "_")
    if key not in names:
        raise InputError(f"unknown pathway {name!r}.{close_matches(str(name), names)} Bundled pathways: {', '.join(names)}; read your own file with twin.graph.read_pathway(path).")
    res = _library().joinpath(f"{key}.json")
    col = _Collector(f"twin/data/pathways/{key}.json")
    text = res.read_text(encoding="utf-8")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:  # pragma: no cover - the tests read every file
        col.error("json syntax", f"not valid JSON: {exc.msg}", line=exc.lineno)
        _raise_or_warn(col)
    parts = _graph_from_doc(doc, col, _json_lines(text))
    _raise_or_warn(col)
    return PathwayGraph._from_parts(*parts, col.problems)
