"""TwinModel: structure, priors, vector field science (steady state, gradients, invariants)."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from twin.errors import InputError
from twin.graph import load_pathway
from twin.model import X_REF, TwinModel
from twin.omics import GeneEffect, OmicsPriors, ResistancePrior


@pytest.fixture(scope="module")
def mapk():
    return TwinModel.from_graph(
        load_pathway("mapk_pi3k"), drugs=["dabrafenib", "trametinib", "paclitaxel"], mechanisms=["mek_mutation"], persisters=True
    )


@pytest.fixture(scope="module")
def ar():
    return TwinModel.from_graph(load_pathway("androgen_receptor"), drugs=["enzalutamide", "abiraterone"], mechanisms=["ar_promiscuous"])


def test_states_and_parameters_are_named(mapk, ar):
    g = load_pathway("mapk_pi3k")
    n = len(g.nodes)
    assert mapk.clones == ("S", "R_mek_mutation")
    assert mapk.compartments == ("S", "R_mek_mutation", "P")
    assert len(mapk.state_names) == 2 * n + 3
    assert mapk.state_names[:2] == ("x_S_EGF", "x_S_NRG")
    assert "psa" not in mapk.state_names and "psa" in ar.state_names
    names = set(mapk.parameter_names)
    for k in ("r_max", "d_max", "K", "N0", "tau", "w", "frac_mek_mutation", "blunt_mek_mutation", "alpha_p", "beta_p", "r_p", "kill_paclitaxel", "basal_RAF", "logcap_MEK"):
        assert k in names
    assert "kill_dabrafenib" not in names  # targeted drugs act on nodes, not by direct kill
    assert mapk.cytotoxic_drugs == ("paclitaxel",)
    assert set(mapk.transforms.values()) <= {"log", "logit", "identity"}
    assert mapk.parameter_units["r_max"] == "1/day" and mapk.state_units["N_S"] == "cells"
    assert {"psa_prod", "psa_clear"} <= set(ar.parameter_names)
    # a modest calibration set: globals plus drug-target nodes
    free = mapk.free_parameter_names()
    assert "basal_RAF" in free and "basal_MEK" in free and "basal_EGF" not in free
    assert len(free) < 30


def test_unknown_inputs_raise_helpful_errors():
    g = load_pathway("mapk_pi3k")
    with pytest.raises(InputError, match="growth"):
        TwinModel.from_graph(g, growth="exponential")
    with pytest.raises(InputError, match="Did you mean"):
        TwinModel.from_graph(g, mechanisms=["mek_mutatoin"])
    m = TwinModel.from_graph(g, drugs=["trametinib"])
    with pytest.raises(InputError, match="Did you mean"):
        m.parameter_tensors({"r_maxx": 0.1})


def test_default_priors_plain_data_and_omics_shift(mapk):
    pri = mapk.default_priors()
    assert set(pri) == set(mapk.parameter_names)
    for dist, par in pri.values():
        assert dist in {"normal", "lognormal", "beta"} and all(isinstance(v, float) for v in par.values())
    assert pri["r_max"] == ("lognormal", {"mu": math.log(0.1), "sigma": 0.7})
    op = OmicsPriors(
        gene_effects=(GeneEffect("BRAF", "basal_logit", 2.0, 0.5, "BRAF V600E", "activating"),
                      GeneEffect("PTEN", "log_capacity", -3.0, 0.5, "PTEN loss", "lof")),
        resistance=(ResistancePrior("mek_mutation", ("trametinib",), "MAP2K1 K57N", alpha=2.0, beta=18.0),),
        missing_layers=(),
        node_of_gene={"BRAF": ("RAF",), "PTEN": ("PTEN",)},
    )
    shifted = mapk.default_priors(op)
    assert shifted["basal_RAF"][1]["mu"] == pytest.approx(2.0)
    assert shifted["basal_RAF"][1]["sigma"] == pytest.approx(math.sqrt(1.0 + 0.25))
    assert shifted["logcap_PTEN"][1]["mu"] == pytest.approx(-3.0)
    assert shifted["frac_mek_mutation"] == ("beta", {"alpha": 2.0, "beta": 18.0})
    assert shifted["basal_MEK"] == pri["basal_MEK"]
    assert "basal_PTEN" in mapk.free_parameter_names(op) or "logcap_PTEN" in mapk.free_parameter_names(op)


def test_untreated_default_is_a_steady_state(mapk, ar):
    for m in (mapk, ar):
        y0 = m.initial_state({})
        C, N = len(m.clones), len(m.nodes)
        np.testing.assert_allclose(y0[0, : C * N].numpy(), X_REF, atol=1e-12)
        dy = m.vector_field(0.0, y0, m.parameter_tensors({}), None)
        assert torch.all(dy[0, : C * N].abs() < 1e-12)
        if m.has_psa:  # PSA starts at the steady state of production / clearance
            assert abs(float(dy[0, -1])) < 1e-10 * float(y0[0, -1])


def test_inhibition_lowers_the_target_and_growth(mapk):
    p = mapk.parameter_tensors({})
    y0 = mapk.initial_state({})
    ex = torch.tensor([[0.0, 0.9, 0.0]], dtype=torch.float64)  # trametinib 90 % MEK inhibition
    dy = mapk.vector_field(0.0, y0, p, ex)
    i_mek = mapk.state_names.index("x_S_MEK")
    i_mek_r = mapk.state_names.index("x_R_mek_mutation_MEK")
    assert float(dy[0, i_mek]) == pytest.approx((X_REF * (1 - 0.9) - X_REF) / 0.1)  # (f - x) / tau
    # the resistant clone sees the inhibition blunted by 90 %
    assert float(dy[0, i_mek_r]) == pytest.approx((X_REF * (1 - 0.9 * 0.1) - X_REF) / 0.1)
    # persisters: S -> P flow at alpha * total inhibition
    iP = mapk.state_names.index("N_P")
    iS = mapk.state_names.index("N_S")
    assert float(dy[0, iP]) == pytest.approx(0.05 * 0.9 * float(y0[0, iS]))


def test_cytotoxic_drug_kills_by_emax(mapk):
    p = mapk.parameter_tensors({})
    y0 = mapk.initial_state({})
    base = mapk.vector_field(0.0, y0, p, None)
    ex = torch.tensor([[0.0, 0.0, 0.5]], dtype=torch.float64)
    dy = mapk.vector_field(0.0, y0, p, ex)
    iS = mapk.state_names.index("N_S")
    alpha_flow = 0.05 * 0.5 * float(y0[0, iS])
    assert float(dy[0, iS]) == pytest.approx(float(base[0, iS]) - 0.3 * 0.5 * float(y0[0, iS]) - alpha_flow)


def test_reduced_mode_is_plain_logistic():
    m = TwinModel.from_graph(None, pathway=False)
    assert m.state_names == ("N_S",)
    p = m.parameter_tensors({"r_max": 0.2, "d_max": 0.05, "K": 1e10})
    y = torch.tensor([[1e9]], dtype=torch.float64)
    dy = m.vector_field(0.0, y, p, None)
    assert float(dy) == pytest.approx(0.2 * 1e9 * (1 - 0.1) - 0.05 * 1e9, rel=1e-14)
    mg = TwinModel.from_graph(None, pathway=False, growth="gompertz")
    dy = mg.vector_field(0.0, y, mg.parameter_tensors({"r_max": 0.2, "d_max": 0.0, "K": 1e10}), None)
    assert float(dy) == pytest.approx(0.2 * 1e9 * math.log(10.0), rel=1e-14)


def test_vector_field_gradcheck(mapk, ar):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: thread synchronisation would dominate
    try:
        _gradcheck(mapk, ar)
    finally:
        torch.set_num_threads(threads)


def _gradcheck(mapk, ar):
    torch.manual_seed(0)
    for m in (mapk, ar):
        names = ["r_max", "d_max", "K", "tau", "w", "basal_RAF" if "basal_RAF" in m.parameter_names else "basal_AR",
                 "logcap_ERK" if "logcap_ERK" in m.parameter_names else "logcap_AR", f"blunt_{m.mechanisms[0].name}"]
        if m.persisters:
            names += ["alpha_p", "beta_p", "kill_paclitaxel"]
        if m.has_psa:
            names += ["psa_prod", "psa_clear"]
        B = 2
        base = m.parameter_tensors({}, batch=B)
        y = m.initial_state({}).expand(B, -1).clone()
        y = y * (1 + 0.1 * torch.rand_like(y))
        y[:, len(m.clones) * len(m.nodes):] *= 1e-9  # O(1) cell numbers for a well-scaled check
        ex = torch.rand((B, len(m.drugs)), dtype=torch.float64)
        scale = {k: float(base[k][0]) or 1.0 for k in names}
        leaves = [torch.full((B,), 1.0, dtype=torch.float64, requires_grad=True) for _ in names]

        def fn(*xs):
            p = dict(base)
            for k, x in zip(names, xs):
                p[k] = x * scale[k] if k not in ("basal_RAF", "basal_AR", "logcap_ERK", "logcap_AR") else x - 1.0 + 0.3
            p["K"] = p["K"] * 1e-9
            return m.vector_field(0.0, y, p, ex)

        assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_observation_functions(ar):
    y0 = ar.initial_state({"N0": 2e9}).numpy()
    obs = ar.observe(y0)
    assert obs["tumor_volume"][0] == pytest.approx(2e9 * 1e-6)  # 1e-6 mm3 per cell
    assert obs["psa"][0] == pytest.approx(2.5 * 2.0 / 0.25)  # psa_prod * N/1e9 / psa_clear at reference AR activity


def test_priors_for_a_patient_use_the_omics(mapk):
    import pandas as pd

    from twin.patient import Omics, Patient

    omics = Omics(mutations=pd.DataFrame({"gene": ["BRAF", "MAP2K1"], "protein_change": ["V600E", "K57N"], "vaf": [0.45, 0.1],
                                          "classification": ["missense", "missense"]}))
    patient = Patient(id="p1", omics=omics)
    pri = mapk.priors_for(patient)
    assert pri["basal_RAF"][1]["mu"] > 0.5  # activating BRAF raises the basal activity of RAF
    assert pri["frac_mek_mutation"][0] == "beta"  # a MAP2K1 variant: a Beta prior on the resistant fraction


def test_human_patients_get_human_kinetics_priors(ar):
    """Species 'human' (the default) moves r_max/d_max to the human kinetics; mice keep the
    xenograft defaults; nothing else changes."""
    import dataclasses
    import math

    from twin.datasets import load_patient_example
    from twin.model import HUMAN_KINETICS

    human = load_patient_example()
    mouse = dataclasses.replace(human, covariates=dataclasses.replace(human.covariates, species="mouse"))
    ph, pm = ar.priors_for(human), ar.priors_for(mouse)
    assert ph["r_max"] == HUMAN_KINETICS["r_max"] and math.isclose(math.exp(ph["r_max"][1]["mu"]), 0.02)
    assert math.isclose(math.exp(ph["d_max"][1]["mu"]), 0.015)
    assert pm["r_max"] == ar.default_priors()["r_max"] and math.isclose(math.exp(pm["r_max"][1]["mu"]), 0.1)
    assert {k: v for k, v in ph.items() if k not in HUMAN_KINETICS} == {k: v for k, v in pm.items() if k not in HUMAN_KINETICS}
