"""Effect compartments (``TwinModel(effect_delay=True)``): first-order onset/offset kinetics
against closed forms, limits that reduce to the model without delay, and both backends."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from twin._xp import NUMPY
from twin.model import TwinModel
from twin.regimen import Regimen
from twin.simulate import simulate

DRUGS = ["leuprolide", "cyproterone_acetate"]


def _model(delay, **kw):
    from twin.graph import load_pathway

    return TwinModel.from_graph(load_pathway("androgen_receptor"), drugs=DRUGS, mechanisms=[("resistant", DRUGS)], pathway=False,
                                effect_delay=delay, **kw)


def _adt(days: int) -> Regimen:
    return Regimen.from_records([
        {"drug": "leuprolide", "time": 0, "amount": 7.5, "interval": 28, "count": max(1, days // 28)},
        {"drug": "cyproterone_acetate", "time": 0, "amount": 100.0, "interval": 0.5, "count": 2 * days},
    ])


def test_states_parameters_and_spec():
    m = _model(True)
    assert m.state_names == ("N_S", "N_R_resistant", "E_leuprolide", "E_cyproterone_acetate", "psa")
    assert {"ke_on", "ke_off"} <= set(m.parameter_names)
    assert "ke_on" not in _model(False).parameter_names
    again = TwinModel.from_spec(m.spec())
    assert again.effect_delay and again.state_names == m.state_names
    assert m.with_drugs(["enzalutamide"]).effect_delay == ("leuprolide", "cyproterone_acetate", "enzalutamide")
    sub = _model(["LEUPROLIDE"])  # a subset: only leuprolide is delayed
    assert sub.effect_delay == ("leuprolide",) and sub.state_names[2] == "E_leuprolide" and len(sub.state_names) == 4
    from twin.errors import InputError

    with pytest.raises(InputError, match="not among the model's drugs"):
        _model(["enzalutamide"])


def test_effect_compartment_follows_first_order_onset_and_offset():
    """With the inhibition held at I (then 0), E(t) = I (1 - e^{-ke_on t}); after, E decays at ke_off."""
    from scipy.integrate import solve_ivp

    m = _model(True)
    p = m.default_values() | {"ke_on": 0.2, "ke_off": 0.03}
    I, t_on = 0.8, 20.0

    def rhs(t, y):
        u = [I, 0.0] if t < t_on else [0.0, 0.0]
        return m.equations(t, list(y), p, u, NUMPY)

    y0 = np.array(m.initial_state_values(p, NUMPY), float)
    sol = solve_ivp(rhs, (0, 60), y0, t_eval=[5.0, 20.0, 40.0], rtol=1e-11, atol=1e-14, max_step=0.5)
    e = sol.y[2]
    e20 = I * (1 - np.exp(-0.2 * 20.0))
    np.testing.assert_allclose(e[:2], [I * (1 - np.exp(-0.2 * 5.0)), e20], rtol=1e-7)
    np.testing.assert_allclose(e[2], e20 * np.exp(-0.03 * 20.0), rtol=1e-6)
    assert np.all(sol.y[3] == 0.0)  # the untouched drug's compartment stays at 0


def test_zero_dose_equals_untreated_and_fast_effect_equals_no_delay():
    t = np.linspace(0.0, 120.0, 25)
    pars = {"r_max": np.array([0.03, 0.05]), "d_max": np.array([0.02, 0.03]), "frac_resistant": np.array([1e-3, 1e-2])}
    delayed, plain = _model(True), _model(False)
    a = simulate(delayed, pars, {"zero": Regimen.empty()}, t, rtol=1e-10, atol=1e-12)
    b = simulate(plain, pars, {"zero": Regimen.empty()}, t, rtol=1e-10, atol=1e-12)
    assert np.all(a["E_leuprolide"].values == 0.0) and np.all(a["E_cyproterone_acetate"].values == 0.0)
    for s in ("N_S", "N_R_resistant", "psa"):  # same equations; the step sequence differs (more states in the error norm)
        np.testing.assert_allclose(a[s].values, b[s].values, rtol=1e-8)
    # a very fast effect compartment tracks the inhibition: the cells match the model without delay
    fast = simulate(delayed, pars | {"ke_on": np.array([300.0] * 2), "ke_off": np.array([300.0] * 2)}, {"adt": _adt(120)}, t, rtol=1e-9, atol=1e-12)
    ref = simulate(plain, pars, {"adt": _adt(120)}, t, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(fast["N_S"].values, ref["N_S"].values, rtol=2e-2)
    # a slow offset keeps the effect after the last dose: more killing than without delay
    stop = simulate(delayed, pars | {"ke_on": np.array([300.0] * 2), "ke_off": np.array([0.01] * 2)}, {"adt": _adt(56)}, t)
    ref56 = simulate(plain, pars, {"adt": _adt(56)}, t)
    assert np.all(stop["N_S"].values[..., -1] < 0.5 * ref56["N_S"].values[..., -1])
    assert np.all(stop["E_leuprolide"].values >= 0) and np.all(stop["E_leuprolide"].values <= 1)


def test_compiled_and_torch_backends_agree_with_effect_compartments(monkeypatch):
    import importlib

    S = importlib.import_module("twin.simulate")
    m = _model(True)
    pars = {"r_max": np.array([0.03, 0.06]), "ke_on": np.array([0.1, 0.5]), "ke_off": np.array([0.02, 0.05])}
    t = np.arange(0.0, 60.0, 3.0)
    out = {}
    for be in ("numba", "torch"):
        monkeypatch.setattr(S, "_BACKEND", be)
        monkeypatch.delenv("TWIN_SIMULATE_BACKEND", raising=False)
        out[be] = simulate(m, pars, {"adt": _adt(60)}, t, rtol=1e-10, atol=1e-14)
        assert (out[be].status.values == 0).all()
    for s in m.state_names:
        a, b = out["numba"][s].values, out["torch"][s].values
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10 * max(np.abs(b).max(), 1e-300))


def test_with_drugs_extends_what_applied_to_every_drug():
    """A model whose every drug was delayed and blunted by the resistant clone (a Shaw patient's
    generic androgen deprivation) gets the scenario's new drugs delayed and blunted too."""
    from twin.graph import load_pathway

    m = TwinModel.from_graph(load_pathway("androgen_receptor"), drugs=["androgen_deprivation"], mechanisms=[("resistant", ["androgen_deprivation"])],
                             pathway=False, effect_delay=True)
    w = m.with_drugs(DRUGS)
    assert w.effect_delay == ("androgen_deprivation", *DRUGS)
    assert set(w.mechanisms[0].drugs) == {"androgen_deprivation", *DRUGS}
    assert set(m.parameter_names) == set(w.parameter_names)
    part = _model(["leuprolide"]).with_drugs(["enzalutamide"])  # only some drugs delayed: the new one is not
    assert part.effect_delay == ("leuprolide",)
