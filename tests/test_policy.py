"""Adaptive policies: hand-computed traces, per-draw independence, the rule language."""

from __future__ import annotations

import numpy as np
import pytest

from scenarios.policy import (
    HOLD,
    TREAT,
    Bruchovsky,
    Continuous,
    DoseSkipping,
    Limited,
    PolicyState,
    RuleError,
    RulePolicy,
    Zhang,
    make_policy,
    parse_duration,
)
from scenarios.protocol import Protocol
from scenarios.scenario import policy_doses
from twin.errors import InputError


def run(policy, times, series, delivered=None):
    """Decisions (visits x draws) of ``policy`` on ``series``: name -> (visits x draws) values."""
    n = np.asarray(next(iter(series.values()))).shape[1]
    state = policy.initial_state(n)
    out = []
    for k, t in enumerate(times):
        obs = {name: np.asarray(v, float)[k] for name, v in series.items()}
        dl = None if delivered is None else {d: np.asarray(v, float)[k] for d, v in delivered.items()}
        f, state = policy.decide(state, t, obs, delivered=dl)
        out.append(f)
    return np.array(out), state


def col(x):
    return np.asarray(x, float)[:, None]


# -- Zhang ---------------------------------------------------------------------------------
def test_zhang_hand_trace():
    # baseline 10: stop below 5, restart at >= 10
    psa = [10, 6, 4, 8, 10.5, 7, 4.9, 9.99, 10]
    expected = [1, 1, 0, 0, 1, 1, 0, 0, 1]
    times = np.arange(len(psa)) * 28.0
    f, st = run(Zhang(), times, {"psa": col(psa)})
    assert f[:, 0].tolist() == expected
    # bookkeeping: 5 intervals on out of 8 -> 5 * 28 days on treatment; last switch at day 224
    assert st.time_on_treatment[0] == pytest.approx(4 * 28)  # on during [0,56), [112,168)
    assert st.phase_start[0] == 224.0
    assert st.switches[0] == 4
    assert st.baseline["psa"][0] == 10 and st.nadir["psa"][0] == 4
    assert st.previous["psa"][0] == 10


def test_zhang_thresholds_are_configurable():
    psa = [10, 7, 6.9, 8, 9]
    f, _ = run(Zhang(stop_fraction=0.7, restart_fraction=0.8), np.arange(5) * 28.0, {"psa": col(psa)})
    assert f[:, 0].tolist() == [1, 1, 0, 1, 1]


# -- Bruchovsky ----------------------------------------------------------------------------
def test_bruchovsky_hand_trace_two_draws():
    times = np.arange(18) * 28.0  # 0 .. 476
    # draw 0: low from day 84 on; 36 weeks reached at day 252 -> stop there;
    #         off: restart when > 10 (10 is not enough) at day 364; then treat >= 36 weeks again.
    a = [20, 10, 5, 3.9, 3, 2.5, 2, 1.5, 1, 0.8, 3, 6, 10, 10.5, 3.9, 3, 2, 1]
    # draw 1: at day 252 PSA is 5 (not low): the two consecutive low visits are 280 and 308.
    b = [20, 10, 5, 5, 5, 5, 5, 5, 3, 5, 3, 2, 4, 12, 2, 2, 2, 2]
    f, st = run(Bruchovsky(), times, {"psa": np.array([a, b]).T})
    assert f[:, 0].tolist() == [1] * 9 + [0] * 4 + [1] * 5
    assert f[:, 1].tolist() == [1] * 11 + [0, 0] + [1] * 5
    assert st.phase_start.tolist() == [364.0, 364.0]


def test_bruchovsky_single_value_and_units():
    p = Bruchovsky(min_on_days="8 weeks", stop_below="4 ug/L", consecutive=1, restart_above=10)
    assert (p.min_on_days, p.stop_below) == (56.0, pytest.approx(4.0))
    f, _ = run(p, np.arange(5) * 28.0, {"psa": col([8, 3, 3, 11, 12])})
    assert f[:, 0].tolist() == [1, 1, 0, 1, 1]


# -- dose skipping -------------------------------------------------------------------------
def test_dose_skipping_trace():
    vol = col([200, 150, 90, 80, 120, 95, 140])
    f, _ = run(DoseSkipping(below="0.1 cm3"), np.arange(7) * 7.0, {"tumor_volume": vol})
    assert f[:, 0].tolist() == [1, 1, 0, 0, 1, 0, 1]
    f, _ = run(DoseSkipping(below=100, resume_at=130), np.arange(7) * 7.0, {"tumor_volume": vol})
    assert f[:, 0].tolist() == [1, 1, 0, 0, 0, 0, 1]


# -- limits --------------------------------------------------------------------------------
def test_limit_max_cumulative_dose():
    p = Limited(Continuous(), max_cumulative_dose={"taxotere": "100 mg"})  # synonym -> docetaxel
    delivered = {"docetaxel": col([0, 40, 40, 40, 0])}
    f, st = run(p, np.arange(5) * 21.0, {"psa": col([1] * 5)}, delivered)
    assert f[:, 0].tolist() == [1, 1, 1, 0, 0]
    assert st.cumulative_dose["docetaxel"][0] == 120
    assert p.allowance(st)["docetaxel"][0] == 0
    st2 = p.initial_state(1)
    _, st2 = p.decide(st2, 0, {}, delivered={"docetaxel": 30})
    assert p.allowance(st2)["docetaxel"][0] == 70


def test_limit_max_duration():
    p = Continuous().with_limits(max_duration="50 days")
    f, st = run(p, np.arange(6) * 21.0, {"psa": col([1] * 6)})
    assert f[:, 0].tolist() == [1, 1, 1, 0, 0, 0]
    assert st.time_on_treatment[0] == 63


def test_limit_min_holiday_defers_restart():
    p = Limited(Zhang(), min_holiday=60)
    # Zhang alone: hold at 28, restart at 56; the 60-day holiday defers the restart to day 112
    psa = col([10, 4, 11, 12, 12, 3])
    assert run(Zhang(), np.arange(6) * 28.0, {"psa": psa})[0][:, 0].tolist() == [1, 0, 1, 1, 1, 0]
    f, _ = run(p, np.arange(6) * 28.0, {"psa": psa})
    assert f[:, 0].tolist() == [1, 0, 0, 0, 1, 0]


# -- per-draw independence, purity -----------------------------------------------------------
def test_draws_follow_their_own_paths():
    rng = np.random.default_rng(3)
    times = np.arange(20) * 28.0
    psa = np.exp(np.cumsum(rng.normal(0, 0.4, size=(20, 6)), axis=0)) * 10
    for policy in (Zhang(), Bruchovsky(min_on_days=56), DoseSkipping("psa", below=8)):
        batched, _ = run(policy, times, {"psa": psa})
        alone = np.column_stack([run(policy, times, {"psa": psa[:, [j]]})[0][:, 0] for j in range(6)])
        np.testing.assert_array_equal(batched, alone)
    f, _ = run(Zhang(), times[:4], {"psa": np.array([[10, 10], [4, 9], [3, 8], [6, 12]])})
    assert f[:, 0].tolist() != f[:, 1].tolist()


def test_decide_is_pure():
    p = Zhang()
    s0 = p.initial_state(2)
    obs = {"psa": np.array([10.0, 10.0])}
    f1, s1 = p.decide(s0, 0, obs)
    f1[:] = -1
    obs["psa"][:] = 0
    f2, s2 = p.decide(s1, 28, {"psa": [4.0, 8.0]})
    assert f2.tolist() == [0, 1] and s1.visits == 1 and s0.visits == 0
    assert s1.baseline["psa"].tolist() == [10, 10]
    # the same state decides the same way twice
    f3, _ = p.decide(s1, 28, {"psa": [4.0, 8.0]})
    assert f3.tolist() == f2.tolist()


def test_decide_errors():
    p = Zhang()
    s = p.initial_state(2)
    with pytest.raises(InputError, match="needs observable"):
        p.decide(s, 0, {"sld": [1, 2]})
    with pytest.raises(InputError, match=r"shape \(2,\)"):
        p.decide(s, 0, {"psa": [1, 2, 3]})
    _, s = p.decide(s, 0, {"psa": [1, 2]})
    with pytest.raises(InputError, match="must increase"):
        p.decide(s, 0, {"psa": [1, 2]})
    with pytest.raises(InputError, match="n_draws"):
        PolicyState(0)


# -- the rule language ---------------------------------------------------------------------
ZHANG_RULE = "treat when psa >= 1.0 * baseline; hold when psa < 0.5 * baseline"


@pytest.mark.parametrize(
    "rule",
    [
        ZHANG_RULE,
        "hold when psa < 50% of baseline\ntreat when psa >= baseline",
        "treat when psa >= 1 x baseline ; hold when psa < 0.5 baseline ;",
    ],
)
def test_rule_matches_builtin_zhang(rule):
    rng = np.random.default_rng(11)
    times = np.arange(40) * 28.0
    psa = np.exp(np.cumsum(rng.normal(0, 0.35, size=(40, 64)), axis=0)) * 10
    builtin, _ = run(Zhang(), times, {"psa": psa})
    written, _ = run(RulePolicy(rule), times, {"psa": psa})
    np.testing.assert_array_equal(builtin, written)
    assert 0 < builtin.mean() < 1  # both actions occur


def test_rule_as_bruchovsky_without_confirmation():
    rule = "hold when psa < 4 ng/mL and phase_time >= 36 weeks; treat when psa > 10 ng/mL"
    times = np.arange(18) * 28.0
    rng = np.random.default_rng(5)
    psa = np.exp(np.cumsum(rng.normal(0, 0.5, size=(18, 32)), axis=0)) * 8
    a, _ = run(RulePolicy(rule), times, {"psa": psa})
    b, _ = run(Bruchovsky(consecutive=1), times, {"psa": psa})
    np.testing.assert_array_equal(a, b)


def test_rule_semantics():
    p = RulePolicy("treat at 50% when sld < 0.7 * baseline; hold when sld < 10 mm or sld > 1.2 * nadir and ctdna > 1 copies/mL")
    assert p.observables == ("ctdna", "sld")
    times = [0, 56, 112, 168]
    f, _ = run(p, times, {"sld": col([50, 30, 45, 9]), "ctdna": col([5, 5, 5, 0])})
    # 0: nothing holds -> initial treat; 56: 30 < 35 -> 0.5; 112: 45 > 1.2 * 30 and ctdna > 1 -> hold;
    # 168: 9 < 35 -> 0.5 (first clause wins)
    assert f[:, 0].tolist() == [1, 0.5, 0, 0.5]
    # NaN: no clause holds, the draw keeps its action
    p = RulePolicy("hold when psa < 5 ng/mL", initial="treat")
    f, _ = run(p, [0, 28, 56], {"psa": col([10, np.nan, 4])})
    assert f[:, 0].tolist() == [1, 1, 0]
    assert RulePolicy("hold when psa < 4 ug/L").clauses == RulePolicy("hold when psa < 4 ng/mL").clauses
    assert RulePolicy("hold when tumor_volume < 1 cm3").clauses[0].cond.number == pytest.approx(1000)
    assert RulePolicy("hold when resistant_fraction > 0.5").observables == ("resistant_fraction",)
    f, _ = run(RulePolicy("treat when time >= 50 days; hold when treatment_time >= 2 weeks"), [0, 14, 28, 56],
               {"psa": col([1, 1, 1, 1])})
    assert f[:, 0].tolist() == [1, 0, 0, 1]


@pytest.mark.parametrize(
    "rule, where, words",
    [
        ("treat whenn psa > 1 ng/mL", (1, 7), ["unexpected 'whenn'", "'when'"]),
        ("hold when pas < 4 ng/mL", (1, 11), ["unknown observable 'pas'", "Did you mean 'psa'"]),
        ("hold when psa < 4", (1, 17), ["has no unit", "ng/mL"]),
        ("hold when psa < 4 mm", (1, 19), ["does not fit psa"]),
        ("hold when psa < 0.5 * baseline;\ntreat psa > 1 ng/mL", (2, 7), ["unexpected 'psa'", "'when'"]),
        ("hold when psa <", (1, 16), ["ends too early"]),
        ("stop when psa < 4 ng/mL", (1, 1), ["unexpected 'stop'", "'treat' or 'hold'"]),
        ("hold when phase_time > 4", (1, 24), ["is a time"]),
        ("hold at 50% when psa < 4 ng/mL", (1, 9), ["'hold' takes no dose level"]),
        ("hold when (psa < 4 ng/mL", (1, 25), ["')'"]),
    ],
)
def test_rule_errors_are_located(rule, where, words):
    with pytest.raises(RuleError) as e:
        RulePolicy(rule)
    assert (e.value.line, e.value.column) == where
    msg = str(e.value)
    for w in words:
        assert w in msg
    assert "Valid examples:" in msg and ZHANG_RULE in msg


def test_rule_examples_parse():
    from scenarios.policy import RULE_EXAMPLES

    for text in RULE_EXAMPLES:
        RulePolicy(text)


# -- construction by name ------------------------------------------------------------------
def test_make_policy():
    assert make_policy("zhang") == Zhang()
    assert make_policy("IAD") == Bruchovsky()
    assert make_policy({"name": "zhang", "stop_fraction": 0.4}) == Zhang(stop_fraction=0.4)
    assert isinstance(make_policy({"rule": ZHANG_RULE}), RulePolicy)
    lim = make_policy("continuous", limits={"max_duration": "1 year"})
    assert isinstance(lim, Limited) and lim.max_duration == 365.25
    with pytest.raises(InputError, match="Did you mean 'zhang'"):
        make_policy("zang")
    with pytest.raises(InputError, match="Did you mean 'stop_fraction'"):
        make_policy({"name": "zhang", "stop_fractoin": 0.4})
    with pytest.raises(InputError, match="looks like a rule"):
        make_policy("hold when psa < 4 ng/mL")
    with pytest.raises(InputError, match="Did you mean 'min_holiday'"):
        make_policy("zhang", limits={"min_holliday": 28})
    with pytest.raises(InputError, match="unknown drug"):
        Limited(Zhang(), max_cumulative_dose={"docetaxl": 100})
    with pytest.raises(InputError, match="must be below"):
        Zhang(stop_fraction=1.0, restart_fraction=0.5)


def test_parse_duration():
    assert parse_duration("36 weeks", "x") == 252
    assert parse_duration("2 years", "x") == 730.5
    assert parse_duration(10, "x") == 10
    with pytest.raises(InputError, match="months differ"):
        parse_duration("6 months", "x")
    with pytest.raises(InputError, match="not a duration"):
        parse_duration("soon", "x")


# -- doses of a policy arm -------------------------------------------------------------------
def test_policy_doses_restart_at_anchor_and_scale():
    treat = Protocol.parse("leuprolide 7.5 mg im every 4 weeks")
    r = policy_doses(treat, anchor=100, start=128, stop=184, factor=0.5).events()
    assert r["time"].tolist() == [128.0, 156.0] and r["amount"].tolist() == [3.75, 3.75]
    assert len(policy_doses(treat, anchor=0, start=0, stop=28, factor=HOLD)) == 0
    assert policy_doses(treat, anchor=0, start=0, stop=28, factor=TREAT).events()["time"].tolist() == [0.0]
