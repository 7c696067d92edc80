"""The compiled scenario engine (``scenarios.run._ENGINE = "compiled"``) against the reference
path (one ``twin.simulate`` call per dose history and visit interval), and its kernel
(:meth:`twin.compiled.CompiledTwin.solve_groups`, :data:`twin._codegen.SOLVER_CARRY`)."""

from __future__ import annotations

import numpy as np
import pytest

import scenarios.run as R
from scenarios import Arm, Scenario, library_path
from scenarios.protocol import Dose, Protocol, Rest, Switch
from scenarios.scenario import OutcomeSpec
from twin.compiled import _hoist_parameter_lines, compiled_twin, segment_schedule
from twin.model import TwinModel


def _run(monkeypatch, twin, scenario, engine, carry, **kw):
    monkeypatch.setattr(R, "_ENGINE", engine)
    monkeypatch.setattr(R, "_CARRY_STEP", carry)
    calls = []
    res = R.run_scenario(twin, scenario, progress=calls.append, **kw)
    return res, calls


def _compare(ref, new, rtol):
    assert set(ref.data_vars) == set(new.data_vars)
    for v in ref.data_vars:
        a, b = ref[v].values, new[v].values
        if a.dtype.kind == "f":
            np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=v)
            np.testing.assert_allclose(b, a, rtol=rtol, atol=0, equal_nan=True, err_msg=v)
        else:
            np.testing.assert_array_equal(b, a, err_msg=v)


@pytest.fixture(scope="module")
def adt():
    """The ADT library scenario (continuous protocol; Bruchovsky and Zhang policies) on the
    bundled prostate patient, 6 prior draws over 40 weeks (10 visits)."""
    import twin

    sc = Scenario.from_toml(library_path("adt_continuous_vs_intermittent_vs_adaptive"))
    model = R.model_for_scenario(sc)
    tw = R.prior_twin(twin.datasets.load_patient_example(), model, 6, seed=1)
    return tw, sc


def _histories_per_visit(calls, arm):
    return [int(str(c["message"]).rsplit(",", 1)[1].split()[0]) for c in calls if c["arm"] == arm]


@pytest.mark.parametrize("carry", [False, True])
def test_adt_scenario_compiled_equals_simulate_path(adt, monkeypatch, carry):
    """Every variable of every arm equals the simulate-based path: bit for bit (up to 1e-12)
    without the step carry, within the integrator's tolerance (rtol 1e-6) with it; the
    policies' decisions (dose factors, doses, treatment) are identical. The adaptive arm's draws
    diverge: several dose histories per visit."""
    tw, sc = adt
    ref, calls = _run(monkeypatch, tw, sc, "simulate", False, horizon=280)
    new, calls_new = _run(monkeypatch, tw, sc, "compiled", carry, horizon=280)
    assert max(_histories_per_visit(calls, "adaptive")) >= 2, "the adaptive arm's draws should diverge"
    assert _histories_per_visit(calls, "adaptive") == _histories_per_visit(calls_new, "adaptive")
    assert (ref["status"].values == 0).all()
    _compare(ref, new, rtol=1e-12 if not carry else 1e-4)
    for v in ("dose_factor", "on_treatment", "cumulative_dose", "treatment_line"):
        np.testing.assert_array_equal(new[v].values, ref[v].values, err_msg=v)


def test_switching_arms_compiled_equals_simulate_path(monkeypatch):
    """Protocol arms that switch at progression (each draw on its own line history) and a
    fixed arm: the compiled engine without the carry equals the simulate path to 1e-12."""
    from twin.io import read_patient
    from pathlib import Path

    patient, _ = read_patient(Path(__file__).resolve().parents[1] / "docs" / "examples" / "patient-example")
    model = TwinModel.from_graph(None, drugs=["paclitaxel", "docetaxel"], pathway=False)
    draws = {
        "N0": np.array([1e9, 1e9, 1e9, 1e9]),
        "K": np.full(4, 1e13),
        "r_max": np.array([0.018, 0.0149, 0.0011, 0.023]),
        "d_max": np.array([0.01, 0.01, 0.001, 0.01]),
        "kill_paclitaxel": np.array([0.2, 0.002, 0.2, 0.001]),
        "kill_docetaxel": np.full(4, 0.3),
    }
    H = 168.0
    sequential = Protocol((Rest(H), Switch(Dose("docetaxel", 75, "mg/m2", "iv", every=21), "progression")))
    sc = Scenario(
        name="switch-compiled",
        arms=(
            Arm("paclitaxel", protocol="paclitaxel 80 mg/m2 iv weekly for 24 weeks"),
            Arm("rest_then_docetaxel", protocol=sequential),
            Arm("paclitaxel_then_docetaxel",
                protocol="paclitaxel 80 mg/m2 iv weekly until progression then switch to docetaxel 75 mg/m2 iv every 3 weeks"),
        ),
        horizon=H,
        visits="every 2 weeks",
        outcomes=OutcomeSpec(criteria=("recist_volume",)),
        seed=1,
    )
    twin = (patient, model, draws)
    ref, _ = _run(monkeypatch, twin, sc, "simulate", False, rtol=1e-8, atol=1e-10)
    new, _ = _run(monkeypatch, twin, sc, "compiled", False, rtol=1e-8, atol=1e-10)
    line = ref["treatment_line"].sel(arm="paclitaxel_then_docetaxel").values[:, -1]
    assert 0 < line.sum() < len(line), "some draws switch, some do not"
    _compare(ref, new, rtol=1e-12)
    # with the carry: other steps, the same tolerance. Both paths' global errors exceed rtol
    # (the simulate path is 1.4e-4 off for draw 3 here), so both are held to a tight solution
    tight, _ = _run(monkeypatch, twin, sc, "simulate", False, rtol=1e-12, atol=1e-10)
    carried, _ = _run(monkeypatch, twin, sc, "compiled", True, rtol=1e-8, atol=1e-10)
    _compare(tight, carried, rtol=1e-4)
    _compare(tight, ref, rtol=1e-3)


def test_a_failed_draw_fails_alone_in_the_compiled_engine(adt, monkeypatch):
    """A draw whose integration fails is NaN with a non-zero status in every arm; the
    others are unaffected (equal to a run without it)."""
    tw, sc = adt
    draws = {k: np.array(v, float).copy() for k, v in tw.draws.items()}
    draws["tau"] = draws["tau"].copy()
    draws["tau"][1] = 1e-9  # a step size far below min_step
    bad = R.PriorTwin(tw.patient, tw.model, draws, seed=1)
    res, _ = _run(monkeypatch, bad, sc, "compiled", True, horizon=84)
    good, _ = _run(monkeypatch, R.PriorTwin(tw.patient, tw.model, {k: np.delete(v, 1) for k, v in draws.items()}, seed=1),
                   sc, "compiled", True, horizon=84)
    assert (res["status"].values[:, 1] != 0).all() and (res["status"].values[:, [0, 2, 3, 4, 5]] == 0).all()
    assert np.isnan(res["psa"].values[:, 1, 1:]).all()
    np.testing.assert_array_equal(res["psa"].values[:, [0, 2, 3, 4, 5]], good["psa"].values)


# -- the kernel ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel(adt):
    import torch

    tw, sc = adt
    model = tw.model
    ct = compiled_twin(model)
    p = model.parameter_tensors({k: torch.as_tensor(np.asarray(v, float)) for k, v in tw.draws.items()}, batch=6)
    theta = np.stack([p[n].numpy() for n in model.parameter_names], axis=-1)
    with torch.no_grad():
        y0 = model.initial_state(p).numpy()
    cont = R._regimen_from_events(sc.arms[0].protocol.expansion(tw.patient.covariates, start=0.0, horizon=70.0).regimen.events())
    return model, ct, theta, y0, cont


def test_solve_groups_without_carry_equals_solve(kernel):
    """Without the carry, solve_groups takes the steps of CompiledTwin.solve (the simulate
    backend): identical states; members on two schedules, interleaved, equal their own runs."""
    from twin.regimen import Regimen

    model, ct, theta, y0, cont = kernel
    times = np.arange(0.0, 71.0)
    s_cont = segment_schedule(model, ct.layout, ct.n_w, cont, 0.0, 70.0)[:2]
    s_none = segment_schedule(model, ct.layout, ct.n_w, Regimen.empty(), 0.0, 70.0)[:2]
    a, st_a, _ = ct.solve(theta, y0, *s_cont, times)
    b, st_b, _ = ct.solve(theta, y0, *s_none, times)
    which = np.array([0, 1, 0, 1, 1, 0])
    g, st_g, _, _ = ct.solve_groups(theta, y0, [s_cont, s_none], which, times, carry=False)
    assert (st_a == 0).all() and (st_b == 0).all() and (st_g == 0).all()
    np.testing.assert_array_equal(g[which == 0], a[which == 0])
    np.testing.assert_array_equal(g[which == 1], b[which == 1])


def test_carried_step_split_at_a_dose_equals_the_unsplit_run(kernel):
    """With the carry, a run split at a dose time and continued with the returned step sizes
    takes exactly the steps of the unsplit run; it agrees with the Hairer restart to the
    tolerance and takes fewer steps (twice-daily oral cyproterone)."""
    model, ct, theta, y0, cont = kernel
    times = np.arange(0.0, 71.0)
    full, _, n_full, _ = ct.solve_groups(theta, y0, [segment_schedule(model, ct.layout, ct.n_w, cont, 0.0, 70.0)[:2]],
                                         np.zeros(6, np.int64), times, carry=True)
    first, _, n1, h1 = ct.solve_groups(theta, y0, [segment_schedule(model, ct.layout, ct.n_w, cont, 0.0, 28.0)[:2]],
                                       np.zeros(6, np.int64), times[:29], carry=True)
    second, _, n2, _ = ct.solve_groups(theta, first[:, -1], [segment_schedule(model, ct.layout, ct.n_w, cont, 28.0, 70.0)[:2]],
                                       np.zeros(6, np.int64), times[28:], h_first=h1, carry=True)
    np.testing.assert_array_equal(second, full[:, 28:])
    np.testing.assert_array_equal(n1 + n2, n_full)
    restart, _, n_restart, _ = ct.solve_groups(theta, y0, [segment_schedule(model, ct.layout, ct.n_w, cont, 0.0, 70.0)[:2]],
                                               np.zeros(6, np.int64), times, carry=False)
    np.testing.assert_allclose(full, restart, rtol=1e-4, atol=1e-9)
    assert n_full.sum() < n_restart.sum()


def test_hoisted_parameter_lines():
    """Lines that depend on the parameters only move to prep(th) and are read back from the
    extended parameter vector; everything else stays in order."""
    lines = [
        "    v0 = _sigmoid(th[3])",
        "    v1 = y[0] * v0",
        "    v2 = v0 * th[1]",
        "    v3 = math.exp(-2.0 * s)",
        "    v4 = v2 + w[1]",
        "    v5 = th[10] / 2.0",
    ]
    rhs, prep, n = _hoist_parameter_lines(lines, 12)
    assert n == 3
    assert rhs == ["    v0 = th[12]", "    v1 = y[0] * v0", "    v2 = th[13]", "    v3 = math.exp(-2.0 * s)", "    v4 = v2 + w[1]", "    v5 = th[14]"]
    assert prep == ["    v0 = _sigmoid(th[3])", "    out[12] = v0", "    v2 = v0 * th[1]", "    out[13] = v2", "    v5 = th[10] / 2.0", "    out[14] = v5"]


def test_history_dose_tables_extend_the_parent(adt):
    """A policy arm's dose tables, built interval by interval (parent + the interval's doses),
    equal those built from the whole history's events (what simulate uses)."""
    import pandas as pd

    from scenarios.scenario import policy_doses

    tw, sc = adt
    eng = R._Compiled(tw.model, {k: np.asarray(v, float)[:2] for k, v in tw.draws.items()}, 2, rtol=1e-6, atol=1e-9)
    treat = sc.arms[2].treat
    chunks = [policy_doses(treat, anchor=a, start=t0, stop=t1, factor=f, covariates=tw.patient.covariates).events()
              for a, t0, t1, f in ((0.0, 0.0, 28.0, 1.0), (0.0, 28.0, 56.0, 1.0), (84.0, 84.0, 112.0, 0.5))]
    merged = eng.doses(R._regimen_from_events(chunks[0]))
    for ev in chunks[1:]:
        merged = R._merge_doses(merged, eng.doses(R._regimen_from_events(ev)))
        assert merged is not None
    full = eng.doses(R._regimen_from_events(pd.concat(chunks, ignore_index=True)))
    assert sorted(merged) == sorted(full) == sorted(["cyproterone_acetate", "leuprolide"])
    for d in full:
        for a in ("time", "amount", "route", "duration"):
            np.testing.assert_array_equal(getattr(merged[d], a), getattr(full[d], a))
    # a chunk that does not start after its parent is not merged
    assert R._merge_doses(full, eng.doses(R._regimen_from_events(chunks[0]))) is None


@pytest.fixture(scope="module")
def reduced_adt():
    """The ADT library scenario on prior draws of the calibration model (``default_model``:
    the reduced twin of decision D12, effect compartments; what ``twin calibrate`` writes)."""
    import twin
    from calibration.calibrate import default_model

    sc = Scenario.from_toml(library_path("adt_continuous_vs_intermittent_vs_adaptive"))
    patient = twin.datasets.load_patient_example()
    tw = R.prior_twin(patient, default_model(patient).with_drugs(R.scenario_drugs(sc)), 16, seed=3)
    return tw, sc


def test_split_schedule_equals_the_whole_history(reduced_adt, monkeypatch):
    """A policy arm's history scheduled from its parent's propagated PK state plus the
    interval's doses (``_SPLIT_SCHEDULE``) has the boundaries of the whole history's scan and
    its PK states to rounding; the arm's results equal the whole-history run (no carry) to
    1e-9, with the same decisions. The arrays of each history's dose events, built parent +
    interval, equal those of its events table."""
    tw, sc = reduced_adt
    checked = {"split": 0, "arrays": 0}
    orig_split, orig_keep = R._HistoryDoses._split, R._PolicyArm.keep_arrays

    def split(self, key, t0, t1):
        out = orig_split(self, key, t0, t1)
        if out is not None:
            b, w = out
            b2, w2 = self.eng.schedule(None, t0, t1, doses=self(key))
            np.testing.assert_array_equal(b, b2)
            np.testing.assert_allclose(w, w2, rtol=1e-13, atol=1e-300)
            checked["split"] += 1
        return out

    def keep_arrays(self, keys):
        for key in keys:
            mine, ref = self.arrays(key), R._event_arrays(self.events(key))
            assert (mine is None) == (ref is None)
            if ref is not None:
                for x, y in zip(mine, ref):
                    np.testing.assert_array_equal(x, y)
                checked["arrays"] += 1
        return orig_keep(self, keys)

    monkeypatch.setattr(R._HistoryDoses, "_split", split)
    monkeypatch.setattr(R._PolicyArm, "keep_arrays", keep_arrays)
    monkeypatch.setattr(R, "_SPLIT_SCHEDULE", True)
    new, calls = _run(monkeypatch, tw, sc, "compiled", False, horizon=336)
    assert checked["split"] > 20 and checked["arrays"] > 20
    assert max(_histories_per_visit(calls, "adaptive")) >= 2, "the adaptive arm's draws should diverge"
    monkeypatch.setattr(R, "_SPLIT_SCHEDULE", False)
    ref, _ = _run(monkeypatch, tw, sc, "compiled", False, horizon=336)
    assert (ref["status"].values == 0).all()
    _compare(ref, new, rtol=1e-9)
    for v in ("dose_factor", "on_treatment", "cumulative_dose", "treatment_line"):
        np.testing.assert_array_equal(new[v].values, ref[v].values, err_msg=v)


# -- generated source ------------------------------------------------------------------------
def test_tape_eliminates_common_subexpressions_and_exact_identities():
    """The tracer emits each distinct expression once (``exp(-k s)`` shared by several PK terms
    is computed once) and drops the exact IEEE identities x*1, x+0, x-0, x/1, but not 0-x."""
    from twin._codegen import SourceXP, trace

    tape, a = trace({"y": 2})
    xp, y = SourceXP(tape), a["y"]
    e1, e2 = xp.exp(-2.0 * y[0]), xp.exp(-2.0 * y[0])
    assert e1 is e2 and len(tape.lines) == 2  # "-2.0 * y[0]" and "math.exp(v0)"
    assert (y[1] * 1.0) is y[1] and (1.0 * y[1]) is y[1] and (y[1] + 0.0) is y[1] and (0.0 + y[1]) is y[1]
    assert (y[1] - 0.0) is y[1] and (y[1] / 1.0) is y[1]
    assert (0.0 - y[1]) is not y[1] and (1.0 / y[1]) is not y[1]


def test_compiled_vector_field_has_no_repeated_expression(kernel):
    """Every right-hand side of the generated vector field is distinct (no exp computed twice)."""
    _, ct, _, _, _ = kernel
    src = ct.source.split("def rhs_only", 1)[1].split("\n\n", 1)[0]
    exprs = [ln.split(" = ", 1)[1] for ln in src.splitlines() if ln.strip().startswith("v") and " = " in ln]
    assert exprs and len(exprs) == len(set(exprs))


def test_hill_one_inhibition_equals_the_log_sigmoid_form():
    """``pk_inputs`` writes a Hill coefficient of 1 as C / (IC50 + C): equal to
    :func:`twin.pk.hill_inhibition` (the log-sigmoid form) to rounding, 0 at C = 0."""
    from twin._xp import NUMPY
    from twin.compiled import pk_inputs
    from twin.pk import hill_inhibition

    c = {"k": 1, "rates": [0.3], "coef": [1.0], "ka": None}
    layout = [(0, c, (2.5, 1.0, 0.8))]
    conc = np.concatenate([[0.0, 1e-300, 1e-200], np.logspace(-12, 12, 200)])
    w = [conc, np.zeros_like(conc), np.zeros_like(conc)]
    got = pk_inputs(layout)(np.zeros_like(conc), w, NUMPY)[0]
    want = hill_inhibition(conc, 2.5, 1.0, 0.8)
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-300)
    assert got[0] == 0.0 and got[-1] == pytest.approx(0.8, rel=1e-11)
