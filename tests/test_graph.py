"""PathwayGraph, its file formats, validation messages and the curated library."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from twin.drugs import catalogue, lookup_drug
from twin.errors import InputError
from twin.graph import (
    OUTPUTS,
    ROLES,
    Edge,
    GraphError,
    GraphWarning,
    Node,
    PathwayGraph,
    from_bnet,
    graph_from_dict,
    list_pathways,
    load_pathway,
    read_graphml,
    read_json,
    read_pathway,
    read_sif,
    validate_graph,
    write_graphml,
    write_json,
    write_sif,
)

ROOT = Path(__file__).resolve().parents[1]
NETWORKS = Path("/work/shared/data/signalling_networks")
GRIECO_BBM = NETWORKS / "grieco2013_mapk" / "bbm_model.bnet"
GRIECO_PYBOOLNET = NETWORKS / "grieco2013_mapk" / "pyboolnet_grieco_mapk.bnet"
needs_networks = pytest.mark.skipif(not GRIECO_BBM.exists(), reason="shared signalling-network data not available")

# Drugs of the PDX Encyclopedia that act on MAPK/PI3K signalling (the brief's list) ...
PDXE_MAPK_PI3K_DRUGS = [
    "infigratinib", "binimetinib", "buparlisib", "alpelisib", "everolimus", "figitumumab", "siremadlin",
    "capmatinib", "trastuzumab", "ribociclib", "elgemtumab", "cetuximab", "cgm097", "ckx620", "encorafenib",
    "lfw527", "trametinib", "dabrafenib", "erlotinib",
]
# ... and the further catalogue drugs for which mapk_pi3k has simple, well-supported nodes.
EXTRA_MAPK_PI3K_DRUGS = ["clr457", "llm871", "ceritinib", "lka136", "ruxolitinib", "lfa102", "lgh447", "lcl161", "lgw813"]
AR_DRUGS = ["leuprolide", "abiraterone", "enzalutamide", "cyproterone_acetate", "androgen_deprivation"]
# Catalogue drugs no bundled graph covers (docs/pathways.md says why).
NOT_COVERED = [
    "docetaxel", "paclitaxel", "nab_paclitaxel", "fluorouracil", "gemcitabine", "dacarbazine",
    "luminespib", "ljc049", "wnt974", "sonidegib", "tamoxifen", "tas266",
]


@pytest.fixture(scope="module")
def mapk():
    return load_pathway("mapk_pi3k")


@pytest.fixture(scope="module")
def ar():
    return load_pathway("androgen_receptor")


def _toy(**extra_meta):
    return PathwayGraph(
        nodes=[
            {"id": "L", "role": "ligand", "genes": ["EGF"]},
            {"id": "R", "role": "receptor", "genes": ["EGFR"]},
            Node("K", "kinase", ("MAP2K1", "MAP2K2"), description="a kinase"),
            {"id": "P", "role": "phenotype", "output": "proliferation"},
            {"id": "D", "role": "phenotype", "output": "death"},
        ],
        edges=[
            {"source": "L", "target": "R", "sign": 1, "weight": 2.5},
            {"source": "R", "target": "K", "sign": 1},
            Edge("K", "R", -1, feedback=True, description="negative feedback"),
            {"source": "K", "target": "P", "sign": 1},
            {"source": "K", "target": "D", "sign": -1},
        ],
        metadata={"name": "toy", "citation": "nobody 2024", **extra_meta},
    )


def _raises(path_or_callable, *args, **kw) -> GraphError:
    with pytest.raises(GraphError) as exc:
        if callable(path_or_callable):
            path_or_callable(*args, **kw)
        else:
            read_pathway(path_or_callable, **kw)
    return exc.value


def _find(problems, substring, severity="error"):
    hits = [p for p in problems if substring in p.message and p.severity == severity]
    assert hits, f"no {severity} containing {substring!r} in:\n" + "\n".join(p.format() for p in problems)
    return hits[0]


# --------------------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------------------


def test_library_names():
    assert {"mapk_pi3k", "androgen_receptor", "grieco2013_mapk"} <= set(list_pathways())
    with pytest.raises(InputError, match="Did you mean 'mapk_pi3k'"):
        load_pathway("mapk_pik3")


@pytest.mark.parametrize("name", list_pathways())
def test_library_graph_is_clean_and_has_outputs(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", GraphWarning)
        g = load_pathway(name)
    assert g.name == name
    assert g.citation and g.metadata["references"], "every library graph cites its sources"
    assert g.problems.items == []
    assert g.validate().items == [], [p.format() for p in g.validate()]
    assert g.phenotype_nodes("proliferation") and g.phenotype_nodes("death")
    for ref in g.metadata["references"]:
        assert ref["citation"]
    # the file is in canonical form: writing it again reproduces it byte for byte
    text = (ROOT / "twin" / "data" / "pathways" / f"{name}.json").read_text(encoding="utf-8")
    assert g.to_json() == text


@pytest.mark.parametrize("name", ["mapk_pi3k", "androgen_receptor"])
def test_curated_graphs_annotate_every_node(name):
    g = load_pathway(name)
    for n in g.nodes:
        node = g.node(n)
        assert node.role in ROLES, n
        assert node.description, n
        assert node.genes or node.role in ("phenotype", "hormone"), f"{n} has no genes"
    assert not g.has_cycles(ignore_feedback=True), "every loop of a curated graph is marked feedback"


@pytest.mark.parametrize("drug", PDXE_MAPK_PI3K_DRUGS + EXTRA_MAPK_PI3K_DRUGS)
def test_mapk_pi3k_covers_drug(mapk, drug):
    assert lookup_drug(drug) is not None
    assert mapk.targets_of(drug), f"{drug} ({lookup_drug(drug).targets}) has no target node"


@pytest.mark.parametrize("drug", AR_DRUGS)
def test_androgen_receptor_covers_drug(ar, drug):
    assert ar.targets_of(drug)


def test_uncovered_drugs_are_uncovered_and_documented(mapk, ar):
    for drug in NOT_COVERED:
        assert mapk.targets_of(drug) == [] and ar.targets_of(drug) == [], drug
    docs = (ROOT / "docs" / "pathways.md").read_text(encoding="utf-8")
    for drug in catalogue():
        assert f"`{drug}`" in docs, f"docs/pathways.md does not say whether {drug} is covered"
    covered = set(PDXE_MAPK_PI3K_DRUGS + EXTRA_MAPK_PI3K_DRUGS + AR_DRUGS)
    assert covered | set(NOT_COVERED) == set(catalogue()), "every catalogue drug is either covered or listed as not"


def test_target_golden_table(mapk, ar):
    golden = {
        "trametinib": ["MEK"], "mekinist": ["MEK"], "dabrafenib": ["RAF"], "BYL719": ["PI3K"], "everolimus": ["MTORC1"],
        "ribociclib": ["CDK46"], "siremadlin": ["MDM2"], "cetuximab": ["EGFR"], "infigratinib": ["FGFR"],
        "ckx620": ["ERK"], "docetaxel": [],
    }
    for drug, nodes in golden.items():
        assert mapk.targets_of(drug) == nodes, drug
    assert mapk.targets_of(lookup_drug("trastuzumab")) == ["ERBB2"]
    assert ar.targets_of("leuprolide") == ["GNRHR"]
    assert ar.targets_of("abiraterone") == ["CYP17A1"]
    assert ar.targets_of("enzalutamide") == ["AR"]
    with pytest.raises(InputError, match="Did you mean 'trametinib'"):
        mapk.targets_of("trametinb")


def test_nodes_for_gene_golden_table(mapk, ar):
    golden_mapk = {
        "BRAF": ["RAF"], "RAF1": ["RAF"], "ARAF": ["RAF"], "KRAS": ["RAS"], "NRAS": ["RAS"], "MAP2K1": ["MEK"],
        "MAPK3": ["ERK"], "PIK3CA": ["PI3K"], "PIK3CB": ["PI3K"], "PTEN": ["PTEN"], "AKT1": ["AKT"], "MTOR": ["MTORC1"],
        "CDK6": ["CDK46"], "CCND1": ["CDK46"], "RB1": ["RB1"], "TP53": ["TP53"], "MDM2": ["MDM2"], "FGFR3": ["FGFR"],
        "ERBB2": ["ERBB2"], "NF1": ["NF1"], "TSC2": ["TSC"], "braf": ["RAF"], "AR": [], "NOT_A_GENE": [],
    }
    for gene, nodes in golden_mapk.items():
        assert mapk.nodes_for_gene(gene) == nodes, gene
    golden_ar = {"AR": ["AR"], "CYP17A1": ["CYP17A1"], "GNRHR": ["GNRHR"], "KLK3": ["PSA"], "SRD5A2": ["SRD5A"], "PTEN": ["PTEN"], "NR3C1": ["GR"], "BRAF": []}
    for gene, nodes in golden_ar.items():
        assert ar.nodes_for_gene(gene) == nodes, gene
    assert mapk.genes("RAF") == ("ARAF", "BRAF", "RAF1")


def test_mapk_feedback_edges(mapk):
    erk_rtk = mapk.edge("ERK", "EGFR")
    assert erk_rtk.sign == -1 and erk_rtk.feedback
    for s, t in [("ERK", "RAF"), ("ERK", "GRB2_SOS"), ("SPRY", "RAS"), ("DUSP", "ERK"), ("S6K", "IRS1"), ("AKT", "ERBB3")]:
        e = mapk.edge(s, t)
        assert e.sign == -1 and e.feedback, (s, t)
    assert ("ERK", 1) in mapk.inputs("SPRY") and ("ERK", 1) in mapk.inputs("DUSP")
    assert mapk.edge("PTEN", "AKT").sign == -1
    assert mapk.edge("CDK46", "RB1").sign == -1 and mapk.edge("RB1", "E2F").sign == -1
    assert mapk.edge("MDM2", "TP53").sign == -1 and mapk.edge("TP53", "DEATH").sign == 1
    assert mapk.edge("AKT", "DEATH").sign == -1
    for src in ("E2F", "ERK", "MTORC1"):
        assert (src, 1) in mapk.inputs("PROLIFERATION")


def test_mapk_layers_run_upstream_to_downstream(mapk):
    layers = mapk.topological_layers()
    level = {n: i for i, layer in enumerate(layers) for n in layer}
    assert sorted(level) == sorted(mapk.nodes)
    chain = ["EGF", "EGFR", "GRB2_SOS", "RAS", "RAF", "MEK", "ERK", "CDK46", "RB1", "E2F", "PROLIFERATION"]
    assert [level[n] for n in chain] == sorted(level[n] for n in chain)
    assert level["ERK"] > level["EGFR"]  # the feedback edge does not reorder
    assert mapk.has_cycles() and not mapk.has_cycles(ignore_feedback=True)


def test_androgen_axis(ar):
    assert ar.inputs("DHT") == [("TESTOSTERONE", 1), ("SRD5A", 1)]
    assert ar.biomarkers() == {"psa": "PSA"}
    assert ar.node("PSA").output == "biomarker" and ar.node("PSA").biomarker == "psa"
    assert ar.outputs("GNRHR") == [("LH", 1)]
    assert "net" in ar.node("GNRHR").description and "inhibitor" in ar.node("GNRHR").description
    # AR-independent growth: a path to PROLIFERATION that avoids AR
    sub = ar.subgraph([n for n in ar.nodes if n != "AR"])
    import networkx as nx

    assert nx.has_path(sub.to_networkx(), "PTEN", "PROLIFERATION")
    assert ("LINEAGE_PLASTICITY", 1) in ar.inputs("PROLIFERATION")
    assert ar.edge("AR", "PI3K_AKT").feedback and ar.edge("AR", "PI3K_AKT").sign == -1


# --------------------------------------------------------------------------------------
# The object
# --------------------------------------------------------------------------------------


def test_graph_api_basics():
    g = _toy()
    assert g.nodes == ("L", "R", "K", "P", "D") and len(g) == 5 and "K" in g
    assert g.inputs("R") == [("L", 1), ("K", -1)]
    assert g.outputs("K") == [("R", -1), ("P", 1), ("D", -1)]
    assert g.phenotype_nodes() == ["P", "D"] and g.phenotype_nodes("death") == ["D"]
    assert g.edge("L", "R").weight == 2.5 and g.edge("R", "K").weight is None
    assert g.feedback_edges() == [Edge("K", "R", -1, feedback=True, description="negative feedback")]
    assert g.all_genes() == ["EGF", "EGFR", "MAP2K1", "MAP2K2"]
    assert g.topological_layers() == [["L"], ["R"], ["K"], ["P", "D"]]
    with pytest.raises(InputError, match="Did you mean 'K'"):
        g.inputs("k")
    with pytest.raises(InputError, match="no edge P -> K"):
        g.edge("P", "K")
    with pytest.raises(InputError, match="unknown phenotype output"):
        g.phenotype_nodes("growth")
    with pytest.raises(AttributeError):
        g.colour = "red"


def test_to_networkx_is_a_copy():
    g = _toy()
    nxg = g.to_networkx()
    assert nxg.nodes["K"]["genes"] == ["MAP2K1", "MAP2K2"] and nxg.nodes["K"]["role"] == "kinase"
    assert nxg.edges["K", "R"]["sign"] == -1 and nxg.edges["K", "R"]["feedback"] is True
    assert nxg.graph["name"] == "toy"
    nxg.remove_node("K")
    nxg.nodes["L"]["genes"].append("TGFA")
    assert "K" in g and g.genes("L") == ("EGF",)


def test_subgraph_and_revalidation():
    g = _toy()
    sub = g.subgraph(["L", "R", "K"])
    assert sub.nodes == ("L", "R", "K") and {(e.source, e.target) for e in sub.edges} == {("L", "R"), ("R", "K"), ("K", "R")}
    assert sub.metadata["derived_from"] == "toy"
    _find(sub.validate(), "no phenotype output node")
    assert g.validate().items == []
    with pytest.raises(InputError, match="not a node"):
        g.subgraph(["L", "NOPE"])


def test_from_networkx_and_equality():
    from twin.graph import from_networkx

    g = _toy()
    assert from_networkx(g.to_networkx()) == g
    assert _toy() == g and _toy(doi="10.1000/xyz") != g


# --------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mapk_pi3k", "androgen_receptor"])
def test_json_round_trip_exact(tmp_path, name):
    g = load_pathway(name)
    p = write_json(g, tmp_path / f"{name}.json")
    h = read_json(p)
    assert h == g
    assert h.to_json() == p.read_text(encoding="utf-8")
    assert graph_from_dict(json.loads(p.read_text())) == g


@pytest.mark.parametrize("name", ["mapk_pi3k", "androgen_receptor"])
def test_graphml_round_trip(tmp_path, name):
    g = load_pathway(name)
    h = read_graphml(write_graphml(g, tmp_path / f"{name}.graphml"))
    assert h == g  # nodes, roles, genes, signs, weights, feedback flags, descriptions, metadata
    assert read_pathway(tmp_path / f"{name}.graphml") == g


def test_graphml_keeps_weights_and_self_loops(tmp_path):
    g = PathwayGraph(
        [{"id": "A", "role": "kinase", "genes": ["BRAF"]}, {"id": "P", "role": "phenotype", "output": "proliferation"}],
        [{"source": "A", "target": "A", "sign": 1, "self_loop": True, "weight": 0.5}, {"source": "A", "target": "P", "sign": 1}],
        {"name": "loop"},
    )
    assert read_graphml(write_graphml(g, tmp_path / "x.graphml")) == g
    assert read_json(write_json(g, tmp_path / "x.json")) == g


@pytest.mark.parametrize("name", ["mapk_pi3k", "androgen_receptor"])
def test_sif_round_trip_keeps_nodes_roles_genes_signs(tmp_path, name):
    g = load_pathway(name)
    path = write_sif(g, tmp_path / f"{name}.sif")
    assert (tmp_path / f"{name}.nodes.tsv").exists()
    h = read_sif(path)
    assert set(h.nodes) == set(g.nodes)
    for n in g.nodes:
        a, b = g.node(n), h.node(n)
        assert (a.role, a.genes, a.output, a.biomarker) == (b.role, b.genes, b.output, b.biomarker), n
    assert {(e.source, e.target, e.sign) for e in h.edges} == {(e.source, e.target, e.sign) for e in g.edges}
    # SIF cannot carry feedback flags: documented
    assert not h.feedback_edges()


def test_sif_relation_words_multi_targets_and_outputs(tmp_path):
    p = tmp_path / "words.sif"
    p.write_text("# a comment\nEGF\tactivates\tEGFR\nEGFR\t1\tRAS\tPI3K\nPTEN inhibits PI3K\nRAS\t+1\tGROWTH\nPI3K\t1\tGROWTH\nLONELY\n")
    with pytest.warns(GraphWarning, match="LONELY"):
        g = read_sif(p, outputs={"GROWTH": "proliferation"})
    assert g.inputs("PI3K") == [("EGFR", 1), ("PTEN", -1)]
    assert g.node("GROWTH").output == "proliferation" and g.node("EGF").role is None
    assert "LONELY" in g and g.name == "words"


def test_sif_reads_cellnopt_toy_network():
    sif = NETWORKS / "cellnopt_toy" / "ToyPKNMMB.sif"
    if not sif.exists():
        pytest.skip("shared data not available")
    err = _raises(read_sif, sif)
    _find(err.problems, "no phenotype output node")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GraphWarning)
        g = read_sif(sif, outputs={"cJun": "proliferation", "Hsp27": "death"})
    assert ("TRAF6", 1) in g.inputs("p38")


# --------------------------------------------------------------------------------------
# BoolNet import (Grieco 2013)
# --------------------------------------------------------------------------------------


@needs_networks
def test_from_bnet_grieco_signs():
    with pytest.warns(GraphWarning, match="Growth_Arrest"):
        g = from_bnet(GRIECO_BBM)
    assert len(g) == 53 and len(g.edges) == 104  # 49 variables + 4 inputs; 104 regulations (BBM metadata)
    assert sorted(g.inputs("EGFR")) == sorted([("EGFR_stimulus", 1), ("PKC", -1), ("GRB2", -1), ("SPRY", 1)])
    assert sorted(g.inputs("RAF")) == sorted([("PKC", 1), ("ERK", -1), ("AKT", -1), ("RAS", 1)])
    assert sorted(g.inputs("Apoptosis")) == sorted([("FOXO3", 1), ("p53", 1), ("BCL2", -1), ("ERK", -1)])
    assert g.node("Apoptosis").output == "death" and g.node("Proliferation").output == "proliferation"
    assert g.inputs("EGFR_stimulus") == []
    with pytest.warns(GraphWarning):
        h = from_bnet(GRIECO_PYBOOLNET)  # inputs written as self-loops there
    rename = {"MAX1": "MAX"}  # pyboolnet spells MAX as MAX1
    assert {(rename.get(e.source, e.source), rename.get(e.target, e.target), e.sign) for e in h.edges} == {(e.source, e.target, e.sign) for e in g.edges}
    assert not any(e.self_loop for e in h.edges)


@needs_networks
def test_library_grieco_matches_the_bnet_file():
    with pytest.warns(GraphWarning):
        g = from_bnet(GRIECO_BBM)
    lib = load_pathway("grieco2013_mapk")
    assert set(lib.nodes) == set(g.nodes) - {"Growth_Arrest"}
    assert {(e.source, e.target, e.sign) for e in lib.edges} == {(e.source, e.target, e.sign) for e in g.edges if e.target != "Growth_Arrest"}
    assert lib.nodes_for_gene("BRAF") == ["RAF"] and lib.targets_of("trametinib") == ["MEK1_2"]


def test_from_bnet_logic(tmp_path):
    p = tmp_path / "tiny.bnet"
    p.write_text("targets, factors\nA, A\nB, A & !(C | D)\nC, 1\nD, !A\nE, E & B  # autoactivation\nProliferation, B | E\nApoptosis, !B\n")
    g = from_bnet(p)
    assert sorted(g.inputs("B")) == [("A", 1), ("C", -1), ("D", -1)]
    assert g.inputs("D") == [("A", -1)]
    assert g.edge("E", "E").self_loop and g.edge("E", "E").sign == 1
    assert g.inputs("A") == [] and g.inputs("C") == []
    p.write_text("X, Y & !Y\nProliferation, X\nApoptosis, !X\n")
    err = _raises(from_bnet, p)
    e = _find(err.problems, "conflicting signs")
    assert e.line == 1
    p.write_text("X, Y & (Z\nProliferation, X\nApoptosis, !X\n")
    e = _find(_raises(from_bnet, p).problems, "cannot read the update function of 'X'")
    assert e.line == 1 and "missing ')'" in e.message


# --------------------------------------------------------------------------------------
# Malformed files: every problem, located
# --------------------------------------------------------------------------------------

GOOD_NODES = [
    '    {"id": "EGFR", "role": "receptor", "genes": ["EGFR"]},',
    '    {"id": "ERK", "role": "kinase", "genes": ["MAPK1", "MAPK3"]},',
    '    {"id": "PROLIFERATION", "role": "phenotype", "output": "proliferation"}',
]


def _json_file(tmp_path, nodes, edges, name="g.json", extra=""):
    text = "{\n" + '  "name": "bad",\n' + extra + '  "nodes": [\n' + "\n".join(nodes) + "\n  ],\n" + '  "edges": [\n' + "\n".join(edges) + "\n  ]\n}\n"
    p = tmp_path / name
    p.write_text(text)
    return p


def test_unknown_role_is_located(tmp_path):
    nodes = list(GOOD_NODES)
    nodes[1] = '    {"id": "ERK",\n     "role": "kinse", "genes": ["MAPK1"]},'
    p = _json_file(tmp_path, nodes, ['    {"source": "EGFR", "target": "ERK", "sign": 1},', '    {"source": "ERK", "target": "PROLIFERATION", "sign": 1}'])
    err = _raises(p)
    e = _find(err.problems, "unknown role 'kinse'")
    assert e.file == str(p) and e.line == 6 and e.field == "nodes[1].role"
    assert "Did you mean 'kinase'" in e.message and "transcription_factor" in e.expected
    assert f"{p} line 6, field 'nodes[1].role'" in str(err)
    assert isinstance(err, InputError)


def test_edge_to_undefined_node_is_located(tmp_path):
    p = _json_file(tmp_path, GOOD_NODES, ['    {"source": "EGFR", "target": "ERK", "sign": 1},', '    {"source": "ERK", "target": "PROLIFERATON", "sign": 1}'])
    e = _find(_raises(p).problems, "target 'PROLIFERATON' is not a defined node")
    assert e.line == 10 and e.field == "edges[1].target" and "Did you mean 'PROLIFERATION'" in e.message


def test_bad_signs_are_located(tmp_path):
    p = _json_file(tmp_path, GOOD_NODES, ['    {"source": "EGFR", "target": "ERK", "sign": 2},', '    {"source": "ERK", "target": "PROLIFERATION", "sign": "+"}'])
    err = _raises(p)
    signs = [q for q in err.errors if "sign must be" in q.message]
    assert [(q.line, q.field) for q in signs] == [(9, "edges[0].sign"), (10, "edges[1].sign")]
    assert signs[0].received == "2 (int)" and signs[1].received == "'+'"
    s = tmp_path / "bad.sif"
    s.write_text("EGFR\t1\tERK\nERK\t0\tPROLIFERATION\n")
    e = _find(_raises(s, outputs={"PROLIFERATION": "proliferation"}).problems, "unknown relation '0'")
    assert e.line == 2 and e.field == "relation" and "activates" in e.expected


def test_undeclared_self_loop(tmp_path):
    edges = ['    {"source": "ERK", "target": "ERK", "sign": 1},', '    {"source": "ERK", "target": "PROLIFERATION", "sign": 1}']
    e = _find(_raises(_json_file(tmp_path, GOOD_NODES, edges)).problems, "self-loop on 'ERK' is not declared")
    assert e.line == 9 and e.field == "edges[0].target" and "self_loop" in e.fix
    edges[0] = '    {"source": "ERK", "target": "ERK", "sign": 1, "self_loop": true},'
    with pytest.warns(GraphWarning, match="EGFR"):  # EGFR is now a dead end: still only a warning
        g = read_json(_json_file(tmp_path, GOOD_NODES, edges, name="ok.json"))
    assert g.edge("ERK", "ERK").self_loop
    s = tmp_path / "loop.sif"
    s.write_text("A\t1\tA\nA\t1\tP\n")
    e = _find(_raises(s, outputs={"P": "proliferation"}).problems, "self-loop on 'A'")
    assert e.line == 1
    assert read_sif(s, outputs={"P": "proliferation"}, allow_self_loops=True).edge("A", "A").sign == 1


def test_no_phenotype_output(tmp_path):
    nodes = GOOD_NODES[:2]
    nodes[1] = nodes[1].rstrip(",")
    err = _raises(_json_file(tmp_path, nodes, ['    {"source": "EGFR", "target": "ERK", "sign": 1}']))
    e = _find(err.problems, "no phenotype output node")
    assert e.field == "nodes" and "PROLIFERATION" in e.fix


def test_phenotype_with_outgoing_edge(tmp_path):
    edges = ['    {"source": "EGFR", "target": "ERK", "sign": 1},', '    {"source": "ERK", "target": "PROLIFERATION", "sign": 1},', '    {"source": "PROLIFERATION", "target": "EGFR", "sign": 1}']
    e = _find(_raises(_json_file(tmp_path, GOOD_NODES, edges)).problems, "phenotype node 'PROLIFERATION' has an outgoing edge")
    assert e.line == 11 and e.field == "edges[2].source"


def test_duplicate_edges(tmp_path):
    s = tmp_path / "dup.sif"
    s.write_text("EGFR\t1\tERK\nERK\t1\tP\nEGFR\t-1\tERK\nERK\tactivates\tP\n")
    err = _raises(s, outputs={"P": "proliferation"})
    e = _find(err.problems, "conflicting signs")
    assert e.line == 3 and e.field == "sign" and "first at line 1" in e.message
    w = _find(err.problems, "given twice with the same sign", severity="warning")
    assert w.line == 4


def test_implausible_gene_symbol_is_a_warning(tmp_path):
    nodes = list(GOOD_NODES)
    nodes[1] = '    {"id": "ERK", "role": "kinase", "genes": ["Mapk1", "MAPK3"]},'
    p = _json_file(tmp_path, nodes, ['    {"source": "EGFR", "target": "ERK", "sign": 1},', '    {"source": "ERK", "target": "PROLIFERATION", "sign": 1}'])
    with pytest.warns(GraphWarning, match="Mapk1"):
        g = read_json(p)
    w = _find(g.problems, "'Mapk1' is not a plausible HGNC symbol", severity="warning")
    assert w.line == 5 and w.field == "nodes[1].genes" and "Did you mean 'MAPK1'" in w.message
    assert g.genes("ERK") == ("Mapk1", "MAPK3")  # never changed silently
    assert [p.severity for p in validate_graph(p)] == ["warning"]


def test_all_problems_are_listed_at_once(tmp_path):
    nodes = [
        '    {"id": "EGFR", "role": "receptr", "genes": ["EGFR"]},',
        '    {"id": "ERK", "role": "kinase", "colour": "red"},',
        '    {"id": "PSA", "role": "phenotype", "output": "biomarker"},',
        '    {"id": "ERK", "role": "kinase"}',
    ]
    edges = ['    {"source": "EGFR", "target": "ERK", "sign": -2, "weight": -1},', '    {"source": "ERK", "target": "PSA", "sign": 1, "feedback": "yes"}']
    err = _raises(_json_file(tmp_path, nodes, edges, extra='  "citaton": "x",\n'))
    msgs = "\n".join(p.message for p in err.errors)
    for expected in ["unknown top-level key 'citaton'", "unknown role 'receptr'", "unknown key 'colour'", "needs the observable's name", "defined twice", "sign must be", "weight must be a positive number", "'feedback' must be true or false"]:
        assert expected in msgs, expected
    assert len(err.errors) == 8
    assert str(err).count("error:") == 8


def test_feedback_that_closes_no_loop_is_a_warning(tmp_path):
    edges = ['    {"source": "EGFR", "target": "ERK", "sign": 1, "feedback": true},', '    {"source": "ERK", "target": "PROLIFERATION", "sign": 1}']
    with pytest.warns(GraphWarning):
        g = read_json(_json_file(tmp_path, GOOD_NODES, edges))
    w = _find(g.problems, "marked feedback", severity="warning")
    assert w.line == 9 and w.field == "edges[0].feedback"


def test_json_syntax_error_is_located(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{\n  "name": "x",\n  "nodes": [\n    {"id": "A",}\n  ]\n}\n')
    e = _find(_raises(p).problems, "not valid JSON")
    assert e.line == 4


def test_graphml_problems_are_located(tmp_path):
    g = _toy()
    p = write_graphml(g, tmp_path / "toy.graphml")
    text = p.read_text()
    text = text.replace(">kinase<", ">kinasee<", 1)  # K is the only kinase
    assert "kinasee" in text
    p.write_text(text)
    err = _raises(p)
    e = _find(err.problems, "unknown role 'kinasee'")
    line_of_node = next(i for i, l in enumerate(text.splitlines(), 1) if '<node id="K"' in l)
    assert e.line == line_of_node and e.field == "node[K].role"
    bad = tmp_path / "bad.graphml"
    bad.write_text("<graphml><graph></graphml>")
    _find(_raises(bad).problems, "not valid XML")


def test_read_pathway_rejects_unknown_suffix(tmp_path):
    p = tmp_path / "g.xlsx"
    p.write_text("x")
    e = _find(_raises(p).problems, "unknown pathway file type")
    assert ".graphml" in e.expected


def test_constructor_validates_records():
    with pytest.raises(GraphError, match="unknown role 'kinaze'") as exc:
        PathwayGraph([{"id": "A", "role": "kinaze"}, {"id": "P", "role": "phenotype", "output": "proliferation"}], [{"source": "A", "target": "P", "sign": 1}])
    assert exc.value.errors[0].field == "nodes[0].role"
    with pytest.raises(GraphError, match="unknown metadata key 'cite'"):
        PathwayGraph([{"id": "P", "role": "phenotype", "output": "death"}], [], {"cite": "x"})


# --------------------------------------------------------------------------------------
# Contracts
# --------------------------------------------------------------------------------------


def test_importing_the_module_does_not_import_networkx():
    code = "import sys, twin.graph; print('networkx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def test_roles_and_outputs_are_the_documented_sets():
    docs = (ROOT / "docs" / "pathways.md").read_text(encoding="utf-8")
    for word in ROLES + OUTPUTS:
        assert f"`{word}`" in docs


def test_docs_examples_run():
    """Every ```python block of docs/pathways.md runs."""
    docs = (ROOT / "docs" / "pathways.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", docs, flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(textwrap.dedent(block), "docs/pathways.md", "exec"), {})


@pytest.mark.parametrize("name", ["mapk_pi3k", "androgen_receptor"])
def test_docs_tabulate_every_library_node(name):
    docs = (ROOT / "docs" / "pathways.md").read_text(encoding="utf-8")
    g = load_pathway(name)
    assert f"| `{name}` | {len(g)} | {len(g.edges)} |" in docs
    for n in g.nodes:
        assert f"| `{n}` |" in docs, n
