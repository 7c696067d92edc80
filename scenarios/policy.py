"""Adaptive treatment policies: decisions at visit times from the simulated observables.

A policy is a pure, vectorised decision engine. At each visit the scenario runner gives it
the observables simulated for every posterior draw, and the policy answers, per draw, with
a *dose factor* (``1.0`` = treat at the full dose, ``0.0`` = hold, ``0.5`` = half dose) and
a new :class:`PolicyState`::

    state = policy.initial_state(n_draws)
    for t in visit_times:
        factors, state = policy.decide(state, t, {"psa": psa_at_t}, delivered={"leuprolide": mg})
        # the runner gives each draw its own treatment from t to the next visit

Each draw follows its own path: nothing is pooled across draws. ``decide`` never mutates
its inputs. The built-in policies:

- :class:`Continuous` -- always treat (a baseline, and the host of :class:`Limited`);
- :class:`Zhang` -- adaptive therapy: treat until the observable falls below
  ``stop_fraction`` x baseline, hold until it is back at ``restart_fraction`` x baseline
  (Zhang et al. 2017, Nat Commun 8:1816);
- :class:`Bruchovsky` -- intermittent androgen deprivation: treat for at least 36 weeks and
  stop when PSA < 4 ng/mL on 2 consecutive visits; restart when PSA > 10 ng/mL
  (Bruchovsky et al. 2006, Cancer 107:389-395);
- :class:`DoseSkipping` -- skip doses while an observable is below a threshold;
- :class:`Limited` -- wraps any policy with a maximum cumulative dose per drug, a minimum
  treatment holiday and a maximum treatment duration;
- :class:`RulePolicy` -- user-written rules, parsed with lark (no ``eval``):
  ``"treat when psa >= 1.0 * baseline; hold when psa < 0.5 * baseline"``.

See ``docs/how-to/write-a-scenario.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

from twin.errors import InputError, close_matches

__all__ = [
    "TREAT",
    "HOLD",
    "PolicyState",
    "Policy",
    "Continuous",
    "Zhang",
    "Bruchovsky",
    "DoseSkipping",
    "Limited",
    "RulePolicy",
    "RuleError",
    "POLICIES",
    "RULE_EXAMPLES",
    "RULE_OBSERVABLES",
    "make_policy",
    "parse_duration",
]

#: Dose factor meaning "treat at the full dose".
TREAT = 1.0
#: Dose factor meaning "hold (no dose)".
HOLD = 0.0

#: Observables a rule may compare, with their canonical units (what the runner passes).
RULE_OBSERVABLES: dict[str, str] = {
    "psa": "ng/mL",
    "tumor_volume": "mm3",
    "sld": "mm",
    "ctdna": "copies/mL",
    "resistant_fraction": "1",
}
#: Times a rule may compare (days, computed by the policy itself).
RULE_TIMES: dict[str, str] = {
    "time": "days since the first visit",
    "phase_time": "days since the last switch between treat and hold",
    "treatment_time": "cumulative days on treatment",
}
_OBS_ALIASES = {"tumour_volume": "tumor_volume", "volume": "tumor_volume"}

#: Valid rule texts, shown at the end of every rule parse error (and in the docs).
RULE_EXAMPLES = (
    "treat when psa >= 1.0 * baseline; hold when psa < 0.5 * baseline",
    "hold when psa < 4 ng/mL and phase_time >= 36 weeks; treat when psa > 10 ng/mL",
    "hold when tumor_volume < 100 mm3; treat when tumor_volume >= 100 mm3",
    "treat at 50% when sld < 0.7 * baseline; treat when sld >= 1.2 * nadir",
    "hold when resistant_fraction > 0.5 or ctdna < 10 copies/mL",
)

_EPS = 1e-9


# -- durations --------------------------------------------------------------------------------
_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*([A-Za-z]+)\s*")


def parse_duration(value: Any, what: str) -> float:
    """A duration as days: a number (days) or text ("36 weeks", "10 days", "2 years").

    A year is 365.25 days (the Julian year); months are refused (they differ in length).
    Raises :class:`twin.errors.InputError` naming ``what``.
    """
    if isinstance(value, bool) or value is None:
        raise InputError(f"{what} = {value!r}: expected a duration such as '36 weeks', '10 days', '2 years' or a number of days")
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
    elif isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if not m:
            raise InputError(
                f"{what} = {value!r} is not a duration; write e.g. '36 weeks', '10 days', '2 years' or a number of days"
            )
        v, unit = float(m.group(1)), m.group(2).lower()
        if unit in ("d", "day", "days"):
            pass
        elif unit in ("w", "wk", "wks", "week", "weeks"):
            v *= 7.0
        elif unit in ("y", "yr", "yrs", "year", "years"):
            v *= 365.25
        elif unit.startswith("mon"):
            raise InputError(f"{what} = {value!r}: months differ in length; write weeks, days or years (e.g. '26 weeks')")
        else:
            raise InputError(
                f"{what} = {value!r}: unknown time unit {m.group(2)!r}; expected days, weeks or years."
                + close_matches(unit, ["days", "weeks", "years"])
            )
    else:
        raise InputError(f"{what} = {value!r} ({type(value).__name__}) is not a duration; write e.g. '36 weeks' or a number of days")
    if not (math.isfinite(v) and v >= 0):
        raise InputError(f"{what} = {value!r} must be a finite duration >= 0 days")
    return v


def _tidy(x: float) -> float:
    """A converted value without unit-conversion round-off (4 ug/L -> 4.0, not 3.9999999999999996)."""
    return float(f"{x:.12g}")


def _quantity(value: Any, observable: str, what: str) -> float:
    """A threshold of ``observable`` in its canonical unit: a number (canonical) or '4 ng/mL'."""
    unit = RULE_OBSERVABLES[observable]
    if isinstance(value, bool) or value is None:
        raise InputError(f"{what} = {value!r}: expected a number or a quantity such as '4 {unit}'")
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
    elif isinstance(value, str):
        from twin.units import UnitError, parse_quantity

        try:
            v = _tidy(parse_quantity(value, unit))
        except UnitError as e:
            raise InputError(f"{what} = {value!r}: {e} ({observable} is in {unit})") from None
    else:
        raise InputError(f"{what} = {value!r} ({type(value).__name__}): expected a number or a quantity such as '4 {unit}'")
    if not math.isfinite(v):
        raise InputError(f"{what} = {value!r} must be finite")
    return v


def _observable(name: Any, what: str) -> str:
    n = str(name).strip().lower()
    n = _OBS_ALIASES.get(n, n)
    if n not in RULE_OBSERVABLES:
        raise InputError(
            f"{what} = {name!r}: unknown observable; expected one of {list(RULE_OBSERVABLES)}."
            + close_matches(n, RULE_OBSERVABLES)
        )
    return n


def _positive(value: Any, what: str, *, integer: bool = False, upper: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{what} = {value!r}: expected a {'whole ' if integer else ''}number")
    v = float(value)
    if not (math.isfinite(v) and v > 0) or (integer and v != int(v)) or (upper is not None and v > upper):
        bound = f" and <= {upper:g}" if upper is not None else ""
        raise InputError(f"{what} = {value!r} must be a positive {'whole ' if integer else ''}number{bound}")
    return v


# -- the state --------------------------------------------------------------------------------
def _frozen(d: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True, eq=False)
class PolicyState:
    """What a policy remembers, per draw (every array has shape ``(n_draws,)``).

    Attributes
    ----------
    n_draws : number of draws.
    visits : number of decisions made so far.
    first_time, last_time : time [day] of the first and of the latest decision (NaN before any).
    factor : the dose factor in force since the latest decision (0 before any).
    baseline : observable -> value at the first visit where it was observed.
    nadir : observable -> smallest value over the visits *before* the current one
        (during a decision; the baseline at the first visit) and up to the latest one after it.
    previous : observable -> value at the latest visit.
    time_on_treatment : cumulative days with a factor > 0, up to the latest visit.
    phase_start : time [day] of the latest switch between treat (factor > 0) and hold;
        the first visit counts as a switch.
    switches : number of switches between treat and hold (the first visit not counted).
    cumulative_dose : drug -> mg delivered so far (from ``delivered=`` at each decision).
    memory : policy-specific per-draw counters (e.g. Bruchovsky's consecutive low visits).
    """

    n_draws: int
    visits: int = 0
    first_time: float = float("nan")
    last_time: float = float("nan")
    factor: np.ndarray | None = None
    baseline: Mapping[str, np.ndarray] = field(default_factory=dict)
    nadir: Mapping[str, np.ndarray] = field(default_factory=dict)
    previous: Mapping[str, np.ndarray] = field(default_factory=dict)
    time_on_treatment: np.ndarray | None = None
    phase_start: np.ndarray | None = None
    switches: np.ndarray | None = None
    cumulative_dose: Mapping[str, np.ndarray] = field(default_factory=dict)
    memory: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        n = self.n_draws
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"PolicyState(n_draws={n!r}): expected a whole number of draws >= 1")
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        s("n_draws", int(n))
        if self.factor is None:
            s("factor", np.zeros(n))
        if self.time_on_treatment is None:
            s("time_on_treatment", np.zeros(n))
        if self.phase_start is None:
            s("phase_start", np.full(n, np.nan))
        if self.switches is None:
            s("switches", np.zeros(n, dtype=np.int64))
        for k in ("baseline", "nadir", "previous", "cumulative_dose", "memory"):
            s(k, _frozen(getattr(self, k)))

    @property
    def on(self) -> np.ndarray:
        """Bool per draw: treating (factor > 0) since the latest decision."""
        return self.factor > 0

    def replace(self, **kw) -> "PolicyState":
        return dataclasses.replace(self, **kw)


def _as_draws(value: Any, n: int, what: str) -> np.ndarray:
    a = np.asarray(value, dtype=float)
    if a.ndim == 0:
        return np.full(n, float(a))
    if a.shape != (n,):
        raise InputError(f"{what}: expected one value per draw, shape ({n},), received shape {a.shape}")
    return a.copy()


def _advance(state: PolicyState, t: float, observed: Mapping[str, np.ndarray],
             delivered: Mapping[str, Any] | None) -> PolicyState:
    """Bookkeeping before a decision at ``t``: accrue time and dose, set baselines."""
    n = state.n_draws
    if state.visits == 0:
        first, tot, phase_start = t, state.time_on_treatment, np.full(n, t)
    else:
        if not t > state.last_time:
            raise InputError(f"visit time {t:g} is not after the previous visit {state.last_time:g}; visit times must increase")
        first, phase_start = state.first_time, state.phase_start
        tot = state.time_on_treatment + (t - state.last_time) * state.on
    baseline, nadir = dict(state.baseline), dict(state.nadir)
    for k, v in observed.items():
        if k not in baseline:
            baseline[k] = v.copy()
            nadir[k] = v.copy()
    cum = dict(state.cumulative_dose)
    for drug, mg in (delivered or {}).items():
        cum[str(drug)] = cum.get(str(drug), np.zeros(n)) + _as_draws(mg, n, f"delivered[{drug!r}]")
    return state.replace(first_time=first, time_on_treatment=tot, phase_start=phase_start,
                         baseline=baseline, nadir=nadir, cumulative_dose=cum)


def _commit(state: PolicyState, t: float, factor: np.ndarray, observed: Mapping[str, np.ndarray],
            memory: Mapping[str, np.ndarray]) -> PolicyState:
    """Bookkeeping after a decision: record the factor, switches, nadir, previous values."""
    on_new = factor > 0
    if state.visits == 0:
        switched = np.zeros(state.n_draws, bool)
        phase_start = np.full(state.n_draws, t)
    else:
        switched = on_new != state.on
        phase_start = np.where(switched, t, state.phase_start)
    nadir = dict(state.nadir)
    for k, v in observed.items():
        nadir[k] = np.fmin(nadir[k], v)
    mem = dict(state.memory)
    mem.update(memory)
    return state.replace(
        visits=state.visits + 1, last_time=t, factor=factor.copy(), phase_start=phase_start,
        switches=state.switches + switched, nadir=nadir, previous={k: v.copy() for k, v in observed.items()},
        memory=mem,
    )


# -- the policies -------------------------------------------------------------------------------
class Policy:
    """Base class: subclasses define ``observables`` and ``_rule``; ``decide`` does the rest."""

    #: observables the policy reads at each visit (the runner must pass them).
    observables: tuple[str, ...] = ()
    #: short name (as in scenario files).
    name: str = "policy"

    def initial_state(self, n_draws: int) -> PolicyState:
        """The state before the first visit."""
        return PolicyState(n_draws)

    def decide(self, state: PolicyState, visit_time: float, observed: Mapping[str, Any], *,
               delivered: Mapping[str, Any] | None = None) -> tuple[np.ndarray, PolicyState]:
        """The dose factor per draw from ``visit_time`` to the next visit, and the new state.

        Parameters
        ----------
        state : from :meth:`initial_state` or the previous call.
        visit_time : [day], strictly increasing from call to call.
        observed : observable name -> value per draw (shape ``(n_draws,)``, or a scalar), in
            canonical units (psa ng/mL, tumor_volume mm3, sld mm, ctdna copies/mL,
            resistant_fraction 1). Extra names are allowed; the ones in ``observables`` are
            required. A NaN makes every comparison on it false (the draw keeps its action).
        delivered : drug -> mg delivered since the previous visit (per draw or scalar); only
            :class:`Limited` uses it (maximum cumulative dose), others just record it.
        """
        if not isinstance(state, PolicyState):
            raise InputError(f"state = {state!r}: expected a PolicyState (from policy.initial_state(n_draws))")
        t = float(visit_time)
        if not math.isfinite(t):
            raise InputError(f"visit_time = {visit_time!r} must be a finite number of days")
        missing = [k for k in self.observables if k not in observed]
        if missing:
            raise InputError(
                f"policy {self.name!r} needs observable(s) {missing} at each visit; received {sorted(observed)}"
            )
        obs = {str(k): _as_draws(v, state.n_draws, f"observed[{k!r}]") for k, v in observed.items()}
        st = _advance(state, t, obs, delivered)
        factor, memory = self._rule(st, t, obs)
        factor = np.asarray(factor, dtype=float)
        return factor.copy(), _commit(st, t, factor, obs, memory)

    def _rule(self, s: PolicyState, t: float, obs: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
        raise NotImplementedError  # pragma: no cover

    def _on_before(self, s: PolicyState) -> np.ndarray:
        """Treating before this visit (at the first visit: True, treatment starts on)."""
        return np.ones(s.n_draws, bool) if s.visits == 0 else s.on

    def with_limits(self, **limits) -> "Limited":
        """This policy wrapped in :class:`Limited` (keywords of :class:`Limited`)."""
        return Limited(self, **limits)


@dataclass(frozen=True)
class Continuous(Policy):
    """Always treat (dose factor 1 at every visit)."""

    name = "continuous"

    def _rule(self, s, t, obs):
        return np.full(s.n_draws, TREAT), {}


@dataclass(frozen=True)
class Zhang(Policy):
    """Adaptive therapy after Zhang et al. 2017 (Nat Commun 8:1816).

    "Treat until PSA < 50% of baseline, hold until PSA >= baseline": the baseline is the
    value at the first visit; treatment is on at the first visit; while treating, stop at a
    visit where ``value < stop_fraction * baseline``; while holding, restart at a visit where
    ``value >= restart_fraction * baseline``. (In the trial the rule governed abiraterone
    given on top of continuous ADT; in a scenario file put the continuous drug in
    ``background``.)
    """

    observable: str = "psa"
    stop_fraction: float = 0.5
    restart_fraction: float = 1.0
    name = "zhang"

    def __post_init__(self):
        object.__setattr__(self, "observable", _observable(self.observable, "Zhang.observable"))
        object.__setattr__(self, "stop_fraction", _positive(self.stop_fraction, "Zhang.stop_fraction"))
        object.__setattr__(self, "restart_fraction", _positive(self.restart_fraction, "Zhang.restart_fraction"))
        if not self.stop_fraction < self.restart_fraction:
            raise InputError(
                f"Zhang: stop_fraction = {self.stop_fraction:g} must be below restart_fraction = "
                f"{self.restart_fraction:g} (e.g. 0.5 and 1.0)"
            )

    @property
    def observables(self):
        return (self.observable,)

    def _rule(self, s, t, obs):
        x, b = obs[self.observable], s.baseline[self.observable]
        on = self._on_before(s)
        stop = on & (x < self.stop_fraction * b)
        start = ~on & (x >= self.restart_fraction * b)
        return np.where((on & ~stop) | start, TREAT, HOLD), {}


@dataclass(frozen=True)
class Bruchovsky(Policy):
    """Intermittent androgen deprivation after Bruchovsky et al. 2006 (Cancer 107:389-395).

    The rule implemented, evaluated at each visit, per draw (treatment is on at the first visit):

    * while treating: count the consecutive visits (within this treatment period) with
      ``psa < stop_below`` (4 ng/mL); stop when the period has lasted at least
      ``min_on_days`` (36 weeks = 252 days, counted from the visit where it started) and the
      count has reached ``consecutive`` (2);
    * while holding: restart at a visit with ``psa > restart_above`` (10 ng/mL).

    In the trial each cycle was 36 weeks of cyproterone acetate (a 4-week lead-in, then with
    leuprolide); treatment was interrupted when PSA had fallen below 4 ug/L and resumed when
    it rose above 10 ug/L. The "two consecutive visits" confirmation is this module's
    operationalisation (set ``consecutive=1`` for a single value).
    """

    observable: str = "psa"
    min_on_days: float | str = 252.0
    stop_below: float | str = 4.0
    consecutive: int = 2
    restart_above: float | str = 10.0
    name = "bruchovsky"

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        s("observable", _observable(self.observable, "Bruchovsky.observable"))
        s("min_on_days", parse_duration(self.min_on_days, "Bruchovsky.min_on_days"))
        s("stop_below", _quantity(self.stop_below, self.observable, "Bruchovsky.stop_below"))
        s("restart_above", _quantity(self.restart_above, self.observable, "Bruchovsky.restart_above"))
        s("consecutive", int(_positive(self.consecutive, "Bruchovsky.consecutive", integer=True)))
        if not self.stop_below < self.restart_above:
            raise InputError(
                f"Bruchovsky: stop_below = {self.stop_below:g} must be below restart_above = {self.restart_above:g}"
            )

    @property
    def observables(self):
        return (self.observable,)

    def _rule(self, s, t, obs):
        x = obs[self.observable]
        on = self._on_before(s)
        low = s.memory.get("low_visits", np.zeros(s.n_draws, np.int64))
        low = np.where(on & (x < self.stop_below), low + 1, 0)
        stop = on & (t - s.phase_start >= self.min_on_days - _EPS) & (low >= self.consecutive)
        start = ~on & (x > self.restart_above)
        new_on = (on & ~stop) | start
        low = np.where(new_on & on, low, 0)
        return np.where(new_on, TREAT, HOLD), {"low_visits": low}


@dataclass(frozen=True)
class DoseSkipping(Policy):
    """Skip doses while ``observable < below`` (e.g. tumour volume under 100 mm3).

    Hold at a visit where the value is below ``below``; treat otherwise. With ``resume_at``
    (>= ``below``), a draw that is holding restarts only when the value reaches ``resume_at``
    (hysteresis); without it the same threshold decides both ways.
    """

    observable: str = "tumor_volume"
    below: float | str = 100.0
    resume_at: float | str | None = None
    name = "skip"

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        s("observable", _observable(self.observable, "DoseSkipping.observable"))
        s("below", _quantity(self.below, self.observable, "DoseSkipping.below"))
        if self.resume_at is not None:
            s("resume_at", _quantity(self.resume_at, self.observable, "DoseSkipping.resume_at"))
            if self.resume_at < self.below:
                raise InputError(f"DoseSkipping: resume_at = {self.resume_at:g} must be >= below = {self.below:g}")

    @property
    def observables(self):
        return (self.observable,)

    def _rule(self, s, t, obs):
        x = obs[self.observable]
        hold = x < self.below
        if self.resume_at is not None:
            on = self._on_before(s)
            hold = hold | (~on & ~(x >= self.resume_at))
        return np.where(hold, HOLD, TREAT), {}


@dataclass(frozen=True)
class Limited(Policy):
    """Limits around any policy, checked at each visit, per draw.

    Parameters
    ----------
    policy : the policy to wrap.
    max_cumulative_dose : drug -> mg (number, or text "1000 mg", "1 g"): hold from the first
        visit at which the mg delivered so far (``decide(..., delivered=...)``) has reached it.
    min_holiday : days (or text "4 weeks"): a treatment holiday, once begun, lasts at least
        this long (the wrapped policy's restart is deferred).
    max_duration : days (or text "1 year"): hold from the first visit at which the cumulative
        time on treatment has reached it.

    Limits are assessed at visits; between visits the runner gives what was decided, so a
    limit may be overshot by up to one visit interval unless the runner caps the doses with
    :meth:`allowance`.
    """

    policy: Policy
    max_cumulative_dose: Mapping[str, float | str] = field(default_factory=dict)
    min_holiday: float | str | None = None
    max_duration: float | str | None = None
    name = "limited"

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if not isinstance(self.policy, Policy):
            raise InputError(f"Limited(policy={self.policy!r}): expected a Policy (Zhang(), Bruchovsky(), ...)")
        if not isinstance(self.max_cumulative_dose, Mapping):
            raise InputError(
                f"Limited.max_cumulative_dose = {self.max_cumulative_dose!r}: expected drug -> mg, e.g. {{'docetaxel': '1000 mg'}}"
            )
        caps = {}
        for drug, mg in self.max_cumulative_dose.items():
            caps[_drug_name(drug)] = _mass_mg(mg, f"max_cumulative_dose[{drug!r}]")
        s("max_cumulative_dose", MappingProxyType(caps))
        if self.min_holiday is not None:
            s("min_holiday", parse_duration(self.min_holiday, "min_holiday"))
        if self.max_duration is not None:
            s("max_duration", parse_duration(self.max_duration, "max_duration"))
            if self.max_duration <= 0:
                raise InputError("max_duration must be positive")

    @property
    def observables(self):
        return self.policy.observables

    def _rule(self, s, t, obs):
        factor, memory = self.policy._rule(s, t, obs)
        blocked = np.zeros(s.n_draws, bool)
        for drug, cap in self.max_cumulative_dose.items():
            blocked |= s.cumulative_dose.get(drug, np.zeros(s.n_draws)) >= cap - _EPS
        if self.max_duration is not None:
            blocked |= s.time_on_treatment >= self.max_duration - _EPS
        if self.min_holiday is not None and s.visits > 0:
            blocked |= ~s.on & (t - s.phase_start < self.min_holiday - _EPS)
        return np.where(blocked, HOLD, factor), memory

    def allowance(self, state: PolicyState) -> dict[str, np.ndarray]:
        """What is left per draw: drug -> mg below its cap, and ``"days"`` of treatment time."""
        out = {d: np.maximum(cap - state.cumulative_dose.get(d, np.zeros(state.n_draws)), 0.0)
               for d, cap in self.max_cumulative_dose.items()}
        if self.max_duration is not None:
            out["days"] = np.maximum(self.max_duration - state.time_on_treatment, 0.0)
        return out


def _drug_name(name: Any) -> str:
    from twin.drugs import known_drug_names, lookup_drug

    d = lookup_drug(str(name))
    if d is None:
        raise InputError(f"unknown drug {name!r}.{close_matches(str(name), known_drug_names())}")
    return d.name


def _mass_mg(value: Any, what: str) -> float:
    if isinstance(value, str):
        from twin.units import UnitError, parse_quantity

        try:
            v = _tidy(parse_quantity(value, "mg"))
        except UnitError as e:
            raise InputError(f"{what} = {value!r}: {e}; write e.g. '1000 mg'") from None
    else:
        v = _positive(value, what)
    if not (math.isfinite(v) and v > 0):
        raise InputError(f"{what} = {value!r} must be a positive mass (mg)")
    return float(v)


# -- the rule language --------------------------------------------------------------------------
class RuleError(InputError):
    """A rule text is wrong; located (line, column, caret) with valid examples.

    Attributes: ``reason``, ``line``, ``column`` (1-based, in the rule text), ``token``.
    """

    def __init__(self, reason: str, *, line: int | None = None, column: int | None = None,
                 token: str | None = None, text: str | None = None):
        self.reason, self.line, self.column, self.token = reason, line, column, token
        msg = f"rule line {line}, column {column}: {reason}" if line is not None else f"rule: {reason}"
        if text is not None and line is not None:
            lines = text.splitlines() or [""]
            src = lines[line - 1] if 0 < line <= len(lines) else ""
            msg += f"\n    {src}\n    {' ' * (column - 1)}{'^' * max(1, len(token or ''))}"
        msg += "\nValid examples:\n" + "\n".join(f"    {e}" for e in RULE_EXAMPLES)
        super().__init__(msg)


_RULE_GRAMMAR = r"""
start: SEP? clause (SEP clause)* SEP?
clause: ACTION level? WHEN cond
level: AT NUMBER PERCENT
?cond: or_cond
?or_cond: and_cond (OR and_cond)*
?and_cond: atom (AND atom)*
?atom: comparison
     | LPAR or_cond RPAR      -> group
comparison: NAME OP value
value: NUMBER UNIT?                 -> absolute
     | NUMBER PERCENT OF? REF       -> percent
     | NUMBER TIMES? REF            -> multiple
     | REF                          -> multiple

SEP.5: /(;|\n)([ \t\r\f]*(;|\n))*/
ACTION.4: /(treat|hold)\b/i
WHEN.4: /when\b/i
AT.4: /at\b/i
AND.4: /and\b/i
OR.4: /or\b/i
OF.4: /of\b/i
REF.4: /(baseline|nadir)\b/i
TIMES.4: /(\*|x\b|times\b)/i
PERCENT.4: "%"
LPAR.4: "("
RPAR.4: ")"
OP.4: ">=" | "<=" | "==" | "!=" | ">" | "<" | "≥" | "≤"
NUMBER.3: /(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?/
UNIT.2: /[A-Za-zµμ][A-Za-z0-9µμ]*(\/[A-Za-z0-9]+)?/
NAME.1: /[A-Za-z_][A-Za-z0-9_]*/

%ignore /[ \t\r\f]+/
"""

_RULE_EXPECTED = {
    "ACTION": "'treat' or 'hold'", "WHEN": "'when'", "AT": "'at N%'", "AND": "'and'", "OR": "'or'",
    "OF": "'of'", "REF": "'baseline' or 'nadir'", "TIMES": "'*'", "PERCENT": "'%'", "LPAR": "'('",
    "RPAR": "')'", "OP": "a comparison (<, <=, >, >=)", "NUMBER": "a number", "UNIT": "a unit (e.g. ng/mL)",
    "NAME": f"an observable ({', '.join(list(RULE_OBSERVABLES) + list(RULE_TIMES))})",
    "SEP": "';' or a new line", "$END": "the end of the rule",
}


@functools.lru_cache(maxsize=1)
def _rule_parser():
    from lark import Lark

    return Lark(_RULE_GRAMMAR, parser="lalr", propagate_positions=True, maybe_placeholders=False)


def _loc(text: str, pos: int) -> tuple[int, int]:
    pos = max(0, min(pos, len(text)))
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


@dataclass(frozen=True)
class _Cmp:
    var: str
    op: str
    number: float
    ref: str | None  # None: absolute; "baseline" / "nadir": number x ref

    def evaluate(self, s: PolicyState, t: float, obs: dict) -> np.ndarray:
        if self.var == "time":
            left = np.full(s.n_draws, t - s.first_time)
        elif self.var == "phase_time":
            left = t - s.phase_start
        elif self.var == "treatment_time":
            left = s.time_on_treatment
        else:
            left = obs[self.var]
        right = self.number if self.ref is None else self.number * (s.baseline if self.ref == "baseline" else s.nadir)[self.var]
        with np.errstate(invalid="ignore"):
            return _OPS[self.op](left, right)

    def __str__(self):
        rhs = f"{self.number:g}" if self.ref is None else f"{self.number:g} * {self.ref}"
        return f"{self.var} {self.op} {rhs}"


_OPS = {
    "<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal,
    "==": np.equal, "!=": np.not_equal,
}


@dataclass(frozen=True)
class _BoolOp:
    op: str  # "and" | "or"
    parts: tuple

    def evaluate(self, s, t, obs):
        vals = [p.evaluate(s, t, obs) for p in self.parts]
        return np.logical_and.reduce(vals) if self.op == "and" else np.logical_or.reduce(vals)

    def __str__(self):
        return "(" + f" {self.op} ".join(str(p) for p in self.parts) + ")"


@dataclass(frozen=True)
class _Clause:
    factor: float
    cond: Any

    def __str__(self):
        act = "hold" if self.factor == 0 else ("treat" if self.factor == 1 else f"treat at {self.factor * 100:g}%")
        return f"{act} when {self.cond}"


def _parse_rule(text: str) -> tuple[_Clause, ...]:
    from lark import Token, Tree
    from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

    if not isinstance(text, str):
        raise RuleError(f"expected the rule as text, received {type(text).__name__}")
    if not re.sub(r"#[^\n]*|[;\s]", "", text):
        raise RuleError("the rule is empty; write at least one clause such as 'hold when psa < 0.5 * baseline'")
    clean = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), text)
    try:
        tree = _rule_parser().parse(clean)
    except UnexpectedToken as e:
        tok = e.token
        expected = sorted({_RULE_EXPECTED.get(x, x) for x in e.expected})
        if tok.type == "$END":
            stripped = clean.rstrip()
            line, col = _loc(text, len(stripped))
            raise RuleError(f"the rule ends too early; expected {', '.join(expected)}",
                            line=line, column=col, text=text) from None
        line, col = _loc(text, tok.start_pos)
        raise RuleError(f"unexpected {str(tok)!r}; expected {', '.join(expected)}",
                        line=line, column=col, token=str(tok), text=text) from None
    except UnexpectedCharacters as e:
        line, col = _loc(text, e.pos_in_stream)
        word = re.match(r"\S+", text[e.pos_in_stream:])
        found = word.group() if word else text[e.pos_in_stream: e.pos_in_stream + 1]
        expected = sorted({_RULE_EXPECTED.get(x, x) for x in (e.allowed or ())})
        raise RuleError(f"unexpected {found!r}; expected {', '.join(expected)}",
                        line=line, column=col, token=found, text=text) from None
    except UnexpectedInput as e:  # pragma: no cover
        raise RuleError(f"cannot read the rule: {e}") from None

    def err(reason, tok):
        line, col = _loc(text, tok.start_pos)
        return RuleError(reason, line=line, column=col, token=str(tok), text=text)

    def comparison(node):
        name_tok, op_tok, value = node.children
        var = str(name_tok).lower()
        var = _OBS_ALIASES.get(var, var)
        if var not in RULE_OBSERVABLES and var not in RULE_TIMES:
            options = list(RULE_OBSERVABLES) + list(RULE_TIMES)
            raise err(f"unknown observable {str(name_tok)!r}; expected one of {options}.{close_matches(var, options)}", name_tok)
        op = {"≥": ">=", "≤": "<="}.get(str(op_tok), str(op_tok))
        toks = [c for c in value.children if isinstance(c, Token)]
        num_tok = next((c for c in toks if c.type == "NUMBER"), None)
        number = 1.0 if num_tok is None else float(num_tok)
        if value.data == "absolute":
            unit_tok = next((c for c in toks if c.type == "UNIT"), None)
            if var in RULE_TIMES:
                if unit_tok is None:
                    raise err(f"{var} is a time: give a unit, e.g. '{num_tok} weeks' or '{num_tok} days'", num_tok)
                try:
                    number = parse_duration(f"{num_tok} {unit_tok}", var)
                except InputError as e:
                    raise err(str(e), unit_tok) from None
            else:
                canonical = RULE_OBSERVABLES[var]
                if unit_tok is None:
                    if canonical != "1":
                        raise err(
                            f"the number {str(num_tok)} has no unit; {var} is in {canonical}: write e.g. "
                            f"'{num_tok} {canonical}', or compare with a multiple of baseline/nadir ('0.5 * baseline')",
                            num_tok,
                        )
                else:
                    from twin.units import UnitError, conversion_factor

                    try:
                        number = _tidy(number * conversion_factor(str(unit_tok), canonical))
                    except UnitError:
                        raise err(f"unit {str(unit_tok)!r} does not fit {var} (in {canonical})", unit_tok) from None
            return _Cmp(var, op, number, None)
        if var in RULE_TIMES:
            raise err(f"{var} is a time; compare it with a duration ('36 weeks'), not with baseline/nadir", name_tok)
        ref = str(next(c for c in toks if c.type == "REF")).lower()
        if value.data == "percent":
            number /= 100.0
        return _Cmp(var, op, number, ref)

    def cond(node):
        if isinstance(node, Tree) and node.data == "comparison":
            return comparison(node)
        if isinstance(node, Tree) and node.data == "group":
            return cond(next(c for c in node.children if isinstance(c, Tree)))
        if isinstance(node, Tree) and node.data in ("or_cond", "and_cond"):
            return _BoolOp("or" if node.data == "or_cond" else "and",
                           tuple(cond(c) for c in node.children if isinstance(c, Tree)))
        raise RuleError(f"unsupported rule part {node!r}")  # pragma: no cover

    clauses = []
    for c in tree.children:
        if not isinstance(c, Tree):
            continue
        action = str(c.children[0]).lower()
        factor = TREAT if action == "treat" else HOLD
        level = next((x for x in c.children if isinstance(x, Tree) and x.data == "level"), None)
        if level is not None:
            num = next(x for x in level.children if isinstance(x, Token) and x.type == "NUMBER")
            if action == "hold":
                raise err("'hold' takes no dose level; write 'treat at 50% when ...' for a reduced dose", num)
            pct = float(num)
            if not 0 < pct <= 100:
                raise err(f"a dose level of {num}% is not in (0, 100]%", num)
            factor = pct / 100.0
        body = [x for x in c.children if isinstance(x, Tree) and x.data != "level"][0]
        clauses.append(_Clause(factor, cond(body)))
    return tuple(clauses)


def _vars(node) -> set[str]:
    if isinstance(node, _Cmp):
        return {node.var}
    return set().union(*(_vars(p) for p in node.parts))


@dataclass(frozen=True)
class RulePolicy(Policy):
    """A policy written as rules: ``"treat when psa >= 1.0 * baseline; hold when psa < 0.5 * baseline"``.

    Clauses (``treat when COND``, ``treat at 50% when COND``, ``hold when COND``; separated by
    ``;`` or new lines) are checked in order at each visit, per draw; the first whose
    condition holds decides. When none holds the draw keeps its current action (at the first
    visit: ``initial``, "treat" by default). A condition compares an observable (psa,
    tumor_volume, sld, ctdna, resistant_fraction) or a time (time, phase_time,
    treatment_time) with a number and unit (``4 ng/mL``, ``100 mm3``, ``36 weeks``), a
    multiple of ``baseline`` or ``nadir`` (``0.5 * baseline``, ``50% of baseline``,
    ``1.25 nadir``); ``and`` binds tighter than ``or``; parentheses group. ``baseline`` is
    the value at the first visit, ``nadir`` the smallest value at the visits before this one.
    """

    rule: str
    initial: str = "treat"
    name = "rule"

    def __post_init__(self):
        object.__setattr__(self, "_clauses", _parse_rule(self.rule))
        init = str(self.initial).strip().lower()
        if init not in ("treat", "hold"):
            raise InputError(f"RulePolicy.initial = {self.initial!r}: expected 'treat' or 'hold'")
        object.__setattr__(self, "initial", init)

    @property
    def clauses(self) -> tuple:
        return self._clauses

    @property
    def observables(self):
        names = set().union(*(_vars(c.cond) for c in self._clauses))
        return tuple(sorted(n for n in names if n in RULE_OBSERVABLES))

    def _rule(self, s, t, obs):
        if s.visits == 0:
            factor = np.full(s.n_draws, TREAT if self.initial == "treat" else HOLD)
        else:
            factor = s.factor.copy()
        decided = np.zeros(s.n_draws, bool)
        for clause in self._clauses:
            hit = clause.cond.evaluate(s, t, obs) & ~decided
            factor = np.where(hit, clause.factor, factor)
            decided |= hit
        return factor, {}

    def __str__(self):
        return "; ".join(str(c) for c in self._clauses)


# -- policies by name (scenario files) -------------------------------------------------------
#: Policy names usable in scenario files, and their classes.
POLICIES: dict[str, type] = {
    "continuous": Continuous,
    "zhang": Zhang,
    "bruchovsky": Bruchovsky,
    "skip": DoseSkipping,
}
_POLICY_ALIASES = {"adaptive": "zhang", "intermittent": "bruchovsky", "iad": "bruchovsky",
                   "skip_below": "skip", "dose_skipping": "skip"}
_LIMIT_KEYS = ("max_cumulative_dose", "min_holiday", "max_duration")


def make_policy(spec: Any, *, limits: Mapping[str, Any] | None = None) -> Policy:
    """A policy from its scenario-file form.

    ``spec`` is a name (``"zhang"``, ``"bruchovsky"``, ``"skip"``, ``"continuous"``), a
    table with ``name`` and the class's options (``{name = "zhang", stop_fraction = 0.4}``),
    or ``{rule = "...", initial = "treat"}``. ``limits`` (keys ``max_cumulative_dose``,
    ``min_holiday``, ``max_duration``) wraps the result in :class:`Limited`. Raises
    :class:`twin.errors.InputError` (:class:`RuleError` for rule texts).
    """
    if isinstance(spec, Policy):
        policy = spec
    elif isinstance(spec, str):
        policy = _policy_class(spec)()
    elif isinstance(spec, Mapping):
        opts = dict(spec)
        if "rule" in opts:
            unknown = set(opts) - {"rule", "initial"}
            if unknown:
                raise InputError(
                    f"unknown key(s) {sorted(unknown)} in a rule policy; expected 'rule' and optionally 'initial'."
                    + close_matches(sorted(unknown)[0], ["rule", "initial"])
                )
            policy = RulePolicy(opts["rule"], opts.get("initial", "treat"))
        elif "name" in opts:
            cls = _policy_class(opts.pop("name"))
            allowed = [f.name for f in dataclasses.fields(cls)]
            for k in opts:
                if k not in allowed:
                    raise InputError(
                        f"unknown option {k!r} for policy {cls.name!r}; options: {allowed or 'none'}."
                        + close_matches(k, allowed)
                    )
            try:
                policy = cls(**opts)
            except TypeError as e:  # pragma: no cover - guarded above
                raise InputError(f"policy {cls.name!r}: {e}") from None
        else:
            raise InputError(
                f"a policy table needs 'name' (one of {list(POLICIES)}) or 'rule' (a rule text), received keys {sorted(opts)}"
            )
    else:
        raise InputError(
            f"policy = {spec!r} ({type(spec).__name__}): expected a name ({', '.join(POLICIES)}), "
            f"a table with 'name' and options, or {{rule = \"...\"}}"
        )
    if limits:
        if not isinstance(limits, Mapping):
            raise InputError(f"limits = {limits!r}: expected a table with keys {list(_LIMIT_KEYS)}")
        for k in limits:
            if k not in _LIMIT_KEYS:
                raise InputError(f"unknown limit {k!r}; expected {list(_LIMIT_KEYS)}.{close_matches(k, _LIMIT_KEYS)}")
        policy = Limited(policy, **dict(limits))
    return policy


def _policy_class(name: Any) -> type:
    n = str(name).strip().lower()
    n = _POLICY_ALIASES.get(n, n)
    if n not in POLICIES and " when " in f" {n} ":
        raise InputError(
            f"policy = {name!r} looks like a rule; write it as a table: policy = {{rule = {str(name)!r}}}"
        )
    if n not in POLICIES:
        raise InputError(
            f"unknown policy {name!r}; expected one of {list(POLICIES)} or {{rule = \"...\"}}."
            + close_matches(n, list(POLICIES))
        )
    return POLICIES[n]
