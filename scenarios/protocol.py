"""Treatment protocols: typed steps first, readable strings as sugar.

A :class:`Protocol` is an ordered list of typed steps:

- :class:`Dose` -- one drug, an amount in mg, mg/kg or mg/m², a route, a schedule
  (``every`` N days, or days of a cycle) and a duration (``for_days``, ``cycles`` or
  ``doses``);
- :class:`Rest` -- no treatment for a number of days;
- :class:`Combination` -- steps given together (they start at the same time);
- :class:`Sequence` -- steps given one after the other;
- :class:`Switch` -- a state-triggered change of treatment ("at progression"); the
  scenario runner evaluates the condition, :meth:`Protocol.expand` stops there;
- :class:`DoseReduction` -- from a time on, a drug is given at a lower amount.

Each step has a canonical ``str()`` that :func:`parse_step` reads back into the same step,
and :meth:`Protocol.parse` reads the readable form ("docetaxel 75 mg/m2 iv over 1 hour
every 3 weeks for 6 cycles") with a lark grammar (no ``eval``). :meth:`Protocol.expand`
turns a protocol into a :class:`twin.Regimen` for one patient (mg/kg and mg/m² resolved
with the patient's weight and body-surface area). See ``docs/how-to/write-a-protocol.md``.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Union

import numpy as np

from twin.drugs import lookup_drug, known_drug_names
from twin.errors import InputError, close_matches
from twin.regimen import Regimen

__all__ = [
    "Protocol",
    "Dose",
    "Rest",
    "Combination",
    "Sequence",
    "Switch",
    "DoseReduction",
    "Expansion",
    "ProtocolError",
    "parse_step",
    "EXAMPLES",
    "CONDITIONS",
    "ROUTES",
    "DOSE_UNITS",
]

#: Valid example strings, shown at the end of every parse error (and in the docs).
EXAMPLES = (
    "abiraterone 1000 mg oral daily for 12 weeks",
    "docetaxel 75 mg/m2 IV over 1 hour every 3 weeks for 6 cycles",
    "rest for 8 weeks",
    "capecitabine 1000 mg/m2 oral BID days 1-14 of a 21-day cycle for 4 cycles",
    "dabrafenib 150 mg oral BID + trametinib 2 mg oral daily for 24 weeks",
    "encorafenib 300 mg oral daily until progression then switch to trametinib 2 mg oral daily",
    "leuprolide 7.5 mg im every 4 weeks for 6 doses",
    "cetuximab 400 mg/m2 iv over 2 hours once then 250 mg/m2 iv over 1 hour weekly for 8 weeks",
    "reduce trametinib to 1.5 mg after 8 weeks",
)

#: Conditions a :class:`Switch` may wait for (evaluated by the scenario runner).
CONDITIONS = ("progression", "resistance", "toxicity")
ROUTES = ("oral", "iv", "sc", "im", "ip")
DOSE_UNITS = ("mg", "mg/kg", "mg/m2")
_ROUTE_ALIASES = {
    "po": "oral", "intravenous": "iv", "subcutaneous": "sc", "intramuscular": "im", "intraperitoneal": "ip",
}
_EPS = 1e-9


# -- errors ---------------------------------------------------------------------------------
class ProtocolError(InputError):
    """A protocol (string or typed steps) is wrong; the message says where and how to fix it.

    Attributes
    ----------
    reason : the problem in one sentence, without location or examples.
    line, column : 1-based position in the protocol text (``None`` for typed steps).
    token : the text found there (``None`` if not applicable).
    """

    def __init__(self, reason: str, *, line: int | None = None, column: int | None = None,
                 token: str | None = None, text: str | None = None, examples: bool = True):
        self.reason = reason
        self.line = line
        self.column = column
        self.token = token
        msg = f"protocol line {line}, column {column}: {reason}" if line is not None else f"protocol: {reason}"
        if text is not None and line is not None:
            lines = text.splitlines() or [""]
            src = lines[line - 1] if 0 < line <= len(lines) else ""
            width = max(1, len(token)) if token else 1
            msg += f"\n    {src}\n    {' ' * (column - 1)}{'^' * width}"
        if examples:
            msg += "\nValid examples:\n" + "\n".join(f"    {e}" for e in EXAMPLES)
        super().__init__(msg)


def _loc(text: str, pos: int) -> tuple[int, int]:
    """1-based (line, column) of character offset ``pos`` in ``text``."""
    pos = max(0, min(pos, len(text)))
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


# -- formatting and unit helpers ------------------------------------------------------------
def _num(x: float) -> str:
    """A number as written in a protocol: '1000', '7.5', '0.333333333333'."""
    x = float(x)
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


_TIME_DIVISORS = {"minute": 1440.0, "hour": 24.0, "day": 1.0}


def _time_unit(word: str) -> str:
    w = word.lower()
    if w.startswith("mon"):
        return "month"
    if w.startswith("min"):
        return "minute"
    if w.startswith("h"):
        return "hour"
    if w.startswith("d"):
        return "day"
    if w.startswith("w"):
        return "week"
    raise ProtocolError(f"unknown time unit {word!r}; expected minutes, hours, days or weeks")


def _days(value: float, unit: str) -> float:
    """``value`` in ``unit`` (minute, hour, day, week) as days, exactly as a user computes it."""
    if unit == "month":
        raise ProtocolError(
            "months differ in length; write the duration in weeks or days (e.g. 'for 26 weeks')", examples=False
        )
    if unit == "week":
        return float(value) * 7.0
    return float(value) / _TIME_DIVISORS[unit]


_DURATION_RE = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*([A-Za-z]+)\s*")


def _as_days(value: Any, what: str) -> float | None:
    """A time given as days (number) or as text ('1 hour', '3 weeks') -> days."""
    if value is None:
        return None
    if isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if not m:
            raise ProtocolError(f"{what} = {value!r} is not a duration; write e.g. '1 hour', '3 weeks' or a number of days")
        return _days(float(m.group(1)), _time_unit(m.group(2)))
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError(f"{what} = {value!r} ({type(value).__name__}) is not a number of days")
    return float(value)


def _fmt_days(days: float) -> str:
    """Canonical text of a duration: '12 weeks', '10 days', '1 hour', '30 minutes'."""
    if days > 0 and days % 7 == 0:
        n = days / 7
        return f"{_num(n)} week{'s' if n != 1 else ''}"
    if days >= 1 and days == int(days):
        return f"{_num(days)} day{'s' if days != 1 else ''}"
    hours = days * 24
    if abs(hours - round(hours)) < 1e-9 and round(hours) > 0:
        h = round(hours)
        return f"{h} hour{'s' if h != 1 else ''}"
    minutes = days * 1440
    if abs(minutes - round(minutes)) < 1e-9 and round(minutes) > 0:
        m = round(minutes)
        return f"{m} minute{'s' if m != 1 else ''}"
    return f"{_num(days)} days"


_FREQ_WORDS = {1.0: "daily", 0.5: "BID", 1.0 / 3.0: "TID", 0.25: "QID", 7.0: "weekly"}
_FREQ_TEXT = {
    "daily": 1.0, "qd": 1.0, "once daily": 1.0, "bid": 0.5, "twice daily": 0.5, "tid": 1.0 / 3.0,
    "three times daily": 1.0 / 3.0, "qid": 0.25, "four times daily": 0.25, "weekly": 7.0,
}


def _fmt_every(every: float) -> str:
    if every in _FREQ_WORDS:
        return _FREQ_WORDS[every]
    return f"every {_fmt_days(every)}"


def _parse_dose_amount(value: float, unit_text: str) -> tuple[float, str]:
    """'1 g' -> (1000, 'mg'); '75 mg/m2' -> (75, 'mg/m2'); '3.5 mg/kg' -> (3.5, 'mg/kg').

    The unit must be a mass (converted to mg), optionally per body mass (-> mg/kg) or per
    area (-> mg/m2); pint's dimensionless units ('cycles', 'percent') are refused.
    """
    from twin.units import UnitError, conversion_factor

    bad = ProtocolError(
        f"unit {unit_text!r} is not a dose unit; expected mg (or g, ug), mg/kg or mg/m2, e.g. '75 mg/m2'"
    )
    num, _, den = str(unit_text).partition("/")
    try:
        f_num = conversion_factor(num, "mg")
    except UnitError:
        raise bad from None
    if not den:
        return (float(value) * f_num if f_num != 1.0 else float(value)), "mg"
    for canonical, pint_unit in (("mg/kg", "kg"), ("mg/m2", "m**2")):
        try:
            f_den = conversion_factor(den, pint_unit)
        except UnitError:
            continue
        factor = f_num / f_den
        return (float(value) * factor if factor != 1.0 else float(value)), canonical
    raise bad


def _canonical_drug(name: str) -> str:
    drug = lookup_drug(name)
    return drug.name if drug is not None else str(name).strip().lower()


def _parse_days_text(text: str) -> tuple[int, ...]:
    days: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = (int(p) for p in part.split("-", 1))
            if b < a:
                raise ProtocolError(f"days {part!r}: the range runs backwards; write e.g. 'days 1-14'")
            days.extend(range(a, b + 1))
        else:
            days.append(int(part))
    return tuple(days)


def _fmt_days_list(days: tuple[int, ...]) -> str:
    runs: list[list[int]] = []
    for d in days:
        if runs and d == runs[-1][1] + 1:
            runs[-1][1] = d
        else:
            runs.append([d, d])
    parts = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs]
    word = "day" if len(days) == 1 else "days"
    return f"{word} {', '.join(parts)}"


# -- typed steps ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Dose:
    """One drug on a schedule.

    Parameters
    ----------
    drug : catalogue name or synonym (stored as the canonical name); drugs outside the
        catalogue must be declared on the :class:`Protocol` (``drugs=``).
    amount : amount per administration, in ``unit`` (> 0).
    unit : "mg", "mg/kg" (times the patient's weight) or "mg/m2" (times the body-surface area).
    route : "oral", "iv", "sc", "im" or "ip"; ``None``: the catalogue's standard route.
    every : days between administrations (0.5 = BID, 1 = daily, 7 = weekly), or a word:
        "daily", "BID", "TID", "QID", "weekly", or a duration text ("3 weeks").
        ``None``: a single administration ("once"), or once on each listed day of a cycle.
    for_days, cycles, doses : how long the step lasts (at most one; none: until the
        horizon, or until a following :class:`Switch` fires). ``for_days`` also accepts
        text ("12 weeks"). A cycle is ``cycle_length`` days when ``days_of_cycle`` is
        given, otherwise one interval ``every``.
    days_of_cycle : the 1-based days of each cycle on which the drug is given, as a tuple
        of ints or as text ("1-14", "1, 8, 15"); requires ``cycle_length``.
    cycle_length : days per cycle (e.g. 21).
    infusion : infusion duration [day] (0 = bolus), or text ("1 hour").
    """

    drug: str
    amount: float
    unit: str = "mg"
    route: str | None = None
    every: float | str | None = None
    for_days: float | str | None = None
    cycles: int | None = None
    doses: int | None = None
    days_of_cycle: tuple[int, ...] | str | None = None
    cycle_length: float | str | None = None
    infusion: float | str = 0.0

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        if not isinstance(self.drug, str) or not self.drug.strip():
            raise ProtocolError(f"Dose(drug={self.drug!r}): give a drug name, e.g. 'docetaxel'")
        s("drug", _canonical_drug(self.drug))
        amount = self.amount
        if isinstance(amount, bool) or not isinstance(amount, (int, float, np.integer, np.floating)):
            raise ProtocolError(f"Dose({self.drug}): amount = {amount!r} is not a number")
        if not math.isfinite(amount) or amount <= 0:
            raise ProtocolError(f"Dose({self.drug}): amount must be a positive number, received {amount!r}")
        s("amount", float(amount))
        unit = str(self.unit).strip().lower().replace("²", "2").replace("m^2", "m2")
        if unit not in DOSE_UNITS:
            raise ProtocolError(f"Dose({self.drug}): unit = {self.unit!r}; expected one of {list(DOSE_UNITS)}")
        s("unit", unit)
        route = self.route
        if route is None:
            d = lookup_drug(self.drug)
            route = d.pk.standard_route if d is not None and d.pk is not None and d.pk.standard_route else None
            if route is None:
                raise ProtocolError(f"Dose({self.drug}): give a route ({', '.join(ROUTES)}); the catalogue has no standard route for it")
        route = _ROUTE_ALIASES.get(str(route).lower(), str(route).lower())
        if route not in ROUTES:
            raise ProtocolError(f"Dose({self.drug}): route = {self.route!r}; expected one of {list(ROUTES)}.{close_matches(str(self.route), ROUTES)}")
        s("route", route)
        every = self.every
        if isinstance(every, str) and every.strip().lower() in _FREQ_TEXT:
            every = _FREQ_TEXT[every.strip().lower()]
        elif isinstance(every, str) and every.strip().lower() == "once":
            every = None
        every = _as_days(every, f"Dose({self.drug}).every")
        if every is not None and not (every > 0 and math.isfinite(every)):
            raise ProtocolError(f"Dose({self.drug}): every = {every!r} days must be positive")
        s("every", every)
        s("for_days", _as_days(self.for_days, f"Dose({self.drug}).for_days"))
        if self.for_days is not None and not self.for_days > 0:
            raise ProtocolError(f"Dose({self.drug}): for_days = {self.for_days!r} must be positive")
        for k in ("cycles", "doses"):
            v = getattr(self, k)
            if v is not None:
                if isinstance(v, bool) or not float(v) == int(v) or int(v) < 1:
                    raise ProtocolError(f"Dose({self.drug}): {k} = {v!r} must be a whole number >= 1")
                s(k, int(v))
        given = [k for k in ("for_days", "cycles", "doses") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ProtocolError(f"Dose({self.drug}): give one of for_days, cycles or doses, not {' and '.join(given)}")
        s("cycle_length", _as_days(self.cycle_length, f"Dose({self.drug}).cycle_length"))
        days = self.days_of_cycle
        if days is not None:
            if isinstance(days, str):
                days = _parse_days_text(days)
            elif isinstance(days, range):
                days = tuple(days)
            days = tuple(sorted(set(int(d) for d in days)))
            if not days:
                raise ProtocolError(f"Dose({self.drug}): days_of_cycle is empty")
            if self.cycle_length is None:
                raise ProtocolError(f"Dose({self.drug}): days_of_cycle needs cycle_length (e.g. 21 for 'of a 21-day cycle')")
            if days[0] < 1 or days[-1] > self.cycle_length:
                raise ProtocolError(
                    f"Dose({self.drug}): days {_fmt_days_list(days)} do not fit a {_num(self.cycle_length)}-day cycle (day 1 is its first day)"
                )
            if self.every is not None:
                per_day = 1.0 / self.every
                if self.every > 1 or abs(per_day - round(per_day)) > 1e-9:
                    raise ProtocolError(
                        f"Dose({self.drug}): on days of a cycle the frequency must be daily, BID, TID or QID, received {_fmt_every(self.every)}"
                    )
                if self.every == 1.0:
                    s("every", None)  # once on each listed day == daily on those days
            s("days_of_cycle", days)
        elif self.cycle_length is not None:
            raise ProtocolError(f"Dose({self.drug}): cycle_length needs days_of_cycle (e.g. '1-14')")
        if self.every is None and self.days_of_cycle is None and given:
            raise ProtocolError(
                f"Dose({self.drug}): a single dose ('once') takes no {given[0]}; give a frequency (e.g. daily, every 3 weeks)"
            )
        if self.cycles is not None and self.every is None and self.days_of_cycle is None:
            raise ProtocolError(f"Dose({self.drug}): cycles need a cycle (every N days, or days of a cycle)")
        inf = _as_days(self.infusion, f"Dose({self.drug}).infusion") or 0.0
        if not (inf >= 0 and math.isfinite(inf)):
            raise ProtocolError(f"Dose({self.drug}): infusion = {self.infusion!r} must be >= 0 days")
        s("infusion", inf)

    @property
    def open_ended(self) -> bool:
        """True when the step has no end of its own (runs to the horizon or a switch)."""
        return (self.every is not None or self.days_of_cycle is not None) and self._duration_text() == ""

    def _duration_text(self) -> str:
        if self.for_days is not None:
            return f"for {_fmt_days(self.for_days)}"
        if self.cycles is not None:
            return f"for {self.cycles} cycle{'s' if self.cycles != 1 else ''}"
        if self.doses is not None:
            return f"for {self.doses} dose{'s' if self.doses != 1 else ''}"
        return ""

    def _head(self) -> str:
        parts = [self.drug, _num(self.amount), self.unit, self.route]
        if self.infusion > 0:
            parts.append(f"over {_fmt_days(self.infusion)}")
        if self.days_of_cycle is not None:
            if self.every is not None:
                parts.append(_fmt_every(self.every))
            parts.append(f"{_fmt_days_list(self.days_of_cycle)} of a {_num(self.cycle_length)}-day cycle")
        elif self.every is None:
            parts.append("once")
        else:
            parts.append(_fmt_every(self.every))
        return " ".join(parts)

    def __str__(self) -> str:
        d = self._duration_text()
        return f"{self._head()} {d}" if d else self._head()


@dataclass(frozen=True)
class Rest:
    """No treatment for ``days`` days (a number, or text such as "8 weeks")."""

    days: float | str

    def __post_init__(self):
        d = _as_days(self.days, "Rest.days")
        if d is None or not (d > 0 and math.isfinite(d)):
            raise ProtocolError(f"Rest(days={self.days!r}): the rest must last a positive number of days")
        object.__setattr__(self, "days", d)

    def __str__(self) -> str:
        return f"rest for {_fmt_days(self.days)}"


def _steps_tuple(steps, owner: str) -> tuple:
    if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
        raise ProtocolError(f"{owner}: expected a list of steps, received {steps!r}")
    steps = tuple(steps)
    for st in steps:
        if not isinstance(st, _STEP_TYPES):
            raise ProtocolError(
                f"{owner}: {st!r} ({type(st).__name__}) is not a step; expected Dose, Rest, Combination, Sequence, Switch or DoseReduction"
            )
    return steps


@dataclass(frozen=True)
class Combination:
    """Steps given together: all start at the same time; the step lasts as long as the longest.

    Members are :class:`Dose` (or :class:`Sequence` of doses and rests).
    """

    steps: tuple

    def __post_init__(self):
        steps = _steps_tuple(self.steps, "Combination")
        if len(steps) < 2:
            raise ProtocolError("Combination: give at least two steps to give together")
        for st in steps:
            if isinstance(st, (Switch, DoseReduction, Combination)):
                raise ProtocolError(f"Combination: {type(st).__name__} cannot be part of a combination ({st})")
        object.__setattr__(self, "steps", steps)

    @property
    def open_ended(self) -> bool:
        return any(_open_ended(s) for s in self.steps)

    def __str__(self) -> str:
        doses = [s for s in self.steps if isinstance(s, Dose)]
        if len(doses) == len(self.steps):
            durations = {d._duration_text() for d in doses}
            if len(durations) == 1 and "" not in durations:
                return " + ".join(d._head() for d in doses) + " " + durations.pop()
        return " + ".join(str(s) for s in self.steps)


@dataclass(frozen=True)
class Sequence:
    """Steps given one after the other."""

    steps: tuple

    def __post_init__(self):
        steps = _steps_tuple(self.steps, "Sequence")
        if not steps:
            raise ProtocolError("Sequence: give at least one step")
        object.__setattr__(self, "steps", steps)
        _check_reachable(steps, None)

    @property
    def open_ended(self) -> bool:
        return any(_open_ended(s) for s in self.steps)

    def __str__(self) -> str:
        return " then ".join(str(s) for s in self.steps)


@dataclass(frozen=True)
class Switch:
    """When ``at`` happens (e.g. "progression"), stop the current treatment and give ``to``.

    The condition depends on the simulated patient, so :meth:`Protocol.expand` does not
    expand past a switch: it returns the doses up to it and reports the rest as
    conditional (:attr:`Expansion.pending`); the scenario runner evaluates it.
    """

    to: Any
    at: str = "progression"

    def __post_init__(self):
        if not isinstance(self.to, (Dose, Combination, Rest)):
            raise ProtocolError(
                f"Switch: to = {self.to!r} must be a Dose, Combination or Rest (the treatment to switch to)"
            )
        at = str(self.at).strip().lower()
        if at not in CONDITIONS:
            raise ProtocolError(f"Switch: unknown condition {self.at!r}; expected one of {list(CONDITIONS)}.{close_matches(at, CONDITIONS)}")
        object.__setattr__(self, "at", at)

    def __str__(self) -> str:
        return f"switch to {self.to} at {self.at}"


@dataclass(frozen=True)
class DoseReduction:
    """From ``after`` days past the protocol start on, give ``drug`` at a lower amount.

    Give either ``factor`` (0 < factor < 1: the new amount is ``factor`` times the planned
    one; "by 25%" is factor 0.75) or ``amount`` in ``unit`` (the new amount per
    administration). The step takes no time; ``after`` counts from the start of the protocol,
    wherever the reduction is written.
    """

    drug: str
    factor: float | None = None
    amount: float | None = None
    unit: str = "mg"
    after: float | str = 0.0

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if not isinstance(self.drug, str) or not self.drug.strip():
            raise ProtocolError(f"DoseReduction(drug={self.drug!r}): give a drug name")
        s("drug", _canonical_drug(self.drug))
        if (self.factor is None) == (self.amount is None):
            raise ProtocolError(f"DoseReduction({self.drug}): give either factor (e.g. 0.75) or amount (e.g. 1.5 mg), not both or neither")
        if self.factor is not None:
            f = float(self.factor)
            if not (0 < f < 1):
                raise ProtocolError(f"DoseReduction({self.drug}): factor = {self.factor!r} must be between 0 and 1 (0.75 = reduce by 25%)")
            s("factor", f)
        else:
            a = float(self.amount)
            if not (a > 0 and math.isfinite(a)):
                raise ProtocolError(f"DoseReduction({self.drug}): amount must be a positive number, received {self.amount!r}")
            s("amount", a)
        unit = str(self.unit).strip().lower().replace("²", "2")
        if unit not in DOSE_UNITS:
            raise ProtocolError(f"DoseReduction({self.drug}): unit = {self.unit!r}; expected one of {list(DOSE_UNITS)}")
        s("unit", unit)
        after = _as_days(self.after, f"DoseReduction({self.drug}).after")
        if after is None or after < 0:
            raise ProtocolError(f"DoseReduction({self.drug}): after = {self.after!r} must be >= 0 days")
        s("after", after)

    def __str__(self) -> str:
        if self.factor is not None:
            text = f"reduce {self.drug} by {1e2 * (1 - self.factor):.10g}%"
        else:
            text = f"reduce {self.drug} to {_num(self.amount)} {self.unit}"
        return text + (f" after {_fmt_days(self.after)}" if self.after > 0 else "")


Step = Union[Dose, Rest, Combination, Sequence, Switch, DoseReduction]
_STEP_TYPES = (Dose, Rest, Combination, Sequence, Switch, DoseReduction)


def _open_ended(step) -> bool:
    return bool(getattr(step, "open_ended", False))


def _check_reachable(steps, sources) -> None:
    """A step after an open-ended one never starts (only a Switch or DoseReduction may follow)."""
    open_step = None
    for i, st in enumerate(steps):
        if open_step is not None and not isinstance(st, (Switch, DoseReduction)):
            src = sources[i] if sources else None
            raise _located(
                f"step {st} never starts: the step before it ({open_step}) has no end; give that step a duration "
                f"(e.g. 'for 12 weeks') or write 'until progression then switch to ...'",
                src,
            )
        if isinstance(st, Switch):
            open_step = None if not _open_ended(st.to) else st.to
        elif _open_ended(st):
            open_step = st


# -- the grammar ----------------------------------------------------------------------------
_GRAMMAR = r"""
start: SEP? item (SEP item)* SEP?

?item: combination
     | rest
     | reduction
     | switch
     | until_switch

until_switch: combination UNTIL CONDITION SEP SWITCH TO combination
switch: SWITCH TO combination (AT | ON) CONDITION

combination: dose (PLUS dose)*
dose: drug? amount route? infusion? frequency? cycle_days? duration?

drug: NAME+
amount: NUMBER UNIT?
route: ROUTE
infusion: OVER NUMBER TIMEUNIT

frequency: ONCE                          -> once
         | ONCE? DAILY                   -> daily
         | ONCE A DAY                    -> daily
         | BID                           -> bid
         | TWICE (DAILY | A DAY)         -> bid
         | TID                           -> tid
         | THREE TIMES (DAILY | A DAY)   -> tid
         | QID                           -> qid
         | FOUR TIMES (DAILY | A DAY)    -> qid
         | ONCE? WEEKLY                  -> weekly
         | EVERY NUMBER? TIMEUNIT        -> every

cycle_days: DAY DAYLIST OF (A | EACH | EVERY)? CYCLE_LENGTH CYCLE

duration: FOR NUMBER TIMEUNIT            -> for_time
        | FOR NUMBER CYCLE               -> for_cycles
        | FOR NUMBER DOSES               -> for_doses

rest: REST FOR NUMBER TIMEUNIT

reduction: REDUCE drug TO amount after?        -> reduce_to
         | REDUCE drug BY NUMBER PERCENT after? -> reduce_by
after: AFTER NUMBER TIMEUNIT

SEP.5: /(;|\n|then\b)([ \t\r\f]*(;|\n|then\b))*/i
ROUTE.4: /(oral|po|iv|intravenous|sc|subcutaneous|im|intramuscular|ip|intraperitoneal)\b/i
OVER.4: /over\b/i
ONCE.4: /once\b/i
DAILY.4: /(daily|qd)\b/i
BID.4: /(bid|b\.i\.d\.)(?![\w.])/i
TID.4: /(tid|t\.i\.d\.)(?![\w.])/i
QID.4: /(qid|q\.i\.d\.)(?![\w.])/i
TWICE.4: /twice\b/i
THREE.4: /three\b/i
FOUR.4: /four\b/i
TIMES.4: /times\b/i
WEEKLY.4: /weekly\b/i
EVERY.4: /every\b/i
EACH.4: /each\b/i
A.4: /a\b/i
DAY.4: /days?\b/i
OF.4: /of\b/i
CYCLE.4: /cycles?\b/i
DOSES.4: /doses?\b/i
FOR.4: /for\b/i
REST.4: /rest\b/i
REDUCE.4: /reduce\b/i
TO.4: /to\b/i
BY.4: /by\b/i
AFTER.4: /after\b/i
UNTIL.4: /until\b/i
SWITCH.4: /switch\b/i
AT.4: /at\b/i
ON.4: /on\b/i
PLUS.4: "+"
PERCENT.4: "%"
TIMEUNIT.3: /(minutes?|mins?|hours?|hrs?|h|days?|weeks?|wks?|months?)\b/i
CYCLE_LENGTH.3: /\d+(\.\d+)?[ \t]*-?[ \t]*(days?|weeks?)\b/i
DAYLIST.3: /\d+([ \t]*-[ \t]*\d+)?([ \t]*,[ \t]*\d+([ \t]*-[ \t]*\d+)?)*/
NUMBER.2: /-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?(?![\w\-]*-[A-Za-z])/
UNIT.1: /[A-Za-zµμ]+(\/[A-Za-z0-9²]+)?/
NAME.1: /(?=[\w\-]*[A-Za-z])[A-Za-z0-9][\w\-]*/
CONDITION.1: /[A-Za-z_]+/

%ignore /[ \t\r\f]+/
"""

# What each terminal means, for error messages.
_EXPECTED_TEXT = {
    "NAME": "a drug name", "NUMBER": "a number", "UNIT": "a dose unit (mg, mg/kg, mg/m2)",
    "ROUTE": "a route (oral, iv, sc, im, ip)", "OVER": "'over <time>' (infusion)",
    "ONCE": "a frequency", "DAILY": "a frequency", "BID": "a frequency", "TID": "a frequency",
    "QID": "a frequency", "TWICE": "a frequency", "THREE": "a frequency", "FOUR": "a frequency",
    "WEEKLY": "a frequency", "EVERY": "a frequency", "DAY": "'days 1-14 of a 21-day cycle'",
    "FOR": "'for <duration>'", "PLUS": "'+' (given together)", "SEP": "';', 'then' or a new line",
    "UNTIL": "'until progression then switch to ...'", "TIMEUNIT": "a time unit (hours, days, weeks)",
    "CYCLE": "'cycles'", "DOSES": "'doses'", "CYCLE_LENGTH": "a cycle length such as '21-day'",
    "DAYLIST": "days such as '1-14' or '1, 8, 15'", "OF": "'of'", "CONDITION": f"a condition ({', '.join(CONDITIONS)})",
    "TO": "'to'", "BY": "'by'", "AT": "'at <condition>'", "ON": "'on'", "AFTER": "'after <time>'",
    "PERCENT": "'%'", "REST": "'rest for <time>'", "REDUCE": "'reduce <drug> to <amount>'",
    "SWITCH": "'switch to ...'", "SWITCH_TO": "'switch to'", "A": "'a'", "EACH": "'each'", "TIMES": "'times'",
    "$END": "the end of the protocol",
}
_FREQ_TERMINALS = {"ONCE", "DAILY", "BID", "TID", "QID", "TWICE", "THREE", "FOUR", "WEEKLY", "EVERY"}


@functools.lru_cache(maxsize=1)
def _parser():
    from lark import Lark

    return Lark(_GRAMMAR, parser="lalr", propagate_positions=True, maybe_placeholders=False)


@dataclass(frozen=True)
class _Source:
    line: int
    column: int
    text: str  # the step's text
    full: str  # the whole protocol text (for the caret display)
    token: str | None = None


def _located(reason: str, src: _Source | None, *, examples: bool = True) -> ProtocolError:
    if src is None:
        return ProtocolError(reason, examples=examples)
    return ProtocolError(reason, line=src.line, column=src.column, token=src.token or src.text, text=src.full, examples=examples)


class _Builder:
    """Turns the lark tree into typed steps, raising located errors."""

    def __init__(self, text: str, declared: frozenset[str]):
        self.text = text
        self.declared = declared
        self.last_drug: str | None = None

    # location helpers
    def err(self, reason: str, node, token: str | None = None) -> ProtocolError:
        pos = node.start_pos if hasattr(node, "start_pos") else node.meta.start_pos
        line, col = _loc(self.text, pos)
        if token is None:
            token = str(node) if hasattr(node, "start_pos") else self.text[node.meta.start_pos: node.meta.end_pos]
        return ProtocolError(reason, line=line, column=col, token=token, text=self.text)

    def src(self, tree) -> _Source:
        line, col = _loc(self.text, tree.meta.start_pos)
        seg = self.text[tree.meta.start_pos: tree.meta.end_pos]
        return _Source(line, col, seg, self.text, token=seg.splitlines()[0] if seg else None)

    def tokens(self, tree, type_=None):
        from lark import Token

        return [c for c in tree.children if isinstance(c, Token) and (type_ is None or c.type == type_)]

    def subtree(self, tree, name):
        from lark import Tree

        for c in tree.children:
            if isinstance(c, Tree) and c.data == name:
                return c
        return None

    def number(self, tok, what: str, *, positive: bool = True, integer: bool = False) -> float:
        v = float(tok)
        if positive and not v > 0:
            raise self.err(f"{what} must be positive, received {tok}", tok)
        if integer and v != int(v):
            raise self.err(f"{what} must be a whole number, received {tok}", tok)
        return v

    def time(self, num_tok, unit_tok, what: str) -> float:
        v = self.number(num_tok, what)
        unit = _time_unit(str(unit_tok))
        if unit == "month":
            raise self.err("months differ in length; write the duration in weeks or days (e.g. 'for 26 weeks')", unit_tok)
        return _days(v, unit)

    def guard(self, fn, node):
        """Run a typed-step constructor; locate its error at ``node``."""
        try:
            return fn()
        except ProtocolError as e:
            raise self.err(re.sub(r"^\w+\([^)]*\): ", "", e.reason), node) from None

    # builders
    def drug(self, tree) -> str:
        names = self.tokens(tree)
        name = " ".join(str(t) for t in names)
        start = names[0].start_pos
        end = names[-1].end_pos
        if lookup_drug(name) is None and name.lower() not in self.declared:
            line, col = _loc(self.text, start)
            hint = close_matches(name, list(known_drug_names()) + sorted(self.declared))
            raise ProtocolError(
                f"unknown drug {name!r}.{hint} (Drugs outside the catalogue must be declared: Protocol.parse(text, drugs=[...]).)",
                line=line, column=col, token=self.text[start:end], text=self.text,
            )
        return _canonical_drug(name)

    def amount(self, tree) -> tuple[float, str]:
        num = self.tokens(tree, "NUMBER")[0]
        units = self.tokens(tree, "UNIT")
        v = float(num)
        if not (v > 0 and math.isfinite(v)):
            raise self.err(f"the amount must be a positive number, received {num}", num)
        if not units:
            raise self.err(f"the amount {num} has no unit; write e.g. '{num} mg', '{num} mg/m2' or '{num} mg/kg'", num)
        try:
            return _parse_dose_amount(v, str(units[0]))
        except ProtocolError as e:
            raise self.err(e.reason, units[0]) from None

    def dose(self, tree) -> Dose:
        kw: dict[str, Any] = {}
        drug_t = self.subtree(tree, "drug")
        if drug_t is not None:
            drug = self.drug(drug_t)
        elif self.last_drug is not None:
            drug = self.last_drug
        else:
            raise self.err("which drug? Start the step with a drug name, e.g. 'docetaxel 75 mg/m2 iv ...'", tree)
        self.last_drug = drug
        kw["amount"], kw["unit"] = self.amount(self.subtree(tree, "amount"))
        route = self.subtree(tree, "route")
        if route is not None:
            kw["route"] = str(route.children[0]).lower()
        for c in tree.children[1:] if drug_t is not None else tree.children:
            name = getattr(c, "data", None)
            if name == "infusion":
                n, u = self.tokens(c, "NUMBER")[0], self.tokens(c, "TIMEUNIT")[0]
                kw["infusion"] = self.time(n, u, "the infusion duration")
            elif name in ("daily", "bid", "tid", "qid", "weekly"):
                kw["every"] = {"daily": 1.0, "bid": 0.5, "tid": 1.0 / 3.0, "qid": 0.25, "weekly": 7.0}[name]
            elif name == "once":
                kw["every"] = None
            elif name == "every":
                nums = self.tokens(c, "NUMBER")
                u = self.tokens(c, "TIMEUNIT")[0]
                kw["every"] = self.time(nums[0], u, "the interval") if nums else self.time("1", u, "the interval")
            elif name == "cycle_days":
                dl = self.tokens(c, "DAYLIST")[0]
                try:
                    kw["days_of_cycle"] = _parse_days_text(str(dl))
                except ProtocolError as e:
                    raise self.err(e.reason, dl) from None
                cl = self.tokens(c, "CYCLE_LENGTH")[0]
                m = re.match(r"(\d+(?:\.\d+)?)\s*-?\s*([a-zA-Z]+)", str(cl))
                kw["cycle_length"] = _days(float(m.group(1)), _time_unit(m.group(2)))
            elif name == "for_time":
                n, u = self.tokens(c, "NUMBER")[0], self.tokens(c, "TIMEUNIT")[0]
                kw["for_days"] = self.time(n, u, "the duration")
            elif name in ("for_cycles", "for_doses"):
                n = self.tokens(c, "NUMBER")[0]
                kw["cycles" if name == "for_cycles" else "doses"] = int(self.number(n, f"the number of {name[4:]}", integer=True))
        if "every" not in kw and "days_of_cycle" not in kw and any(k in kw for k in ("for_days", "cycles", "doses")):
            dur = next(c for c in tree.children if getattr(c, "data", None) in ("for_time", "for_cycles", "for_doses"))
            raise self.err(
                "how often? Give a frequency before 'for' (daily, BID, TID, QID, weekly, every 3 weeks, "
                "or 'days 1-14 of a 21-day cycle')", dur.children[0],
            )
        return self.guard(lambda: Dose(drug, **kw), tree)

    def combination(self, tree):
        from lark import Tree

        doses = [self.dose(c) for c in tree.children if isinstance(c, Tree)]
        if len(doses) == 1:
            return doses[0]
        last = doses[-1]
        shared = {k: getattr(last, k) for k in ("for_days", "cycles", "doses")}
        if last._duration_text() and all(not d._duration_text() for d in doses[:-1]):
            # "A + B for 24 weeks": a duration written once at the end applies to every drug
            doses = [self.guard(lambda d=d: _replace(d, **shared), tree) for d in doses[:-1]] + [last]
        return self.guard(lambda: Combination(tuple(doses)), tree)

    def condition(self, tok) -> str:
        c = str(tok).lower()
        if c not in CONDITIONS:
            raise self.err(f"unknown condition {str(tok)!r}; expected one of {list(CONDITIONS)}.{close_matches(c, CONDITIONS)}", tok)
        return c

    def item(self, tree) -> list:
        from lark import Tree

        kind = tree.data
        if kind == "combination":
            return [self.combination(tree)]
        if kind == "rest":
            n, u = self.tokens(tree, "NUMBER")[0], self.tokens(tree, "TIMEUNIT")[0]
            return [Rest(self.time(n, u, "the rest"))]
        if kind in ("reduce_to", "reduce_by"):
            drug = self.drug(self.subtree(tree, "drug"))
            after_t = self.subtree(tree, "after")
            after = 0.0
            if after_t is not None:
                after = self.time(self.tokens(after_t, "NUMBER")[0], self.tokens(after_t, "TIMEUNIT")[0], "'after'")
            if kind == "reduce_to":
                amount, unit = self.amount(self.subtree(tree, "amount"))
                return [self.guard(lambda: DoseReduction(drug, amount=amount, unit=unit, after=after), tree)]
            pct_tok = self.tokens(tree, "NUMBER")[0]
            pct = float(pct_tok)
            if not 0 < pct < 100:
                raise self.err(f"a reduction by {pct_tok}% is not between 0 and 100%", pct_tok)
            return [self.guard(lambda: DoseReduction(drug, factor=1.0 - pct / 100.0, after=after), tree)]
        if kind == "switch":
            combos = [c for c in tree.children if isinstance(c, Tree)]
            at = self.condition(self.tokens(tree, "CONDITION")[0])
            return [Switch(self.combination(combos[0]), at)]
        if kind == "until_switch":
            combos = [c for c in tree.children if isinstance(c, Tree)]
            at = self.condition(self.tokens(tree, "CONDITION")[0])
            first = self.combination(combos[0])
            if not _open_ended(first):
                raise self.err(
                    f"'{first}' already has an end; 'until {at}' needs a step without 'for ...' "
                    f"(write 'then switch to ... at {at}' after it instead)", combos[0],
                )
            return [first, Switch(self.combination(combos[1]), at)]
        raise self.err(f"unsupported step {kind!r}", tree)  # pragma: no cover - grammar and builder agree

    def build(self, tree) -> tuple[list, list]:
        from lark import Tree

        steps, sources = [], []
        for c in tree.children:
            if isinstance(c, Tree):
                src = self.src(c)
                for st in self.item(c):
                    steps.append(st)
                    sources.append(src)
        return steps, sources


def _replace(d: Dose, **kw) -> Dose:
    from dataclasses import replace

    return replace(d, **kw)


def _describe_expected(expected: Iterable[str]) -> str:
    seen: list[str] = []
    for t in sorted(expected):
        d = _EXPECTED_TEXT.get(t, t)
        if d not in seen:
            seen.append(d)
    return ", ".join(seen)


def _parse(text: str, declared: Iterable[str] = ()) -> tuple[list, list]:
    from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

    if not isinstance(text, str):
        raise ProtocolError(f"expected the protocol as text, received {type(text).__name__}")
    if not text.strip() or not re.sub(r"#[^\n]*|[;\s]|\bthen\b", "", text):
        raise ProtocolError("the protocol is empty; write at least one step")
    # comments ('# ...' to the end of a line) become spaces, so positions stay true
    clean = re.sub(r"#[^\n]*", lambda m: " " * len(m.group()), text)
    try:
        tree = _parser().parse(clean)
    except UnexpectedToken as e:
        tok = e.token
        expected = set(e.expected) | set(getattr(e, "accepts", None) or ())
        if tok.type == "$END":
            stripped = clean.rstrip()
            line, col = _loc(text, len(stripped))
            last = stripped.split()[-1] if stripped.split() else ""
            reason = f"the protocol ends after {last!r}; expected {_describe_expected(expected)}"
            if "TIMEUNIT" in expected or "NUMBER" in expected and last.lower() == "for":
                reason += " (e.g. 'for 12 weeks', 'for 6 cycles', 'for 6 doses')"
            raise ProtocolError(reason, line=line, column=col + 1, token=None, text=text) from None
        found = str(tok)
        line, col = _loc(text, tok.start_pos)
        if not re.search(r"\bswitch\b", clean[: tok.start_pos], re.I):
            expected -= {"AT", "ON"}  # (LALR look-aheads of 'switch to ... at'; not useful here)
        if expected & _FREQ_TERMINALS and re.fullmatch(r"[A-Za-z][\w.\-]*", found) and not expected & {"NAME", "UNIT"}:
            reason = (
                f"unknown frequency {found!r}; expected daily, BID, TID, QID, weekly, once "
                f"or every N days/weeks (e.g. 'every 3 weeks')"
            )
        elif tok.type == "SEP" and e.token_history:
            reason = f"the step ends after {str(e.token_history[-1])!r}; expected {_describe_expected(expected)}"
        else:
            reason = f"unexpected {found!r}; expected {_describe_expected(expected)}"
        if e.token_history and str(e.token_history[-1]).lower() == "for":
            reason += " (e.g. 'for 12 weeks', 'for 6 cycles', 'for 6 doses')"
        raise ProtocolError(reason, line=line, column=col, token=found, text=text) from None
    except UnexpectedCharacters as e:
        line, col = _loc(text, e.pos_in_stream)
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        word = re.match(r"\S+", text[e.pos_in_stream:])
        found = word.group() if word else ch
        raise ProtocolError(
            f"unexpected {found!r}; expected {_describe_expected(e.allowed or ())}",
            line=line, column=col, token=found, text=text,
        ) from None
    except UnexpectedInput as e:  # pragma: no cover - other lark input errors
        line, col = getattr(e, "line", 1), getattr(e, "column", 1)
        raise ProtocolError(f"cannot read the protocol: {e}", line=line, column=col, text=text) from None
    builder = _Builder(text, frozenset(d.strip().lower() for d in declared))
    return builder.build(tree)


def parse_step(text: str, *, drugs: Iterable[str] = ()):
    """Parse one step ("rest for 8 weeks"); several steps come back as a :class:`Sequence`."""
    steps, _ = _parse(text, drugs)
    return steps[0] if len(steps) == 1 else Sequence(tuple(steps))


# -- protocols and their expansion ------------------------------------------------------------
@dataclass(frozen=True)
class Expansion:
    """The result of :meth:`Protocol.expansion`.

    Attributes
    ----------
    regimen : the doses up to the first :class:`Switch` (or the end, or the horizon).
    end : the time [day] at which the expanded part ends (the horizon when its last step
        runs until the horizon or until a switch).
    pending : the steps from the first :class:`Switch` on: conditional, not expanded.
    message : a sentence on what was not expanded ("" when everything was).
    """

    regimen: Regimen
    end: float | None
    pending: tuple = ()
    message: str = ""


@dataclass(frozen=True)
class Protocol:
    """An ordered list of treatment steps (one after the other).

    Parameters
    ----------
    steps : typed steps (:class:`Dose`, :class:`Rest`, :class:`Combination`,
        :class:`Sequence`, :class:`Switch`, :class:`DoseReduction`).
    drugs : names of drugs outside the catalogue that the protocol may use (as a patient
        file declares them).
    """

    steps: tuple
    drugs: tuple = field(default=(), compare=False)
    _sources: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self):
        steps = _steps_tuple(self.steps, "Protocol")
        if not steps:
            raise ProtocolError("the protocol has no steps")
        object.__setattr__(self, "steps", steps)
        declared = tuple(str(d).strip().lower() for d in (self.drugs or ()))
        object.__setattr__(self, "drugs", declared)
        sources = self._sources if len(self._sources) == len(steps) else (None,) * len(steps)
        object.__setattr__(self, "_sources", tuple(sources))
        for st, src in zip(steps, sources):
            for name in _drugs_of(st):
                if lookup_drug(name) is None and name not in declared:
                    raise _located(
                        f"unknown drug {name!r}.{close_matches(name, known_drug_names())} "
                        f"(declare drugs outside the catalogue: Protocol(steps, drugs=[{name!r}]))",
                        src,
                    )
        _check_reachable(steps, sources)

    # construction ----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, *, drugs: Iterable[str] = ()) -> "Protocol":
        """Read a protocol: one step per line, or steps separated by ';' or 'then'.

        ``drugs`` declares names outside the catalogue. Raises :class:`ProtocolError`
        (located: line, column, the text found; with valid examples) on any mistake.
        """
        steps, sources = _parse(text, drugs)
        return cls(tuple(steps), drugs=tuple(drugs), _sources=tuple(sources))

    def __str__(self) -> str:
        return "\n".join(str(s) for s in self.steps)

    def __iter__(self):
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    # expansion -------------------------------------------------------------------------
    def expand(self, covariates=None, start: float = 0.0, horizon: float | None = None, *, arm: str = "main") -> Regimen:
        """The doses of this protocol for one patient, as a :class:`twin.Regimen`.

        Parameters
        ----------
        covariates : :class:`twin.Covariates` (or anything with ``weight`` [kg] and ``bsa``
            [m²]); needed for mg/kg and mg/m² amounts.
        start : time [day] of the first step.
        horizon : time [day] (same clock as ``start``) where the plan is cut: doses at or
            after it are dropped; required when a step has no end ("daily" without "for").
        arm : the arm name of the regimen rows.

        Expansion stops at the first :class:`Switch` (its condition depends on the
        simulation); see :meth:`expansion` for what was left out.
        """
        return self.expansion(covariates, start=start, horizon=horizon, arm=arm).regimen

    def expansion(self, covariates=None, start: float = 0.0, horizon: float | None = None, *, arm: str = "main") -> Expansion:
        """Like :meth:`expand`, and report the conditional remainder (:class:`Expansion`)."""
        start = float(start)
        if horizon is not None and not float(horizon) > start:
            raise ProtocolError(f"horizon = {horizon!r} must be after start = {start!r}", examples=False)
        ctx = _Context(covariates, start, None if horizon is None else float(horizon))
        flat: list[tuple[Any, Any]] = []
        for st, src in zip(self.steps, self._sources):
            flat.extend((s, src) for s in _flatten(st))
        reductions = [(s, src) for s, src in flat if isinstance(s, DoseReduction)]
        timeline = [(s, src) for s, src in flat if not isinstance(s, DoseReduction)]
        t: float | None = start
        pending: tuple = ()
        message = ""
        for i, (st, src) in enumerate(timeline):
            if isinstance(st, Switch):
                pending = tuple(s for s, _ in timeline[i:])
                prev = timeline[i - 1][0] if i > 0 else None
                message = (
                    f"the protocol continues with '{st}': conditional on {st.at}, evaluated by the scenario "
                    f"runner; expanded up to it only"
                )
                if prev is not None:
                    ctx.note_last(prev, f"until {st.at}; then {st.to} (conditional, not expanded)")
                break
            if t is None:  # pragma: no cover - prevented by _check_reachable
                break
            nxt = timeline[i + 1][0] if i + 1 < len(timeline) else None
            t = ctx.step(st, t, src, nxt)
        _apply_reductions(ctx, reductions, flat)
        return Expansion(regimen=ctx.regimen(arm), end=t, pending=pending, message=message)


def _flatten(step) -> list:
    if isinstance(step, Sequence):
        out = []
        for s in step.steps:
            out.extend(_flatten(s))
        return out
    return [step]


def _drugs_of(step) -> list[str]:
    if isinstance(step, (Dose, DoseReduction)):
        return [step.drug]
    if isinstance(step, (Combination, Sequence)):
        return [d for s in step.steps for d in _drugs_of(s)]
    if isinstance(step, Switch):
        return _drugs_of(step.to)
    return []


class _Context:
    """Collects dose events while walking the steps."""

    def __init__(self, covariates, start: float, horizon: float | None):
        self.cov = covariates
        self.start = start
        self.horizon = horizon
        # events: [drug, time, amount_mg, route, duration, note, step]
        self.events: list[list] = []

    def per_patient(self, amount: float, unit: str, what: str, src) -> tuple[float, str | None]:
        if unit == "mg":
            return amount, None
        key, label, cov_unit = ("weight", "weight", "kg") if unit == "mg/kg" else ("bsa", "body-surface area", "m2")
        value = getattr(self.cov, key, None) if self.cov is not None else None
        if value is None or not (float(value) > 0):
            fix = "Covariates(weight=...)" if key == "weight" else "Covariates(bsa=...) (or weight and height, from which the patient loader computes it)"
            raise _located(
                f"{what}: a dose in {unit} needs the patient's {label} [{cov_unit}], which is missing; give {fix}",
                src, examples=False,
            )
        value = float(value)
        return amount * value, f"{_num(amount)} {unit} x {_num(value)} {cov_unit}"

    def end_or_horizon(self, st, t: float, src) -> float:
        if self.horizon is None:
            raise _located(
                f"'{st}' has no end (no 'for ...'); give expand(..., horizon=DAY) to say until when to plan it",
                src, examples=False,
            )
        return self.horizon

    def dose(self, d: Dose, t: float, src, nxt) -> float:
        """Add the events of ``d`` starting at ``t``; return the step's end time."""
        amount, note = self.per_patient(d.amount, d.unit, str(d), src)
        if d.days_of_cycle is None:
            if d.every is None:
                offsets = np.array([0.0])
                end = t
                if isinstance(nxt, (Dose, Combination)):
                    # a loading dose: the maintenance schedule of the same drug starts one interval later
                    follow = [x for x in ([nxt] if isinstance(nxt, Dose) else nxt.steps) if isinstance(x, Dose) and x.drug == d.drug]
                    if follow and follow[0].every is not None and follow[0].days_of_cycle is None:
                        end = t + follow[0].every
            else:
                if d.doses is not None or d.cycles is not None:
                    n = d.doses if d.doses is not None else d.cycles
                    end = t + n * d.every
                elif d.for_days is not None:
                    end = t + d.for_days
                    n = int(math.ceil(d.for_days / d.every - _EPS))
                else:
                    end = self.end_or_horizon(d, t, src)
                    n = int(math.ceil((end - t) / d.every - _EPS))
                offsets = np.arange(max(n, 0)) * d.every
        else:
            per_day = 1 if d.every is None else int(round(1.0 / d.every))
            step = 0.0 if d.every is None else d.every
            within = np.array([(day - 1) + j * step for day in d.days_of_cycle for j in range(per_day)])
            L = d.cycle_length
            if d.cycles is not None:
                n_cycles, end = d.cycles, t + d.cycles * L
            elif d.for_days is not None:
                n_cycles, end = int(math.ceil(d.for_days / L - _EPS)), t + d.for_days
            elif d.doses is not None:
                n_cycles = int(math.ceil(d.doses / len(within)))
                end = t + n_cycles * L
            else:
                end = self.end_or_horizon(d, t, src)
                n_cycles = int(math.ceil((end - t) / L - _EPS))
            offsets = (np.arange(n_cycles)[:, None] * L + within[None, :]).ravel()
            if d.doses is not None:
                offsets = offsets[: d.doses]
            offsets = offsets[offsets < (end - t) - _EPS]
        for off in offsets:
            self.events.append([d.drug, t + float(off), amount, d.route, d.infusion, note, d])
        return end

    def step(self, st, t: float, src, nxt) -> float:
        if isinstance(st, Dose):
            return self.dose(st, t, src, nxt)
        if isinstance(st, Rest):
            return t + st.days
        if isinstance(st, Combination):
            ends = []
            for member in st.steps:
                if isinstance(member, Sequence):
                    tt = t
                    for k, s in enumerate(member.steps):
                        tt = self.step(s, tt, src, member.steps[k + 1] if k + 1 < len(member.steps) else None)
                    ends.append(tt)
                else:
                    ends.append(self.step(member, t, src, None))
            return max(ends)
        raise _located(f"cannot expand {type(st).__name__} here: {st}", src, examples=False)  # pragma: no cover

    def note_last(self, st, text: str) -> None:
        targets = {id(x) for x in ([st] if isinstance(st, Dose) else getattr(st, "steps", ()))}
        for ev in self.events:
            if id(ev[6]) in targets:
                ev[5] = f"{ev[5]}; {text}" if ev[5] else text

    def regimen(self, arm: str) -> Regimen:
        ev = self.events
        if self.horizon is not None:
            ev = [e for e in ev if e[1] < self.horizon - _EPS]
        ev = sorted(ev, key=lambda e: (e[0], e[1]))
        rows: list[dict] = []
        for drug, time, amount, route, duration, note, _ in ev:
            r = rows[-1] if rows else None
            same = r is not None and (r["drug"], r["amount"], r["route"], r["duration"], r["note"]) == (drug, amount, route, duration, note)
            if same and r["count"] == 1 and time - r["time"] > _EPS:
                r["interval"], r["count"] = time - r["time"], 2
                continue
            if same and r["count"] > 1 and abs(time - (r["time"] + r["count"] * r["interval"])) < 1e-7:
                r["count"] += 1
                continue
            rows.append({"arm": arm, "drug": drug, "time": time, "amount": amount, "route": route,
                         "duration": duration, "interval": None, "count": 1, "note": note})
        return Regimen.from_records(rows)


def _apply_reductions(ctx: _Context, reductions, flat) -> None:
    given = {d for s, _ in flat for d in _drugs_of(s) if not isinstance(s, DoseReduction)}
    for red, src in sorted(reductions, key=lambda r: r[0].after):
        if red.drug not in given:
            raise _located(f"'{red}': the protocol gives no {red.drug}; reduce a drug that it gives", src)
        t0 = ctx.start + red.after
        if red.amount is not None:
            new, how = ctx.per_patient(red.amount, red.unit, str(red), src)
        for ev in ctx.events:
            if ev[0] != red.drug or ev[1] < t0 - _EPS:
                continue
            if red.factor is not None:
                ev[2] = ev[2] * red.factor
                text = f"reduced by {1e2 * (1 - red.factor):.10g}% from day {_num(red.after)}"
            else:
                if new > ev[2] + _EPS:
                    raise _located(
                        f"'{red}': {_num(new)} mg is more than the planned {_num(ev[2])} mg; a reduction must lower the dose",
                        src, examples=False,
                    )
                ev[2] = new
                text = f"reduced to {_num(red.amount)} {red.unit} from day {_num(red.after)}"
            ev[5] = f"{ev[5]}; {text}" if ev[5] else text
