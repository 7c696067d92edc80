"""Omics -> priors: how a patient's alterations shift the priors of pathway-node parameters.

The rules live in ``twin/data/omics_rules.toml`` (documented in ``docs/omics-mapping.md``):

* activating mutation of an oncogene -> raised basal activity (logit shift x clonality);
* loss of function of a tumour suppressor (truncating, known functional, deep deletion)
  -> node capacity held low;
* amplification / gain -> scaled capacity, ``0.5 * log(copies / 2)``;
* expression / protein z-score -> capacity scaled ``exp(slope * z)``;
* a known resistance variant with its VAF -> prior on the initial resistant fraction of a
  named resistance mechanism (Beta with mean = clonal fraction); otherwise a population prior.

Every effect is continuous and carries a standard deviation; effects on one node add up
(means add, variances add). A missing layer simply contributes nothing: the node keeps the
model's population prior. Each effect records the alteration that caused it.
"""

from __future__ import annotations

import functools
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources

import pandas as pd

__all__ = ["GeneEffect", "ResistancePrior", "OmicsPriors", "omics_priors", "rules"]

_TRUNCATING = {"nonsense", "nonsense_mutation", "frame_shift_del", "frame_shift_ins", "frameshift", "splice_site", "nonstop_mutation", "stop_gained", "truncating"}
_SILENT = {"silent", "synonymous", "intron", "3'utr", "5'utr", "3'flank", "5'flank", "igr", "rna"}
_ZSCORE_SCALES = {"zscore", "z", "z_score", "rppa_zscore", "log2_zscore", "mrna_zscore"}


@functools.lru_cache(maxsize=1)
def rules() -> dict:
    """The parsed mapping rules (genes, effect sizes, resistance variants)."""
    text = resources.files("twin").joinpath("data/omics_rules.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


@dataclass(frozen=True)
class GeneEffect:
    """One alteration's effect on one gene-level quantity.

    quantity : ``basal_logit`` (additive, logit scale) or ``log_capacity`` (additive, log scale).
    mean, sd : Normal prior shift.
    source : the alteration, e.g. ``"BRAF V600E (VAF 0.42)"``.
    rule : the rule of ``omics_rules.toml`` that applied.
    """

    gene: str
    quantity: str
    mean: float
    sd: float
    source: str
    rule: str


@dataclass(frozen=True)
class ResistancePrior:
    """Prior of the initial resistant fraction of one resistance mechanism.

    Either Beta(alpha, beta) (a resistance variant was observed) or, with ``alpha`` None,
    log10 fraction ~ Normal(log10_mean, log10_sd) (population prior).
    """

    mechanism: str
    drugs: tuple[str, ...]
    source: str
    alpha: float | None = None
    beta: float | None = None
    log10_mean: float | None = None
    log10_sd: float | None = None
    reference: str = ""

    @property
    def mean(self) -> float:
        if self.alpha is not None:
            return self.alpha / (self.alpha + self.beta)
        return 10.0 ** (self.log10_mean + 0.5 * (self.log10_sd * math.log(10)) ** 2 / math.log(10))


@dataclass(frozen=True)
class OmicsPriors:
    """Everything the omics say about one patient's model parameters."""

    gene_effects: tuple[GeneEffect, ...]
    resistance: tuple[ResistancePrior, ...]
    missing_layers: tuple[str, ...]
    notes: tuple[str, ...] = ()
    node_of_gene: dict = field(default_factory=dict)

    def gene_table(self) -> pd.DataFrame:
        return pd.DataFrame([e.__dict__ for e in self.gene_effects], columns=["gene", "quantity", "mean", "sd", "source", "rule"])

    def node_table(self) -> pd.DataFrame:
        """Effects aggregated per pathway node (needs a graph): node, quantity, mean, sd, sources."""
        rows = {}
        for e in self.gene_effects:
            for node in self.node_of_gene.get(e.gene, ()):
                key = (node, e.quantity)
                m, v, src = rows.get(key, (0.0, 0.0, []))
                rows[key] = (m + e.mean, v + e.sd**2, src + [e.source])
        return pd.DataFrame(
            [{"node": n, "quantity": q, "mean": m, "sd": math.sqrt(v), "sources": "; ".join(s)} for (n, q), (m, v, s) in sorted(rows.items())],
            columns=["node", "quantity", "mean", "sd", "sources"],
        )

    def shift(self, node: str, quantity: str) -> tuple[float, float]:
        """(mean, sd) of the summed shift of ``quantity`` at ``node``; (0, 0) when none."""
        t = self.node_table()
        hit = t[(t["node"] == node) & (t["quantity"] == quantity)]
        return (float(hit["mean"].iloc[0]), float(hit["sd"].iloc[0])) if len(hit) else (0.0, 0.0)


def _clean_change(change) -> str:
    if change is None or (isinstance(change, float) and math.isnan(change)):
        return ""
    s = str(change).strip()
    return s[2:] if s.startswith("p.") else s


def _matches(pattern: str, change: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return change.startswith(pattern[:-1])
    return change == pattern


def _clonality(vaf) -> tuple[float, str]:
    if vaf is None or (isinstance(vaf, float) and math.isnan(vaf)):
        return 1.0, ""
    return min(1.0, 2.0 * float(vaf)), f" (VAF {float(vaf):.2f})"


def _mutation_effects(row, genes, eff, notes) -> list[GeneEffect]:
    gene = str(row["gene"])
    spec = genes.get(gene)
    if spec is None:
        return []
    change = _clean_change(row.get("protein_change"))
    cls = str(row.get("classification") or "").strip().lower()
    if cls in _SILENT:
        notes.append(f"{gene} {change or cls}: silent/non-coding, no effect")
        return []
    clon, vaf_txt = _clonality(row.get("vaf"))
    label = f"{gene} {change or cls or 'mutation'}{vaf_txt}".strip()
    truncating = cls in _TRUNCATING or change.endswith("*") or "fs" in change
    if spec["role"] == "oncogene":
        if truncating:
            notes.append(f"{label}: truncating mutation of an oncogene, no activating effect assumed")
            return []
        if change in spec.get("hotspots", []) or cls == "known_functional":
            e = eff["hotspot_activating"]
            return [GeneEffect(gene, "basal_logit", e["basal_logit"] * clon, e["sd"], label, "hotspot_activating")]
        e = eff["other_oncogene_mutation"]
        return [GeneEffect(gene, "basal_logit", e["basal_logit"] * clon, e["sd"], label, "other_oncogene_mutation")]
    # tumour suppressor
    if truncating or cls in ("known_functional", "likely_functional") or gene == "TP53":
        e = eff["tumor_suppressor_loss"]
        return [GeneEffect(gene, "log_capacity", e["log_capacity"] * clon, e["sd"], label, "tumor_suppressor_loss")]
    e = eff["tumor_suppressor_vus"]
    return [GeneEffect(gene, "log_capacity", e["log_capacity"] * clon, e["sd"], label, "tumor_suppressor_vus")]


def _cn_level(row) -> tuple[int, float | None]:
    """(level -2..2, copies or None) from gistic, copies or log2 ratio (in that order)."""
    g, c, l2 = row.get("gistic"), row.get("copies"), row.get("log2_ratio")
    copies = None if c is None or (isinstance(c, float) and math.isnan(c)) else float(c)
    if g is not None and not (isinstance(g, float) and math.isnan(g)):
        return int(g), copies
    if copies is not None:
        level = 2 if copies >= 5 else 1 if copies >= 3 else -2 if copies < 0.5 else -1 if copies < 1.5 else 0
        return level, copies
    if l2 is not None and not (isinstance(l2, float) and math.isnan(l2)):
        l2 = float(l2)
        copies = 2.0 * 2.0**l2
        level = 2 if l2 >= 1.0 else 1 if l2 >= 0.3 else -2 if l2 <= -1.3 else -1 if l2 <= -0.3 else 0
        return level, copies
    return 0, None


def _cn_effects(row, genes, eff) -> list[GeneEffect]:
    gene = str(row["gene"])
    spec = genes.get(gene)
    if spec is None:
        return []
    level, copies = _cn_level(row)
    call = row.get("call")
    label = f"{gene} " + ({2: "amplification", 1: "gain", -1: "shallow loss", -2: "deep deletion", 0: "neutral"}[level]) + (f" ({call})" if isinstance(call, str) and call else "")
    if level == 2 and spec["role"] == "oncogene":
        e = eff["amplification"]
        n = copies if copies is not None else e["default_copies"]
        return [GeneEffect(gene, "log_capacity", e["gain"] * math.log(n / 2.0), e["sd"], label, "amplification")]
    if level == 1 and spec["role"] == "oncogene":
        e = eff["gain"]
        return [GeneEffect(gene, "log_capacity", e["log_capacity"], e["sd"], label, "gain")]
    if level == -2:
        e = eff["tumor_suppressor_loss"]
        return [GeneEffect(gene, "log_capacity", e["log_capacity"], e["sd"], label, "tumor_suppressor_loss")]
    if level == -1 and spec["role"] == "tumor_suppressor":
        e = eff["shallow_loss"]
        return [GeneEffect(gene, "log_capacity", e["log_capacity"], e["sd"], label, "shallow_loss")]
    return []


def _z_effects(df: pd.DataFrame, key: str, rule: str, eff, notes, node_genes: set[str] | None) -> list[GeneEffect]:
    out = []
    if not len(df):
        return out
    e = eff[rule]
    for scale, g in df.groupby("scale"):
        if str(scale).lower() not in _ZSCORE_SCALES:
            notes.append(f"{rule} on scale '{scale}' ({len(g)} rows) not used: twin needs z-scores against a reference cohort (scale 'zscore')")
            continue
        for _, row in g.iterrows():
            gene = str(row[key]).split("_")[0].upper()
            if node_genes is not None and gene not in node_genes:
                continue
            z = max(-e["max_abs_z"], min(e["max_abs_z"], float(row["value"])))
            out.append(GeneEffect(gene, "log_capacity", e["slope"] * z, e["sd"], f"{row[key]} {rule} z={float(row['value']):.2f}", rule))
    return out


def _resistance(omics, eff) -> list[ResistancePrior]:
    out = []
    kappa = eff["resistance_variant"]["kappa"]
    muts = omics.mutations
    cn = omics.copy_number
    for rule in rules().get("resistance", []):
        gene, pattern = rule["gene"], rule["change"]
        fraction, source = None, None
        if pattern == "amplification":
            if len(cn):
                for _, row in cn[cn["gene"] == gene].iterrows():
                    if _cn_level(row)[0] == 2:
                        fraction, source = 1.0, f"{gene} amplification"
        elif len(muts):
            for _, row in muts[muts["gene"] == gene].iterrows():
                change = _clean_change(row.get("protein_change"))
                cls = str(row.get("classification") or "").lower()
                if cls in _SILENT:
                    continue
                if _matches(pattern, change):
                    f, vaf_txt = _clonality(row.get("vaf"))
                    if fraction is None or f > fraction:
                        fraction, source = f, f"{gene} {change or cls or 'mutation'}{vaf_txt}"
        if fraction is None:
            continue
        f = min(max(fraction, 1e-3), 1 - 1e-3)
        out.append(ResistancePrior(rule["mechanism"], tuple(rule["drugs"]), source, alpha=kappa * f, beta=kappa * (1 - f), reference=rule.get("reference", "")))
    # merge duplicates of one mechanism: keep the largest mean
    best: dict[str, ResistancePrior] = {}
    for r in out:
        if r.mechanism not in best or r.mean > best[r.mechanism].mean:
            best[r.mechanism] = r
    return list(best.values())


def omics_priors(omics, graph=None) -> OmicsPriors:
    """Map a patient's :class:`~twin.patient.Omics` to prior shifts.

    Parameters
    ----------
    omics : the patient's omics (any layer may be empty).
    graph : optional :class:`~twin.graph.PathwayGraph`; when given, gene effects are
        also aggregated per node (``node_table``) via ``graph.nodes_for_gene``.
    """
    r = rules()
    genes, eff = r["genes"], r["effects"]
    notes: list[str] = []
    effects: list[GeneEffect] = []
    for _, row in omics.mutations.iterrows() if len(omics.mutations) else ():
        effects += _mutation_effects(row, genes, eff, notes)
    for _, row in omics.copy_number.iterrows() if len(omics.copy_number) else ():
        effects += _cn_effects(row, genes, eff)
    node_genes = None
    node_of_gene: dict[str, tuple[str, ...]] = {}
    if graph is not None:
        node_genes = {g for n in graph.nodes for g in graph.genes(n)}
    effects += _z_effects(omics.expression, "gene", "expression", eff, notes, node_genes)
    effects += _z_effects(omics.protein, "protein", "protein", eff, notes, node_genes)
    if graph is not None:
        for e in effects:
            node_of_gene[e.gene] = tuple(graph.nodes_for_gene(e.gene))
    resistance = _resistance(omics, eff)
    pop = eff["population_resistant"]
    if not resistance:
        resistance.append(ResistancePrior("acquired", (), "population prior (no resistance variant observed)", log10_mean=pop["log10_mean"], log10_sd=pop["log10_sd"], reference="Iwasa, Nowak & Michor 2006 Genetics 172:2557"))
    missing = tuple(n for n in ("mutations", "copy_number", "expression", "protein") if not len(getattr(omics, n)))
    return OmicsPriors(tuple(effects), tuple(resistance), missing, tuple(notes), node_of_gene)
