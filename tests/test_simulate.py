"""simulate: analytic solutions, convergence order, events, invariants, failures, scipy agreement."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")
xr = pytest.importorskip("xarray")

from twin import pk
from twin.errors import InputError
from twin.graph import load_pathway
from twin.model import TwinModel
from twin.regimen import Regimen
from twin.simulate import dopri5_fixed, simulate


@pytest.fixture(scope="module")
def mapk():
    return TwinModel.from_graph(load_pathway("mapk_pi3k"), drugs=["dabrafenib", "trametinib"], mechanisms=["mek_mutation"])


def braf_mek(days: int, dab_mg: float = 150.0, tram_mg: float = 2.0) -> Regimen:
    return Regimen.from_records([
        {"drug": "dabrafenib", "time": 0, "amount": dab_mg, "interval": 0.5, "count": 2 * days},
        {"drug": "trametinib", "time": 0, "amount": tram_mg, "interval": 1, "count": days},
    ])


# ---------------------------------------------------------------- analytic growth laws
@pytest.mark.parametrize("growth", ["logistic", "gompertz"])
def test_untreated_growth_matches_the_analytic_solution(growth):
    m = TwinModel.from_graph(None, pathway=False, growth=growth)
    r = np.array([0.05, 0.1, 0.3])
    d = np.array([0.0, 0.02, 0.1])
    K, N0 = 1e11, 1e8
    t = np.linspace(0, 365, 74)
    ds = simulate(m, {"r_max": r, "d_max": d, "K": K, "N0": N0}, Regimen.empty(), t, rtol=1e-10, atol=1e-6)
    N = ds["N_S"].isel(regimen=0).values
    for i in range(3):
        if growth == "logistic":  # N' = r N (1 - N/K) - d N: logistic with r - d and K (1 - d/r)
            a, Ke = r[i] - d[i], K * (1 - d[i] / r[i])
            exact = Ke / (1 + (Ke / N0 - 1) * np.exp(-a * t))
        else:  # N' = r N log(K/N) - d N: Gompertz towards K exp(-d/r)
            Ke = K * math.exp(-d[i] / r[i])
            exact = Ke * np.exp(np.log(N0 / Ke) * np.exp(-r[i] * t))
        np.testing.assert_allclose(N[i], exact, rtol=1e-6)
    assert (ds.status.values == 0).all()
    np.testing.assert_allclose(ds["tumor_volume"].values, ds["N_S"].values * 1e-6)


# ---------------------------------------------------------------- convergence order
def test_dopri5_fixed_step_is_fifth_order():
    from scipy.linalg import expm

    rng = np.random.default_rng(1)
    A = rng.normal(size=(4, 4)) - 2 * np.eye(4)
    y0 = rng.normal(size=4)
    exact = expm(2.0 * A) @ y0
    At = torch.as_tensor(A)
    f = lambda t, y, ex: y @ At.T
    ns = np.array([8, 16, 32, 64])
    errs = [np.abs(dopri5_fixed(f, torch.as_tensor(y0)[None], 0.0, 2.0, int(n))[0].numpy() - exact).max() for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert 4.7 < slope < 5.5, (slope, errs)


# ---------------------------------------------------------------- events and invariants
def test_zero_dose_equals_untreated_exactly(mapk):
    t = np.arange(0, 4.0, 0.5)
    ds = simulate(mapk, {}, {"none": Regimen.empty(), "zero": braf_mek(4, 0.0, 0.0)}, t)
    for s in mapk.state_names:
        np.testing.assert_array_equal(ds[s].sel(regimen="none").values, ds[s].sel(regimen="zero").values)


def test_splitting_a_run_at_a_dose_time_changes_nothing(mapk):
    reg = {"bm": braf_mek(6)}
    pars = {"r_max": np.array([0.1, 0.15]), "tau": np.array([0.1, 0.05])}
    full = simulate(mapk, pars, reg, np.arange(0, 5.0, 0.5), rtol=1e-7)
    first = simulate(mapk, pars, reg, np.arange(0, 2.5, 0.5), rtol=1e-7)
    y_split = np.stack([first[s].isel(time=-1).values for s in mapk.state_names], axis=-1)  # (regimen, draw, state)
    second = simulate(mapk, pars, reg, np.arange(2.0, 5.0, 0.5), rtol=1e-7, initial_state=y_split)
    for s in mapk.state_names:
        a = full[s].sel(time=slice(2.0, None)).values
        b = second[s].values
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12 * np.abs(a).max())


def test_invariants_and_higher_dose_never_helps_the_sensitive_clone(mapk):
    regs = {f"{d}mg": braf_mek(8, d, d / 75.0) for d in (0.0, 37.5, 150.0, 600.0)}
    ds = simulate(mapk, {"r_max": np.array([0.1, 0.2])}, regs, np.arange(0, 8.0, 0.5))
    assert (ds.status.values == 0).all()
    C, N = len(mapk.clones), len(mapk.nodes)
    for s in mapk.state_names:
        v = ds[s].values
        if s.startswith("x_"):
            assert v.min() >= 0.0 and v.max() <= 1.0
        else:
            assert v.min() >= 0.0
    ns = ds["N_S"].values  # (regimen, draw, time)
    for k in range(1, ns.shape[0]):
        assert np.all(ns[k] <= ns[k - 1] * (1 + 1e-9)), f"{list(regs)[k]} grows faster than {list(regs)[k - 1]}"
    assert np.all(ns[-1, :, -1] < 0.9 * ns[0, :, -1])  # treatment matters
    # the MEK-mutant clone is hit less than the sensitive one
    r = ds["N_R_mek_mutation"].values
    assert np.all(r[-1, :, -1] / r[0, :, -1] > ns[-1, :, -1] / ns[0, :, -1])


# ---------------------------------------------------------------- failures are reported
def test_an_absurd_draw_fails_alone():
    m = TwinModel.from_graph(None, pathway=False)
    t = np.linspace(0, 30, 7)
    good = {"r_max": 0.1, "K": 1e11}
    alone = simulate(m, {k: np.array([v]) for k, v in good.items()}, Regimen.empty(), t)
    ds = simulate(m, {"r_max": np.array([0.1, 1e14, 0.1]), "K": np.array([1e11, 1e11, np.nan])}, Regimen.empty(), t)
    st = ds.status.isel(regimen=0).values
    assert st[0] == 0 and st[1] != 0 and st[2] != 0
    assert np.isnan(ds["N_S"].isel(regimen=0, draw=1).values).all()
    assert "min_step" in str(ds.status_message.isel(regimen=0, draw=1).values)
    assert "failed" in ds.status.attrs["message"]
    np.testing.assert_allclose(ds["N_S"].isel(regimen=0, draw=0).values, alone["N_S"].isel(regimen=0, draw=0).values, rtol=1e-5)


# ---------------------------------------------------------------- agreement with scipy
def test_agrees_with_scipy_lsoda_on_braf_mek(mapk):
    from scipy.integrate import solve_ivp

    days = 1
    reg = braf_mek(days + 1)
    t_obs = np.arange(0, days + 0.01, 0.5)
    pars = {"r_max": 0.12, "tau": 0.08}
    ds = simulate(mapk, {k: np.array([v]) for k, v in pars.items()}, {"bm": reg}, t_obs, rtol=1e-9, atol=1e-12)
    ours = np.stack([ds[s].isel(regimen=0, draw=0).values for s in mapk.state_names], axis=-1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels: thread synchronisation would dominate
    try:
        ref = _scipy_reference(mapk, pars, reg, t_obs)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-9)
    # the drugs did act: ERK activity fell
    assert ours[-1, mapk.state_names.index("x_S_ERK")] < 0.9 * ours[0, mapk.state_names.index("x_S_ERK")]


def _scipy_reference(mapk, pars, reg, t_obs):
    from scipy.integrate import solve_ivp

    p = mapk.parameter_tensors(pars)
    y = mapk.initial_state(pars)[0].numpy()
    tables = {d: pk.dose_table(reg, d)[0] for d in mapk.drugs}
    events = np.unique(np.concatenate([pk.event_times(tab) for tab in tables.values()] + [t_obs]))
    ref = [y.copy()]
    for a, b in zip(events[:-1], events[1:]):
        subs = {}
        for d, tab in tables.items():
            k = np.searchsorted(tab.time, a, side="right")
            subs[d] = pk.DoseTable(tab.time[:k], tab.amount[:k], tab.route[:k], tab.duration[:k])

        def inhib(t):
            out = []
            for d in mapk.drugs:
                params, pot = mapk.drug_pk[d]
                c = pk.concentration(params, subs[d], np.array([t])) if len(subs[d]) else np.zeros(1)
                out.append(float(pk.hill_inhibition(c, pot.ic50, pot.hill, pot.imax)[0]))
            return torch.tensor([out], dtype=torch.float64)

        def rhs(t, yy):
            return mapk.vector_field(t, torch.as_tensor(yy)[None], p, inhib(t))[0].numpy()

        def jac(t, yy):
            ex = inhib(t)
            return torch.autograd.functional.jacobian(lambda z: mapk.vector_field(t, z[None], p, ex)[0], torch.as_tensor(yy)).numpy()

        sol = solve_ivp(rhs, (a, b), y, method="LSODA", jac=jac, rtol=1e-11, atol=1e-13 * np.maximum(np.abs(y), 1.0))
        assert sol.success
        y = sol.y[:, -1]
        if np.any(np.isclose(b, t_obs, rtol=0, atol=1e-12)):
            ref.append(y.copy())
    return np.array(ref)


# ---------------------------------------------------------------- the result object
def test_dataset_layout_units_and_parameter_inputs(mapk):
    t = np.array([0.0, 1.0, 2.0])
    regs = [Regimen.empty(), braf_mek(2)]
    ds = simulate(mapk, {"r_max": np.array([0.1, 0.2])}, regs, t, seed=3)
    assert ds["N_S"].dims == ("regimen", "draw", "time")
    assert list(ds.regimen.values) == ["untreated_0", "main"]
    assert ds["N_S"].attrs["units"] == "cells" and ds["tumor_volume"].attrs["units"] == "mm3"
    assert ds["x_S_ERK"].attrs["units"] == "1"
    assert ds.status.dims == ("regimen", "draw") and ds.attrs["seed"] == 3
    df = pd.DataFrame({"r_max": [0.1, 0.2]})
    ds2 = simulate(mapk, df, regs, t)
    np.testing.assert_array_equal(ds2["N_S"].values, ds["N_S"].values)
    post = xr.Dataset({"r_max": (("chain", "draw"), np.array([[0.1], [0.2]]))})
    ds3 = simulate(mapk, post, regs, t)
    np.testing.assert_array_equal(ds3["N_S"].values, ds["N_S"].values)
    dsp = simulate(mapk, {"r_max": np.array([[0.1, 0.2], [0.3, 0.4]])}, regs, t, patients=["a", "b"])
    assert dsp["N_S"].dims == ("patient", "regimen", "draw", "time")
    small = simulate(mapk, {"r_max": np.array([0.1, 0.2])}, regs, t, pathway_states=False)
    assert "x_S_ERK" not in small and "N_S" in small and "tumor_volume" in small
    # the same draws in a bigger batch: equal to the tolerance (the batch shares its step sizes)
    np.testing.assert_allclose(dsp["N_S"].sel(patient="a").values, ds["N_S"].values, rtol=1e-6)
    with pytest.raises(InputError, match="Did you mean"):
        simulate(mapk, {"rmax": [0.1]}, regs, t)
    with pytest.raises(InputError, match="knows only"):
        simulate(mapk, {}, Regimen.from_records([{"drug": "paclitaxel", "time": 0, "amount": 100}]), t)
    with pytest.raises(InputError, match="increasing"):
        simulate(mapk, {}, regs, [0.0, 2.0, 1.0])


def test_python_blocks_in_docs_model_md_run(tmp_path, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)  # the examples write files (e.g. a saved residual)
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "model.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    ns: dict = {}
    for b in blocks:
        exec(compile(b, "docs/model.md", "exec"), ns)


# ---------------------------------------------------------------- closed-form PK carried across segments
def _brute_superposition(params, tab, times):
    """Sum of single-dose concentrations: the definition of linear PK."""
    out = np.zeros(len(times))
    for i in range(len(tab)):
        one = pk.DoseTable(tab.time[i:i + 1], tab.amount[i:i + 1], tab.route[i:i + 1], tab.duration[i:i + 1])
        out = out + pk.concentration(params, one, times)
    return out


def test_pk_scan_segment_equals_the_superposition_over_past_doses():
    rng = np.random.default_rng(3)
    n = 60
    t = np.sort(rng.uniform(0, 30, n))
    route = rng.choice(np.array(["oral", "iv", "sc"], dtype=object), n)
    dur = np.where(rng.uniform(size=n) < 0.3, rng.uniform(0.01, 0.5, n), 0.0)
    tab = pk.DoseTable(t, rng.uniform(1, 100, n), route, dur)
    for params in (pk.PKParams(cl=784.3, v=66.8, ka=12.0, f=0.95),  # dabrafenib-like, 1 compartment
                   pk.PKParams(cl=84.8, v=154.1, q=1036.8, v2=409.0, ka=49.2, f=0.72)):  # trametinib-like
        scan = pk.pk_scan(params, tab)
        ev = pk.event_times(tab)
        assert scan.segment(float(ev[0]) - 1e-3) is None
        for a, b in zip(ev[:-1], ev[1:]):
            ts = a + (b - a) * np.array([0.0, 0.1, 0.3, 0.5, 0.8, 8 / 9, 1.0])
            seg = scan.segment(float(a))(ts)
            k = int(np.searchsorted(tab.time, a, side="right"))
            sub = pk.DoseTable(tab.time[:k], tab.amount[:k], tab.route[:k], tab.duration[:k])
            ref = pk.concentration(params, sub, ts)
            brute = _brute_superposition(params, sub, ts)
            scale = np.abs(brute).max()
            np.testing.assert_allclose(seg, ref, rtol=1e-12, atol=1e-12 * scale)
            np.testing.assert_allclose(seg, brute, rtol=1e-12, atol=1e-12 * scale)
        # the scan's concentration is pk.concentration (any times, also before the first dose)
        tt = np.linspace(-1, 31, 97)
        np.testing.assert_allclose(scan.concentration(tt), _brute_superposition(params, tab, tt), rtol=1e-12, atol=1e-15)


def test_simulate_exposure_is_exact_against_the_old_superposition(mapk):
    from twin.simulate import _Exposure

    ex = _Exposure(mapk, braf_mek(20))
    stops = ex.event_times()
    for a, b in zip(stops[:-1], stops[1:]):
        ts = a + (b - a) * np.array([0.0, 0.2, 0.3, 0.8, 8 / 9, 1.0])
        new, dosed = ex.segment(float(a))
        old, dosed_old = ex.segment_superposition(float(a))
        assert dosed == dosed_old
        np.testing.assert_allclose(new(ts), old(ts), rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- per-member step sizes
def test_a_member_does_not_depend_on_its_batch(mapk):
    reg = {"bm": braf_mek(4)}
    t = np.arange(0, 4.0, 0.5)
    many = {"r_max": np.array([0.05, 0.1, 0.3]), "tau": np.array([0.02, 0.1, 0.4]), "w": np.array([1.0, 1.5, 2.5])}
    ds = simulate(mapk, many, reg, t)
    for i in range(3):
        one = simulate(mapk, {k: v[i:i + 1] for k, v in many.items()}, reg, t)
        for s in ("N_S", "x_S_ERK", "N_R_mek_mutation"):
            np.testing.assert_allclose(ds[s].isel(draw=i).values, one[s].isel(draw=0).values, rtol=1e-12)


def test_member_and_shared_stepping_agree_to_the_tolerance(mapk, monkeypatch):
    import importlib

    S = importlib.import_module("twin.simulate")  # the module (twin.simulate the attribute is the function)
    reg = {"bm": braf_mek(3), "none": Regimen.empty()}
    t = np.arange(0, 3.0, 0.5)
    pars = {"r_max": np.array([0.05, 0.2]), "tau": np.array([0.03, 0.2])}
    a = simulate(mapk, pars, reg, t, rtol=1e-9)
    monkeypatch.setattr(S, "_STEPPING", "shared")
    b = simulate(mapk, pars, reg, t, rtol=1e-9)
    for s in mapk.state_names:
        np.testing.assert_allclose(a[s].values, b[s].values, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- the two backends
@pytest.mark.parametrize("which", ["pathway", "reduced"])
def test_compiled_and_torch_backends_integrate_the_same_equations(mapk, which, monkeypatch):
    """twin.compiled (numba, traced from TwinModel.equations) and the torch integrator agree."""
    import importlib

    S = importlib.import_module("twin.simulate")

    m = mapk if which == "pathway" else TwinModel.from_graph(None, pathway=False, drugs=["dabrafenib", "trametinib"], mechanisms=["mek_mutation"], persisters=True)
    pars = {"r_max": np.array([0.1, 0.2])}
    t = np.arange(0, 6.0, 0.5)
    out = {}
    for be in ("numba", "torch"):
        monkeypatch.setattr(S, "_BACKEND", be)
        monkeypatch.delenv("TWIN_SIMULATE_BACKEND", raising=False)
        out[be] = simulate(m, pars, {"bm": braf_mek(6)}, t, rtol=1e-10, atol=1e-14)
        assert (out[be].status.values == 0).all()
    assert "compiled" in out["numba"].attrs["integrator"] and "batched" in out["torch"].attrs["integrator"]
    for s in m.state_names:
        a, b = out["numba"][s].values, out["torch"][s].values
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-12 * np.abs(b).max())
