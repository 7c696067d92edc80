"""Science checks of twin.pk: closed forms against textbook formulas and ODE solutions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy.integrate import quad, solve_ivp

from twin.drugs import catalogue, lookup_drug, parse_drug_pk
from twin.errors import InputError
from twin.pk import (
    DoseTable,
    ImputedDoseWarning,
    PKParams,
    Potency,
    concentration,
    disposition,
    event_times,
    exposure,
    hill_inhibition,
    next_event_time,
    nm_to_mg_per_l,
    scale_pk,
)
from twin.regimen import Regimen

torch = pytest.importorskip("torch")

P1 = dict(cl=12.0, v=60.0, ka=18.0, f=0.7)  # k = 0.2 /day
P2 = dict(cl=30.0, v=20.0, q=45.0, v2=150.0, ka=10.0, f=0.8)
T = np.concatenate([[0.0, 1e-6, 0.01], np.linspace(0.05, 30.0, 120)])


def rel_err(a, b, floor=1e-300):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.max(np.abs(a - b) / np.maximum(np.abs(b), floor))


# ---------------------------------------------------------------------------------------
# 1-compartment closed forms
# ---------------------------------------------------------------------------------------
def test_one_cpt_iv_bolus_is_monoexponential():
    p = PKParams(cl=12.0, v=60.0)
    c = concentration(p, DoseTable.single(0.0, 300.0, "iv"), T)
    np.testing.assert_allclose(c, 300.0 / 60.0 * np.exp(-0.2 * T), rtol=1e-14)


def test_one_cpt_oral_is_bateman():
    p = PKParams(**P1)
    k, ka, f, v, d = 0.2, 18.0, 0.7, 60.0, 100.0
    c = concentration(p, DoseTable.single(0.0, d, "oral"), T)
    bateman = f * d * ka / (v * (ka - k)) * (np.exp(-k * T) - np.exp(-ka * T))
    np.testing.assert_allclose(c, bateman, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("eps", [0.0, 1e-12, 1e-9, 1e-6, -1e-6, 1e-3])
def test_one_cpt_oral_ka_equal_k_limit(eps):
    """ka -> k: C = F D k t e^{-k t} / V (no 0/0), and continuous across the limit."""
    k = 0.2
    p = PKParams(cl=12.0, v=60.0, ka=k * (1 + eps), f=0.7)
    c = concentration(p, DoseTable.single(0.0, 100.0, "oral"), T)
    assert np.all(np.isfinite(c))
    ka = k * (1 + eps)
    if eps == 0.0:
        exact = 0.7 * 100.0 * k * T * np.exp(-k * T) / 60.0
    else:
        # exact Bateman in a cancellation-free form for comparison
        exact = 0.7 * 100.0 * ka / 60.0 * np.exp(-min(k, ka) * T) * (-np.expm1(-abs(ka - k) * T)) / abs(ka - k)
    np.testing.assert_allclose(c, exact, rtol=1e-13, atol=1e-300)


def test_flip_flop_and_extreme_rates_do_not_overflow():
    """ka << k (depot) and ka >> k over long horizons: finite, non-negative, no warnings."""
    t = np.linspace(0, 5000, 501)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for ka in (1e-4, 0.08, 1e4):
            c = concentration(PKParams(cl=182.4, v=27.0, ka=ka, f=0.94), DoseTable.single(0.0, 7.5, "im"), t)
            assert np.all(np.isfinite(c)) and np.all(c >= 0)


def test_one_cpt_infusion_during_and_after():
    cl, v, dur, d = 12.0, 60.0, 2.0, 100.0
    k, r = cl / v, d / dur
    p = PKParams(cl=cl, v=v)
    c = concentration(p, DoseTable.single(1.0, d, "iv", dur), T)
    s = T - 1.0
    during = r / cl * (1 - np.exp(-k * s))
    after = r / cl * (1 - np.exp(-k * dur)) * np.exp(-k * (s - dur))
    expect = np.where(s < 0, 0.0, np.where(s <= dur, during, after))
    np.testing.assert_allclose(c, expect, rtol=1e-12, atol=1e-300)


def test_oral_zero_order_input_is_bioavailable_constant_rate():
    """A non-bolus oral entry is a constant-rate input of F * amount over its duration."""
    p = PKParams(**P1)
    c_oral = concentration(p, DoseTable.single(0.0, 100.0, "oral", 0.5), T)
    c_iv = concentration(PKParams(cl=12.0, v=60.0), DoseTable.single(0.0, 70.0, "iv", 0.5), T)
    np.testing.assert_allclose(c_oral, c_iv, rtol=1e-14)


# ---------------------------------------------------------------------------------------
# 2-compartment: eigenvalues and ODEs
# ---------------------------------------------------------------------------------------
def _rates(p):
    k10, k12, k21 = p["cl"] / p["v"], p["q"] / p["v"], p["q"] / p["v2"]
    return k10, k12, k21


def _ode(p, t_eval, *, depot0=0.0, central0=0.0, rate=0.0, t_off=np.inf):
    """Amounts (depot, central, peripheral) by solve_ivp, stepping to the infusion end."""
    k10, k12, k21 = _rates(p)
    ka = p.get("ka", 0.0)

    def rhs(t, y, r):
        a, c, per = y
        return [-ka * a, ka * a - (k10 + k12) * c + k21 * per + r, k12 * c - k21 * per]

    opts = dict(method="DOP853", rtol=1e-13, atol=1e-16)
    out = np.empty((len(t_eval), 3))
    first = t_eval <= t_off
    y0 = [depot0, central0, 0.0]
    s1 = solve_ivp(rhs, (0.0, min(t_off, t_eval[-1])), y0, t_eval=t_eval[first], args=(rate,), **opts)
    out[first] = s1.y.T
    if np.any(~first):
        y_off = solve_ivp(rhs, (0.0, t_off), y0, args=(rate,), **opts).y[:, -1]
        s2 = solve_ivp(rhs, (t_off, t_eval[-1]), y_off, t_eval=t_eval[~first], args=(0.0,), **opts)
        out[~first] = s2.y.T
    return out[:, 1] / p["v"]


def test_two_cpt_bolus_is_biexponential_of_eigenvalues():
    p = dict(P2)
    k10, k12, k21 = _rates(p)
    a = np.array([[-(k10 + k12), k21], [k12, -k21]])
    lam, vec = np.linalg.eig(a)
    coef = np.linalg.solve(vec, [1.0, 0.0])  # unit amount into central
    d = 50.0
    expect = d / p["v"] * (vec[0] * coef * np.exp(np.outer(T, lam))).sum(axis=1)
    c = concentration(PKParams(cl=p["cl"], v=p["v"], q=p["q"], v2=p["v2"]), DoseTable.single(0.0, d, "iv"), T)
    assert rel_err(c, expect) < 1e-12
    coefs, rates = disposition(PKParams(cl=p["cl"], v=p["v"], q=p["q"], v2=p["v2"]))
    np.testing.assert_allclose(sorted(rates), sorted(-lam), rtol=1e-13)
    assert coefs[0] + coefs[1] == pytest.approx(1 / p["v"], rel=1e-14)


def test_two_cpt_bolus_matches_ode():
    p = dict(P2)
    c = concentration(PKParams(cl=p["cl"], v=p["v"], q=p["q"], v2=p["v2"]), DoseTable.single(0.0, 50.0, "iv"), T)
    assert rel_err(c, _ode(p, T, central0=50.0)) < 1e-8


def test_two_cpt_oral_matches_ode():
    p = dict(P2)
    c = concentration(PKParams(**p), DoseTable.single(0.0, 50.0, "oral"), T)
    ode = _ode(p, T, depot0=50.0 * p["f"])
    ok = T > 0
    assert c[0] == 0.0
    assert rel_err(c[ok], ode[ok]) < 1e-8


@pytest.mark.parametrize("ka_from", ["alpha", "beta"])
def test_two_cpt_oral_ka_equal_to_an_eigenvalue(ka_from):
    p = dict(P2)
    _, rates = disposition(PKParams(cl=p["cl"], v=p["v"], q=p["q"], v2=p["v2"]))
    p["ka"] = float(rates[0] if ka_from == "alpha" else rates[1])
    c = concentration(PKParams(**p), DoseTable.single(0.0, 50.0, "oral"), T)
    ode = _ode(p, T, depot0=50.0 * p["f"])
    ok = T > 0
    assert rel_err(c[ok], ode[ok]) < 1e-8


def test_two_cpt_infusion_matches_ode():
    p = dict(P2)
    dur, d = 1.5, 80.0
    c = concentration(PKParams(cl=p["cl"], v=p["v"], q=p["q"], v2=p["v2"]), DoseTable.single(0.0, d, "iv", dur), T)
    ode = _ode(p, T, rate=d / dur, t_off=dur)
    ok = T > 0
    assert rel_err(c[ok], ode[ok]) < 1e-8


def test_two_cpt_with_zero_q_is_one_cpt():
    t = np.linspace(0, 10, 50)
    d = DoseTable.single(0.0, 10.0, "oral")
    c2 = concentration(PKParams(cl=12.0, v=60.0, q=0.0, v2=100.0, ka=3.0, f=0.5), d, t)
    c1 = concentration(PKParams(cl=12.0, v=60.0, ka=3.0, f=0.5), d, t)
    np.testing.assert_allclose(c2, c1, rtol=1e-13)


# ---------------------------------------------------------------------------------------
# superposition, accumulation, AUC
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["1cpt", "2cpt"])
def test_superposition_of_doses_is_the_sum(model):
    p = PKParams(**(P1 if model == "1cpt" else P2))
    rng = np.random.default_rng(0)
    times = np.sort(rng.uniform(0, 20, 7))
    amounts = rng.uniform(1, 100, 7)
    routes = np.array(["oral", "iv", "sc", "iv", "oral", "ip", "im"], dtype=object)
    durs = np.array([0, 0, 0, 0.3, 1.0, 0, 0])
    t = np.linspace(0, 40, 400)
    total = concentration(p, DoseTable(times, amounts, routes, durs), t)
    parts = sum(concentration(p, DoseTable.single(ti, a, r, du), t) for ti, a, r, du in zip(times, amounts, routes, durs))
    np.testing.assert_allclose(total, parts, rtol=1e-12, atol=1e-300)


def test_time_before_a_dose_contributes_zero_and_no_nan():
    p = PKParams(**P2)
    t = np.array([-5.0, 0.0, 9.999, 10.0])
    c = concentration(p, DoseTable(np.array([10.0, 10.0]), np.array([5.0, 5.0]), np.array(["iv", "oral"], dtype=object), np.array([0.0, 0.0])), t)
    assert np.all(c[:3] == 0.0) and np.isfinite(c).all()
    assert c[3] == pytest.approx(5.0 / P2["v"], rel=1e-14)  # bolus included at its own time


def test_zero_dose_gives_zero_concentration():
    for p in (PKParams(**P1), PKParams(**P2)):
        for route, dur in (("iv", 0.0), ("oral", 0.0), ("sc", 2.0)):
            c = concentration(p, DoseTable.single(0.0, 0.0, route, dur), T)
            assert np.all(c == 0.0)
    assert np.all(concentration(PKParams(**P1), DoseTable.repeated(1.0, 1.0, 0), T) == 0.0)


def test_steady_state_accumulation_is_geometric_series():
    cl, v, ka, f, tau, d, n = 12.0, 60.0, 18.0, 0.7, 1.0, 100.0, 15
    k = cl / v
    s = np.linspace(0, tau, 25)
    t = (n - 1) * tau + s
    doses = DoseTable.repeated(d, tau, n, route="iv")
    c = concentration(PKParams(cl=cl, v=v), doses, t)
    rk = np.exp(-k * tau)
    np.testing.assert_allclose(c, d / v * np.exp(-k * s) * (1 - rk**n) / (1 - rk), rtol=1e-13)
    # oral (Bateman), n doses
    c = concentration(PKParams(cl=cl, v=v, ka=ka, f=f), DoseTable.repeated(d, tau, n, route="oral"), t)
    ra = np.exp(-ka * tau)
    expect = f * d * ka / (v * (ka - k)) * (np.exp(-k * s) * (1 - rk**n) / (1 - rk) - np.exp(-ka * s) * (1 - ra**n) / (1 - ra))
    np.testing.assert_allclose(c, expect, rtol=1e-12)
    # n -> infinity: the steady-state accumulation ratio 1 / (1 - e^{-k tau})
    c_many = concentration(PKParams(cl=cl, v=v), DoseTable.repeated(d, tau, 400, route="iv"), np.array([399.0]))
    assert c_many[0] == pytest.approx(d / v / (1 - rk), rel=1e-12)


@pytest.mark.parametrize(
    "params,route,dur",
    [(P1, "oral", 0.0), (P2, "oral", 0.0), (P2, "iv", 0.0), (P2, "iv", 2.0), (P1, "sc", 1.0)],
)
def test_auc_equals_f_dose_over_cl(params, route, dur):
    p = PKParams(**params)
    d = 40.0
    f = 1.0 if route == "iv" else params["f"]

    def c(t):
        return float(concentration(p, DoseTable.single(0.0, d, route, dur), np.array([t]))[0])

    pts = [0.01, 0.1, 1.0, dur or 0.5, 10.0, 100.0]
    auc = sum(quad(c, a, b, limit=500, epsabs=0, epsrel=1e-12)[0] for a, b in zip([0.0] + pts, pts + [3000.0]))
    assert auc == pytest.approx(f * d / params["cl"], rel=1e-8)


# ---------------------------------------------------------------------------------------
# batching, torch, gradients
# ---------------------------------------------------------------------------------------
def _mixed_doses():
    return DoseTable(
        np.array([0.0, 0.5, 1.0, 2.0, 3.5]),
        np.array([10.0, 5.0, 20.0, 8.0, 3.0]),
        np.array(["oral", "iv", "iv", "sc", "oral"], dtype=object),
        np.array([0.0, 0.0, 0.25, 0.0, 1.0]),
    )


def test_batch_shapes_and_order_independence():
    b = 4
    p = PKParams(cl=np.linspace(5, 20, b), v=60.0, q=np.full(b, 10.0), v2=100.0, ka=np.linspace(0.5, 30, b), f=0.6)
    t = np.linspace(0, 10, 37)
    c = concentration(p, _mixed_doses(), t)
    assert c.shape == (b, len(t))
    for i in range(b):
        pi = PKParams(cl=p.cl[i], v=60.0, q=10.0, v2=100.0, ka=p.ka[i], f=0.6)
        np.testing.assert_allclose(c[i], concentration(pi, _mixed_doses(), t), rtol=1e-14)
    d = _mixed_doses()
    perm = np.array([3, 0, 4, 2, 1])  # dose order does not matter
    shuffled = DoseTable(d.time[perm], d.amount[perm], d.route[perm], d.duration[perm])
    np.testing.assert_allclose(concentration(p, shuffled, t[::-1]), c[:, ::-1], rtol=1e-14)
    assert concentration(PKParams(**P1), _mixed_doses(), t).shape == (len(t),)
    p2 = PKParams(cl=np.ones((2, 3)) * 12.0, v=60.0, ka=18.0, f=0.7)
    assert concentration(p2, _mixed_doses(), t).shape == (2, 3, len(t))


@pytest.mark.parametrize("params", [P1, P2])
def test_torch_and_numpy_agree(params):
    b = 3
    pn = PKParams(**{k: np.full(b, v) * np.array([1.0, 1.3, 0.7]) if k in ("cl", "ka") else v for k, v in params.items()})
    cn = concentration(pn, _mixed_doses(), T)
    ct = concentration(pn.to_torch(), _mixed_doses(), T)
    assert isinstance(ct, torch.Tensor) and ct.dtype == torch.float64
    assert rel_err(ct.numpy(), cn, floor=1e-300) < 1e-12


@pytest.mark.parametrize("params", [P1, P2, dict(P1, ka=0.2 * (1 + 1e-7))])
def test_torch_gradients_match_finite_differences(params):
    names = [k for k in ("cl", "v", "q", "v2", "ka") if k in params]
    t = np.array([0.05, 0.3, 1.0, 2.5, 4.0, 7.0])
    doses = _mixed_doses()

    def f(*vals):
        kw = dict(params)
        kw.update(zip(names, vals))
        return concentration(PKParams(**kw), doses, t)

    inputs = tuple(torch.tensor(float(params[k]), dtype=torch.float64, requires_grad=True) for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_torch_gradient_is_finite_before_doses_and_at_zero_concentration():
    p = PKParams(**P2).to_torch(requires_grad=True)
    c = concentration(p, DoseTable.single(5.0, 10.0, "oral"), np.array([0.0, 1.0, 5.0, 6.0]))
    i = hill_inhibition(c, torch.tensor(0.05, dtype=torch.float64, requires_grad=True), 1.5)
    i.sum().backward()
    for name in ("cl", "v", "q", "v2", "ka", "f"):
        g = getattr(p, name).grad
        assert g is not None and torch.isfinite(g).all()


def test_hill_gradcheck_torch():
    c = torch.tensor([0.0, 0.01, 0.1, 1.0, 10.0], dtype=torch.float64)

    def f(ic50, h, imax):
        return hill_inhibition(c, ic50, h, imax)

    inputs = tuple(torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (0.2, 1.7, 0.9))
    assert torch.autograd.gradcheck(f, inputs)


# ---------------------------------------------------------------------------------------
# inhibition
# ---------------------------------------------------------------------------------------
def test_hill_inhibition_properties():
    c = np.concatenate([[0.0], np.logspace(-8, 8, 400)])
    for h in (0.5, 1.0, 2.0, 8.0):
        i = hill_inhibition(c, 0.3, h, 0.9)
        assert i[0] == 0.0
        assert np.all(np.diff(i) >= 0) and np.all(i <= 0.9) and np.all(i >= 0)
        assert hill_inhibition(0.3, 0.3, h, 0.9) == pytest.approx(0.45, rel=1e-15)
        ref = 0.9 * c**h / (0.3**h + c**h)
        np.testing.assert_allclose(i[1:200], ref[1:200], rtol=1e-12)
    assert hill_inhibition(1e300, 1e-3, 8.0) == 1.0


def test_molar_conversion():
    assert nm_to_mg_per_l(1.0, 500.0) == pytest.approx(5e-4)
    pk = lookup_drug("trametinib").pk
    assert pk.ic50_mg_l == pytest.approx(0.92 * 615.39e-6 / 0.026, rel=1e-12)
    assert pk.potency().ic50 == pk.ic50_mg_l


# ---------------------------------------------------------------------------------------
# event times and scaling
# ---------------------------------------------------------------------------------------
def test_event_times_are_dose_starts_and_infusion_ends():
    reg = Regimen.from_records(
        [
            {"drug": "docetaxel", "time": 0, "amount": 135, "route": "iv", "duration": 1 / 24, "interval": 21, "count": 3},
            {"drug": "abiraterone", "time": 0, "amount": 1000, "route": "oral", "interval": 1, "count": 3},
        ]
    )
    ev = event_times(reg)
    expect = np.unique(np.concatenate([[0, 1, 2], [0, 21, 42], np.array([0, 21, 42]) + 1 / 24]))
    np.testing.assert_allclose(ev, expect)
    np.testing.assert_allclose(event_times(reg, drug="docetaxel", start=1.0, stop=30.0), [21.0, 21 + 1 / 24])
    assert next_event_time(reg, 0.0) == pytest.approx(1 / 24)
    assert next_event_time(ev, 0.0, strict=False) == 0.0
    assert next_event_time(ev, 100.0) == math.inf
    two_arms = Regimen.from_records([{"drug": "x", "time": 0, "arm": "a"}, {"drug": "x", "time": 1, "arm": "b"}])
    with pytest.raises(InputError, match="several arms"):
        event_times(two_arms)
    np.testing.assert_allclose(event_times(two_arms, arm="b"), [1.0])


def test_scale_pk_allometry():
    p = PKParams(cl=100.0, v=200.0, q=50.0, v2=300.0, ka=24.0, f=0.5)
    same = scale_pk(p, 70.0, "human")
    assert (same.cl, same.v, same.q, same.v2) == (100.0, 200.0, 50.0, 300.0)
    m = scale_pk(p, 0.025, "mouse")
    r = 0.025 / 70.0
    assert m.cl == pytest.approx(100 * r**0.75) and m.q == pytest.approx(50 * r**0.75)
    assert m.v == pytest.approx(200 * r) and m.v2 == pytest.approx(300 * r)
    assert (m.ka, m.f) == (24.0, 0.5)
    # a mg/kg dose gives a concentration ratio (w/70)^{1-1} = 1 initially and a faster decline
    with pytest.raises(InputError, match="species"):
        scale_pk(p, 0.025, "mose")
    with pytest.raises(InputError):
        scale_pk(p, -1.0, "mouse")
    wt = scale_pk(PKParams(**P1).to_torch(requires_grad=True), 0.02, "mouse")
    assert isinstance(wt.cl, torch.Tensor)


# ---------------------------------------------------------------------------------------
# catalogue
# ---------------------------------------------------------------------------------------
LITERATURE = {
    "trametinib", "dabrafenib", "encorafenib", "binimetinib", "alpelisib", "ribociclib", "everolimus",
    "erlotinib", "cetuximab", "trastuzumab", "docetaxel", "paclitaxel", "nab_paclitaxel", "gemcitabine",
    "fluorouracil", "abiraterone", "enzalutamide", "leuprolide", "cyproterone_acetate", "infigratinib",
    "capmatinib", "ruxolitinib", "tamoxifen", "sonidegib", "ceritinib",
}


def test_every_catalogue_drug_has_pk_or_a_population_prior():
    for name, drug in catalogue().items():
        pk = drug.pk
        assert pk is not None, f"{name} has no PK keys"
        for key in ("pk_model", "cl", "v", "pk_source", "species"):
            assert key in drug.extra, f"{name} lacks {key}"
        assert drug.extra["species"] == "human"
        assert pk.source
        if name in LITERATURE:
            assert not pk.prior, name
        else:
            assert drug.extra.get("note", "").startswith("population prior:"), f"{name}: not literature and no population-prior note"
            assert pk.prior
            assert pk.sd_log["cl"] >= 0.5, f"{name}: prior on cl is too narrow"
            assert "v" in pk.sd_log, f"{name}: prior on v has no width"
        assert pk.ic50_mg_l is not None and pk.ic50_mg_l > 0, name
        assert pk.potency_source or pk.potency_prior, name
        if "ic50_nm" in drug.extra:
            assert "molar_mass" in drug.extra, name
        if pk.standard_route in ("oral", "sc", "im", "ip"):
            assert pk.ka is not None, name
        c = concentration(pk.params(), DoseTable.single(0.0, 1.0, "iv"), np.array([0.0, 1.0]))
        assert np.all(np.isfinite(c)) and c[0] > c[1] > 0


def test_apparent_values_are_converted_with_f():
    extra = lookup_drug("trametinib").extra
    pk = lookup_drug("trametinib").pk
    assert pk.cl == pytest.approx(extra["cl"] * extra["f"]) and pk.v2 == pytest.approx(extra["v2"] * extra["f"])
    alp = lookup_drug("alpelisib").pk  # F unknown: stays apparent with f = 1, and says so
    assert alp.f == 1.0 and any("apparent" in n for n in alp.notes)


def test_trastuzumab_steady_state_matches_label():
    """Herceptin SmPC: predicted ss Cmax ~179 and Cmin ~44 mg/L for 6 mg/kg q3w (68 kg)."""
    pk = lookup_drug("trastuzumab").pk
    doses = DoseTable.repeated(6 * 68, 21.0, 30, route="iv", duration=1 / 48)
    t = np.linspace(29 * 21, 30 * 21, 2000)
    c = concentration(pk.params(), doses, t)
    assert c.max() == pytest.approx(179, rel=0.15) and c.min() == pytest.approx(44.2, rel=0.2)


def test_malformed_pk_spec_is_reported_with_the_drug_name():
    with pytest.raises(ValueError, match="'x'.*q"):
        parse_drug_pk("x", {"pk_model": "2cpt", "cl": 1.0, "v": 1.0})
    with pytest.raises(ValueError, match="fu"):
        parse_drug_pk("x", {"pk_model": "1cpt", "cl": 1.0, "v": 1.0, "ic50_nm": 1.0, "molar_mass": 300.0})
    with pytest.raises(ValueError, match="molar_mass"):
        parse_drug_pk("x", {"pk_model": "1cpt", "cl": 1.0, "v": 1.0, "ic50_nm": 1.0, "ic50_basis": "plasma_total"})
    with pytest.raises(ValueError, match="positive"):
        parse_drug_pk("x", {"pk_model": "1cpt", "cl": -1.0, "v": 1.0})


# ---------------------------------------------------------------------------------------
# exposure
# ---------------------------------------------------------------------------------------
def test_exposure_uses_catalogue_and_matches_concentration():
    reg = Regimen.from_records([{"drug": "trametinib", "time": 0, "amount": 2, "route": "oral", "interval": 1, "count": 20}])
    t = np.linspace(0, 25, 101)
    ex = exposure(reg, None, t)
    pk = lookup_drug("trametinib").pk
    c = concentration(pk.params(), DoseTable.repeated(2.0, 1.0, 20), t)
    np.testing.assert_allclose(ex.concentration["trametinib"], c, rtol=1e-14)
    np.testing.assert_allclose(ex.inhibition["trametinib"], hill_inhibition(c, pk.ic50_mg_l), rtol=1e-14)
    assert not ex.any_imputed and ex.notes == ()


def test_nan_amount_uses_standard_dose_with_a_flag():
    reg = Regimen.from_records(
        [
            {"drug": "erlotinib", "time": 0, "amount": None, "route": "oral", "interval": 1, "count": 5},
            {"drug": "erlotinib", "time": 5, "amount": 100, "route": "oral", "interval": 1, "count": 5},
        ]
    )
    t = np.linspace(0, 12, 49)
    with pytest.warns(ImputedDoseWarning, match="erlotinib: 5 dose"):
        ex = exposure(reg, None, t)
    assert ex.imputed == {"erlotinib": 5} and ex.any_imputed
    assert "standard dose 150 mg" in ex.notes[0]
    doses = DoseTable(np.arange(10.0), np.r_[np.full(5, 150.0), np.full(5, 100.0)], np.full(10, "oral", dtype=object), np.zeros(10))
    np.testing.assert_allclose(ex.concentration["erlotinib"], concentration(lookup_drug("erlotinib").pk.params(), doses, t), rtol=1e-14)
    # a caller-given standard dose (e.g. a mouse dose) overrides the catalogue's, also flagged
    ex2 = exposure(reg, None, t, standard_doses={"erlotinib": 1.0}, warn=False)
    assert ex2.imputed["erlotinib"] == 5 and "given standard dose" in ex2.notes[0]
    # without any standard dose: an error that says how to fix it
    with pytest.raises(InputError, match="standard_doses"):
        exposure(Regimen.from_records([{"drug": "lcl161", "time": 0}]), None, t)
    # the low-level API never fills silently
    with pytest.raises(InputError, match="NaN"):
        DoseTable(np.array([0.0]), np.array([np.nan]), np.array(["oral"], dtype=object), np.array([0.0]))


def test_exposure_batched_params_and_torch():
    reg = Regimen.from_records(
        [
            {"drug": "docetaxel", "time": 0, "amount": 135, "route": "iv", "duration": 1 / 24},
            {"drug": "enzalutamide", "time": 0, "amount": 160, "route": "oral", "interval": 1, "count": 3},
        ]
    )
    t = np.linspace(0, 4, 9)
    pk = lookup_drug("docetaxel").pk
    batch = PKParams(cl=pk.cl * np.array([0.5, 1.0, 2.0]), v=pk.v, q=pk.q, v2=pk.v2)
    pot = Potency(ic50=np.array([0.01, 0.1, 1.0]), hill=1.0)
    ex = exposure(reg, {"docetaxel": (batch, pot)}, t)
    assert ex.concentration["docetaxel"].shape == (3, 9) and ex.inhibition["docetaxel"].shape == (3, 9)
    assert ex.concentration["enzalutamide"].shape == (9,)
    ext = exposure(reg, {"docetaxel": (batch.to_torch(), pot)}, t)
    np.testing.assert_allclose(ext.concentration["docetaxel"].numpy(), ex.concentration["docetaxel"], rtol=1e-12)
    with pytest.raises(InputError, match="no PK"):
        exposure(Regimen.from_records([{"drug": "bicalutamide", "time": 0, "amount": 50}]), None, t)


def test_dose_table_validation():
    with pytest.raises(InputError, match="route"):
        DoseTable.single(0.0, 1.0, "inhaled")
    with pytest.raises(InputError, match="ka"):
        concentration(PKParams(cl=1.0, v=1.0), DoseTable.single(0.0, 1.0, "oral"), T)
    with pytest.raises(InputError, match="positive"):
        PKParams(cl=1.0, v=0.0)
    with pytest.raises(InputError, match="both q and v2"):
        PKParams(cl=1.0, v=1.0, q=1.0)


# ---------------------------------------------------------------------------------------
# docs
# ---------------------------------------------------------------------------------------
def test_docs_pk_examples_run_and_list_every_drug():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "pk.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/pk.md", "exec"), {})
    from twin.drugs import _pk_markdown

    generated = re.search(r"<!-- BEGIN GENERATED[^\n]*-->\n(.*?)<!-- END GENERATED -->", text, flags=re.S)
    assert generated, "docs/pk.md lost its generated section markers"
    assert generated.group(1) == _pk_markdown(), (
        "docs/pk.md's catalogue tables are stale: regenerate them with "
        "python -c 'from twin.drugs import _pk_markdown; print(_pk_markdown())'"
    )
    for name in catalogue():
        assert f"`{name}`" in text


def test_multi_month_depot_releases_as_consecutive_unit_depots():
    """Leuprolide 22.5 mg (3-month depot) = 7.5 mg 1-month depots at days 0, 28, 56; 7.5 mg
    and non-multiples stay as given; the total amount is kept."""
    from twin.pk import dose_table
    from twin.regimen import Regimen

    reg = Regimen.from_records([
        {"drug": "leuprolide", "time": 10, "amount": 22.5, "route": "im"},
        {"drug": "leuprolide", "time": 200, "amount": 7.5, "route": "im"},
        {"drug": "leuprolide", "time": 300, "amount": 11.25, "route": "im"},
    ])
    table, _ = dose_table(reg, "leuprolide")
    np.testing.assert_array_equal(table.time, [10, 38, 66, 200, 300])
    np.testing.assert_array_equal(table.amount, [7.5, 7.5, 7.5, 7.5, 11.25])
    assert table.amount.sum() == 22.5 + 7.5 + 11.25
    # a drug without depot_unit_mg is never expanded
    t2, _ = dose_table(Regimen.from_records([{"drug": "enzalutamide", "time": 0, "amount": 480, "route": "oral"}]), "enzalutamide")
    np.testing.assert_array_equal(t2.amount, [480])
