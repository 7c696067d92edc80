"""Omics -> priors: golden table of the mapping rules (twin/data/omics_rules.toml)."""

import math

import pandas as pd
import pytest

from twin.omics import omics_priors, rules
from twin.patient import Omics

EFF = rules()["effects"]


def _muts(*rows):
    return pd.DataFrame([dict(zip(["gene", "protein_change", "vaf", "classification"], r)) for r in rows])


@pytest.mark.parametrize(
    "row, quantity, mean, rule",
    [
        (("BRAF", "V600E", 0.5, "missense"), "basal_logit", 2.0, "hotspot_activating"),  # clonal: 2*0.5 = 1
        (("BRAF", "p.V600E", 0.2, "missense"), "basal_logit", 2.0 * 0.4, "hotspot_activating"),  # subclonal
        (("KRAS", "G12D", None, None), "basal_logit", 2.0, "hotspot_activating"),  # no VAF: clonal
        (("BRAF", "A123T", 0.5, "missense"), "basal_logit", 0.5, "other_oncogene_mutation"),
        (("PIK3CA", None, None, "known_functional"), "basal_logit", 2.0, "hotspot_activating"),  # PDXE class
        (("PTEN", "R130*", 0.5, "nonsense"), "log_capacity", -2.3, "tumor_suppressor_loss"),
        (("TP53", "R175H", 0.5, "missense"), "log_capacity", -2.3, "tumor_suppressor_loss"),
        (("RB1", "A10V", 0.5, "missense"), "log_capacity", -0.5, "tumor_suppressor_vus"),
    ],
)
def test_mutation_golden_table(row, quantity, mean, rule):
    p = omics_priors(Omics(mutations=_muts(row)))
    (e,) = p.gene_effects
    assert (e.gene, e.quantity, e.rule) == (row[0], quantity, rule)
    assert e.mean == pytest.approx(mean)
    assert e.sd > 0


def test_silent_truncating_oncogene_and_unknown_gene_have_no_effect():
    p = omics_priors(Omics(mutations=_muts(("BRAF", "V600V", 0.5, "Silent"), ("KRAS", "Q22*", 0.5, "nonsense"), ("TTN", "A1B", 0.5, "missense"))))
    assert p.gene_effects == ()
    assert len(p.notes) == 2  # silent and truncating-oncogene are reported


@pytest.mark.parametrize(
    "cn, gene, mean",
    [
        ({"gistic": 2, "copies": 8.0}, "ERBB2", 0.5 * math.log(4.0)),
        ({"gistic": 2}, "ERBB2", 0.5 * math.log(EFF["amplification"]["default_copies"] / 2)),
        ({"log2_ratio": 2.0}, "MET", 0.5 * math.log(4.0)),  # 2*2^2 = 8 copies
        ({"gistic": 1}, "EGFR", EFF["gain"]["log_capacity"]),
        ({"gistic": -2}, "PTEN", EFF["tumor_suppressor_loss"]["log_capacity"]),
        ({"copies": 0.0}, "CDKN2A", EFF["tumor_suppressor_loss"]["log_capacity"]),
        ({"gistic": -1}, "PTEN", EFF["shallow_loss"]["log_capacity"]),
    ],
)
def test_copy_number_golden_table(cn, gene, mean):
    df = pd.DataFrame([{"gene": gene, "log2_ratio": None, "copies": None, "gistic": None, "call": None, **cn}])
    (e,) = omics_priors(Omics(copy_number=df)).gene_effects
    assert e.quantity == "log_capacity"
    assert e.mean == pytest.approx(mean)


def test_expression_zscores_capped_and_other_scales_reported():
    df = pd.DataFrame([{"gene": "EGFR", "value": 10.0, "scale": "zscore"}, {"gene": "MET", "value": 55.0, "scale": "tpm"}])
    p = omics_priors(Omics(expression=df))
    (e,) = p.gene_effects
    assert e.mean == pytest.approx(EFF["expression"]["slope"] * EFF["expression"]["max_abs_z"])
    assert any("tpm" in n for n in p.notes)


def test_resistance_variant_gives_beta_prior_with_clonal_mean():
    p = omics_priors(Omics(mutations=_muts(("EGFR", "T790M", 0.1, "missense"))))
    (r,) = p.resistance
    assert r.mechanism == "egfr_gatekeeper" and "erlotinib" in r.drugs
    assert r.mean == pytest.approx(0.2)  # clonal fraction 2*VAF


def test_no_omics_falls_back_to_population_prior():
    p = omics_priors(Omics())
    assert p.gene_effects == ()
    assert set(p.missing_layers) == {"mutations", "copy_number", "expression", "protein"}
    (r,) = p.resistance
    assert r.alpha is None and r.log10_mean == EFF["population_resistant"]["log10_mean"]


def test_ar_amplification_is_a_resistance_mechanism_to_adt():
    df = pd.DataFrame([{"gene": "AR", "log2_ratio": None, "copies": 10.0, "gistic": 2, "call": None}])
    p = omics_priors(Omics(copy_number=df))
    assert [r.mechanism for r in p.resistance] == ["ar_amplified"]
    assert "leuprolide" in p.resistance[0].drugs


def test_effects_on_one_node_add_means_and_variances():
    class G:  # minimal graph stand-in: RAF node holds BRAF and RAF1
        nodes = ["RAF"]

        def genes(self, n):
            return ["BRAF", "RAF1"]

        def nodes_for_gene(self, g):
            return ["RAF"] if g in ("BRAF", "RAF1") else []

    df = pd.DataFrame([{"gene": "BRAF", "log2_ratio": None, "copies": 8.0, "gistic": 2, "call": None}])
    p = omics_priors(Omics(mutations=_muts(("BRAF", "V600E", 0.5, "missense")), copy_number=df), graph=G())
    m, sd = p.shift("RAF", "log_capacity")
    assert m == pytest.approx(0.5 * math.log(4))
    assert p.shift("RAF", "basal_logit")[0] == pytest.approx(2.0)
    assert p.shift("MEK", "basal_logit") == (0.0, 0.0)
