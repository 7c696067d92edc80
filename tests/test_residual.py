"""Neural residual (twin/residual.py): hook, bound, gradients, files, cohort training."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchdiffeq")

from twin.errors import InputError
from twin.graph import load_pathway
from twin.model import TwinModel
from twin.regimen import Regimen
from twin.residual import NeuralResidual, ResidualODE, cohort_loss, train_residual
from twin.simulate import simulate


@pytest.fixture(scope="module")
def mapk():
    return TwinModel.from_graph(load_pathway("mapk_pi3k"), drugs=["dabrafenib", "trametinib"], mechanisms=["mek_mutation"], persisters=True)


@pytest.fixture(scope="module")
def reduced():
    return TwinModel.from_graph(None, pathway=False, drugs=["trametinib"])


def _random_state(model, B=3, seed=1, cells=1e9):
    g = torch.Generator().manual_seed(seed)
    p = model.parameter_tensors({}, batch=B)
    y = model.initial_state(p).clone()
    C, N = len(model.clones), len(model.nodes)
    y[:, : C * N] = torch.rand((B, C * N), generator=g, dtype=torch.float64) * 0.8 + 0.1
    nc = len(model.compartments)
    y[:, C * N: C * N + nc] = cells * (0.5 + torch.rand((B, nc), generator=g, dtype=torch.float64))
    ex = torch.rand((B, len(model.drugs)), generator=g, dtype=torch.float64)
    return p, y, ex


def _randomised(res, seed=3, scale=1.0):
    """A residual whose last layer is not zero (so the term and its gradients are not trivial)."""
    res.seed = seed
    res.reset_parameters(zero_last=False)
    with torch.no_grad():
        for q in res.parameters():
            q.mul_(scale)
    return res


# ------------------------------------------------------------------ hook
def test_no_residual_is_bitwise_the_mechanistic_model(mapk):
    assert mapk.residual is None and mapk.without_residual() is mapk
    p, y, ex = _random_state(mapk)
    base = mapk.vector_field(0.0, y, p, ex)
    res = NeuralResidual.for_model(mapk, seed=0)
    on = mapk.with_residual(res)
    assert on.residual is res and mapk.residual is None  # a new model; the original is untouched
    off = on.without_residual()
    assert off.residual is None
    assert torch.equal(off.vector_field(0.0, y, p, ex), base)
    # an untrained (zero last layer) residual adds exactly zero
    assert torch.equal(on.vector_field(0.0, y, p, ex), base)
    assert mapk.with_residual(None) is mapk
    assert "residual" in repr(on) and "residual" not in repr(mapk)


def test_zero_residual_leaves_trajectories_unchanged(mapk, monkeypatch):
    monkeypatch.setenv("TWIN_SIMULATE_BACKEND", "torch")  # a model with a residual always runs on torch: compare like with like
    reg = {"none": Regimen.empty(), "dab_tram": Regimen.from_records([
        {"drug": "dabrafenib", "time": 0, "amount": 150.0, "interval": 0.5, "count": 6},
        {"drug": "trametinib", "time": 0, "amount": 2.0, "interval": 1, "count": 3},
    ])}
    times = np.array([0.0, 2.0, 5.0])
    params = {"r_max": np.array([0.08, 0.12])}
    a = simulate(mapk, params, reg, times)
    b = simulate(mapk.with_residual(NeuralResidual.for_model(mapk, seed=7)), params, reg, times)
    for k in ("N_S", "N_R_mek_mutation", "N_P", "tumor_volume"):
        np.testing.assert_array_equal(a[k].values, b[k].values)


def test_constant_residual_matches_closed_form(reduced):
    """Weights zero, last bias b: eps = eps_max tanh(b) constant, so untreated
    dN/dt = (r (1 - N/K) - d + eps) N is logistic with rate a = r - d + eps and capacity K a / r."""
    res = NeuralResidual.for_model(reduced, eps_max=0.05)
    with torch.no_grad():
        res.net[-1].bias.fill_(0.4)
    eps = 0.05 * math.tanh(0.4)
    m = reduced.with_residual(res)
    times = np.linspace(0.0, 100.0, 6)
    ds = simulate(m, {"N0": 1e10, "K": 1e11}, {"untreated": Regimen.empty()}, times, rtol=1e-10, atol=1e-6)
    r, d = 0.1, 0.07
    a = r - d + eps
    Ka = 1e11 * a / r
    exact = Ka / (1 + (Ka / 1e10 - 1) * np.exp(-a * times))
    np.testing.assert_allclose(ds["N_S"].values[0, 0], exact, rtol=1e-7)


def test_binding_errors(mapk):
    with pytest.raises(InputError, match="Did you mean"):
        mapk.with_residual(NeuralResidual(["ERKK"], []))
    with pytest.raises(InputError, match="drug"):
        mapk.with_residual(NeuralResidual(["ERK"], ["paclitaxel"]))
    with pytest.raises(InputError, match="float64"):
        mapk.with_residual(NeuralResidual(["ERK"], ["trametinib"]).float())
    with pytest.raises(InputError, match="eps_max"):
        NeuralResidual(eps_max=0.0)


def test_subset_inputs_read_the_sensitive_clone(mapk):
    res = _randomised(NeuralResidual(["ERK", "AKT"], ["trametinib"], hidden=(4,)))
    m = mapk.with_residual(res)
    p, y, ex = _random_state(mapk)
    got = (m.vector_field(0.0, y, p, ex) - mapk.vector_field(0.0, y, p, ex)).detach()
    n = len(mapk.nodes)
    xs = y[:, [mapk.nodes.index("ERK"), mapk.nodes.index("AKT")]]
    cells = y[:, 2 * n: 2 * n + 3]
    eps = res(xs, cells.sum(-1), ex[:, [1]])
    np.testing.assert_allclose(got[:, 2 * n: 2 * n + 2].numpy(), (eps[:, None] * cells[:, :2]).detach().numpy(), rtol=1e-9)
    assert torch.equal(got[:, 2 * n + 2], torch.zeros(3, dtype=torch.float64))  # persisters: no term
    assert torch.equal(got[:, : 2 * n], torch.zeros_like(got[:, : 2 * n]))  # pathway untouched


# ------------------------------------------------------------------ bound and initialisation
def test_bound_and_deterministic_init():
    a, b = NeuralResidual(["A"], ["d"], seed=5), NeuralResidual(["A"], ["d"], seed=5)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb) and va.dtype == torch.float64
    assert not torch.equal(a.net[0].weight, NeuralResidual(["A"], ["d"], seed=6).net[0].weight)
    g = torch.Generator().manual_seed(0)
    x = torch.rand((500, 1), generator=g, dtype=torch.float64) * 4
    n = 10 ** (torch.rand(500, generator=g, dtype=torch.float64) * 14)
    e = torch.rand((500, 1), generator=g, dtype=torch.float64)
    assert torch.equal(a(x, n, e), torch.zeros(500, dtype=torch.float64))
    big = _randomised(NeuralResidual(["A"], ["d"], eps_max=0.03), scale=50.0)
    out = big(x, n, e).detach()
    assert float(out.abs().max()) <= 0.03
    assert float(out.abs().max()) > 0.029  # saturates: the bound is the bound, not a scale


# ------------------------------------------------------------------ gradients
def test_gradcheck_vector_field_wrt_weights(mapk):
    res = _randomised(NeuralResidual(["ERK", "AKT", "S6K"], ["dabrafenib", "trametinib"], hidden=(4, 3)))
    m = mapk.with_residual(res)
    p, y, ex = _random_state(mapk, B=2, cells=30.0)
    func = ResidualODE(m, p, lambda t: ex)
    names = [f"residual.{k}" for k, _ in res.named_parameters()]
    weights = tuple(q.detach().clone().requires_grad_(True) for q in res.parameters())

    def f(*ws):
        return torch.func.functional_call(func, dict(zip(names, ws)), (torch.tensor(0.0), y))

    assert torch.autograd.gradcheck(f, weights, eps=1e-6, atol=1e-8, rtol=1e-6)


def _small_cohort():
    cohort = []
    for i, lev in enumerate((0.8, 0.2)):
        table = np.array([[0.0, lev], [3.0, 0.0]])
        times = np.array([0.0, 2.0, 5.0]) + i  # different clocks
        cohort.append(({"r_max": 0.1 + 0.02 * i, "N0": 1e9 * (1 + i)}, table, times, np.log(np.array([1e3, 1.1e3, 1.3e3]) * (1 + i))))
    return cohort


def test_adjoint_and_direct_gradients_agree(reduced):
    grads = {}
    for adjoint in (False, True):
        res = _randomised(NeuralResidual.for_model(reduced, hidden=(5,)), seed=11)
        loss = cohort_loss(reduced.with_residual(res), _small_cohort(), adjoint=adjoint, rtol=1e-12, atol=1e-12)
        loss.backward()
        grads[adjoint] = torch.cat([q.grad.reshape(-1) for q in res.parameters()])
    direct, adj = grads[False], grads[True]
    assert float(direct.abs().max()) > 0
    rel = float((adj - direct).abs().max() / direct.abs().max())
    assert rel < 1e-6, rel


# ------------------------------------------------------------------ files
def test_save_load_round_trip_bitwise(tmp_path, mapk):
    res = _randomised(NeuralResidual(["ERK", "AKT"], ["trametinib"], eps_max=0.04, burden_center=8.0, seed=2))
    pt, js = res.save(tmp_path / "res")
    assert pt.name == "res.pt" and js.name == "res.json" and pt.exists() and js.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["res.json", "res.pt"]  # no temporary files left
    arch = json.loads(js.read_text())
    assert arch["hidden"] == [16, 16] and arch["eps_max"] == 0.04 and arch["format"] == "twin.neural_residual"
    for name in ("res", "res.pt", "res.json"):
        back = NeuralResidual.load(tmp_path / name)
        assert back.architecture() == res.architecture()
        sd, sb = res.state_dict(), back.state_dict()
        assert list(sd) == list(sb)
        for k in sd:
            assert torch.equal(sd[k], sb[k]) and sb[k].dtype == torch.float64
    p, y, ex = _random_state(mapk)
    assert torch.equal(mapk.with_residual(back).vector_field(0.0, y, p, ex), mapk.with_residual(res).vector_field(0.0, y, p, ex))


def test_load_rejects_tampered_files(tmp_path):
    res = NeuralResidual(["ERK"], ["trametinib"], hidden=(8,))
    pt, js = res.save(tmp_path / "res")
    good = pt.read_bytes()
    # wrong shapes in the weights file
    sd = res.state_dict()
    sd["net.0.weight"] = torch.zeros((8, 5), dtype=torch.float64)
    torch.save(sd, pt)
    with pytest.raises(InputError, match=r"'net.0.weight' has shape \[8, 5\].*needs \[8, 3\]"):
        NeuralResidual.load(pt)
    # missing / extra keys
    torch.save({"net.0.weight": torch.zeros((8, 3), dtype=torch.float64)}, pt)
    with pytest.raises(InputError, match="missing"):
        NeuralResidual.load(pt)
    # the architecture edited: hidden widths no longer match the weights
    pt.write_bytes(good)
    arch = json.loads(js.read_text())
    js.write_text(json.dumps(dict(arch, hidden=[16])))
    with pytest.raises(InputError, match="shape"):
        NeuralResidual.load(js)
    # same shapes, other weights: caught by the recorded hash
    js.write_text(json.dumps(arch))
    other = _randomised(NeuralResidual(["ERK"], ["trametinib"], hidden=(8,)))
    torch.save(other.state_dict(), pt)
    with pytest.raises(InputError, match="SHA-256"):
        NeuralResidual.load(pt)
    pt.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="state dict"):
        NeuralResidual.load(pt)
    pt.unlink()
    with pytest.raises(InputError, match="does not exist"):
        NeuralResidual.load(js)
    pt.write_bytes(good)
    js.write_text('{"format": "something else"}')
    with pytest.raises(InputError, match="format"):
        NeuralResidual.load(tmp_path / "res")


# ------------------------------------------------------------------ training
def _synthetic(p, table, times, extra):
    """ln V from the reduced logistic model with one targeted drug plus ``extra(I)``, solved
    independently of twin (scipy, piecewise-constant exposure)."""
    from scipy.integrate import solve_ivp

    r, d, K, n = p["r_max"], 0.07, 1e12, p["N0"]
    stops = np.unique(np.concatenate([times, table[:, 0]]))
    out = {float(times[0]): n}
    y = [n]
    for a, b in zip(stops[:-1], stops[1:]):
        k = np.searchsorted(table[:, 0], a, side="right") - 1
        inh = 0.0 if k < 0 else table[k, 1]
        sol = solve_ivp(lambda t, v: (r * (1 - inh) * (1 - v / K) - d + extra(inh)) * v, (a, b), y, rtol=1e-10, atol=1e-3)
        y = sol.y[:, -1]
        out[float(b)] = y[0]
    return np.log(np.array([out[float(t)] for t in times]) * 1e-6)


def test_training_recovers_a_known_extra_growth_term(reduced):
    extra = lambda inh: 0.02 if inh > 0.5 else 0.0  # noqa: E731 -- +0.02/day under high exposure
    cohort = []
    for i, (r, lev) in enumerate([(0.1, 0.8), (0.12, 0.9), (0.09, 0.3), (0.11, 0.7)]):
        table = np.array([[0.0, lev], [20.0, 0.0], [40.0, 0.8]])
        times = np.arange(0.0, 61.0, 10.0)
        p = {"r_max": r, "N0": 1e9 * (1 + i)}
        cohort.append((p, table, times, _synthetic(p, table, times, extra)))
    # the untrained residual is the mechanistic model: against data without the extra term the loss is ~0
    clean = [(p, tb, t, _synthetic(p, tb, t, lambda inh: 0.0)) for p, tb, t, _ in cohort]
    with torch.no_grad():
        assert float(cohort_loss(reduced.with_residual(NeuralResidual.for_model(reduced)), clean, rtol=1e-9)) < 1e-10
    seen = []
    t0 = time.perf_counter()
    res, hist = train_residual(reduced, cohort, epochs=25, lr=0.08, seed=0, rtol=1e-6, atol=1e-6, callback=lambda e, loss: seen.append(e))
    elapsed = time.perf_counter() - t0
    assert seen == list(range(25)) and len(hist) == 25
    assert hist[-1] < hist[0] / 10, hist
    zero = torch.zeros((1, 0), dtype=torch.float64)
    n = torch.tensor([3e9], dtype=torch.float64)
    with torch.no_grad():
        hi = float(res(zero, n, torch.tensor([[0.85]], dtype=torch.float64)))
        lo = float(res(zero, n, torch.tensor([[0.0]], dtype=torch.float64)))
    assert hi > 0.01 and hi > lo + 0.01, (hi, lo)
    assert elapsed < 20, elapsed


def test_training_options_adjoint_batches_and_early_stop(reduced):
    res, hist = train_residual(reduced, _small_cohort(), epochs=5, lr=0.01, adjoint=True, batch_size=1, hidden=(4,), callback=lambda e, loss: e >= 1)
    assert len(hist) == 2 and all(math.isfinite(h) for h in hist)
    assert res.hidden == (4,)
    with pytest.raises(InputError, match="unknown parameter"):
        train_residual(reduced, [({"r_mx": 0.1}, None, [0.0, 1.0], [0.0, 0.0])], epochs=1)
    with pytest.raises(InputError, match="exposure table"):
        train_residual(reduced, [({}, np.zeros((2, 3)), [0.0, 1.0], [0.0, 0.0])], epochs=1)
    # a function exposure (of absolute time) works as well as a table
    f = lambda t: [0.5 if t < 1.0 else 0.0]  # noqa: E731
    loss = cohort_loss(reduced.with_residual(res), [({}, f, [0.0, 2.0], [6.9, 7.0])])
    assert math.isfinite(loss.item())


def test_model_saved_and_loaded_with_its_residual(tmp_path):
    """TwinModel.save/load round-trips the specification and the residual: identical vector field."""
    import torch

    from twin.graph import load_pathway
    from twin.model import TwinModel
    from twin.residual import NeuralResidual

    base = TwinModel.from_graph(load_pathway("mapk_pi3k"), drugs=["dabrafenib", "trametinib"], mechanisms=["mek_mutation"], persisters=True)
    res = NeuralResidual.for_model(base, seed=3)
    res.reset_parameters(zero_last=False)  # a non-zero residual, so the test can fail
    model = base.with_residual(res)
    path = model.save(tmp_path / "m.json")
    back = TwinModel.load(path)
    assert back.spec() == model.spec()
    assert back.residual is not None
    p = model.parameter_tensors(model.default_values(), batch=4)
    y = model.initial_state(p) * (1 + 0.01 * torch.arange(4, dtype=torch.float64)[:, None])
    ex = torch.full((4, 2), 0.6, dtype=torch.float64)
    with torch.no_grad():
        a = model.vector_field(0.0, y, p, ex)
        b = back.vector_field(0.0, y, back.parameter_tensors(back.default_values(), batch=4), ex)
        c = base.vector_field(0.0, y, p, ex)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    plain = base.save(tmp_path / "plain.json")
    assert TwinModel.load(plain).residual is None
