"""Scenario files: named treatment arms, a horizon, visits and outcome definitions (TOML).

A scenario file (``docs/how-to/write-a-scenario.md`` documents the grammar)::

    [scenario]
    name = "adt"
    horizon = "2 years"          # or a number of days
    visits = "every 4 weeks"     # or a list of days / durations, starting at 0
    seed = 1
    replicates = 1

    [[arm]]
    name = "continuous"
    protocol = "leuprolide 7.5 mg im every 4 weeks"

    [[arm]]
    name = "adaptive"
    policy = "zhang"             # or "bruchovsky", "skip", "continuous", {name = ...}, {rule = "..."}
    treat = "leuprolide 7.5 mg im every 4 weeks"

    [outcomes]
    criteria = ["pcwg3_psa"]
    resistance_threshold = 0.5
    resistance_horizon = "1 year"

:meth:`Scenario.from_toml` and :meth:`Scenario.from_dict` return a typed :class:`Scenario`
(arms as :class:`Arm`, protocols as :class:`scenarios.protocol.Protocol`, policies as
:class:`scenarios.policy.Policy`). Every problem in a file is collected and reported in one
:class:`ScenarioError`, each located by file, key path (``arm[2].protocol``; arms count from
1) and line, with close matches for unknown keys and names, the protocol's own located
message for protocol strings, and a valid example.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from twin.errors import InputError, close_matches
from twin.regimen import Regimen

from .outcomes import CRITERIA
from .policy import Policy, RuleError, make_policy, parse_duration
from .protocol import Protocol, ProtocolError, Switch

__all__ = [
    "Scenario",
    "Arm",
    "OutcomeSpec",
    "ScenarioError",
    "SCENARIO_EXAMPLE",
    "LIBRARY",
    "library_path",
    "policy_doses",
]

#: A valid scenario file, shown at the end of every scenario-file error.
SCENARIO_EXAMPLE = '''\
[scenario]
name = "adt_continuous_vs_adaptive"
horizon = "2 years"
visits = "every 4 weeks"
seed = 1

[[arm]]
name = "continuous"
protocol = "leuprolide 7.5 mg im every 4 weeks"

[[arm]]
name = "adaptive"
policy = "zhang"
treat = "leuprolide 7.5 mg im every 4 weeks"

[outcomes]
criteria = ["pcwg3_psa"]
'''

#: The folder of the bundled scenario files.
LIBRARY = Path(__file__).resolve().parent / "library"

_TOP_KEYS = ("scenario", "arm", "outcomes")
_SCENARIO_KEYS = ("name", "description", "horizon", "visits", "seed", "replicates", "mutation_rate")
_ARM_KEYS = ("name", "description", "protocol", "policy", "treat", "background", "limits")
_OUTCOME_KEYS = ("criteria", "resistance_threshold", "resistance_horizon")
_EPS = 1e-9


def library_path(name: str) -> Path:
    """The path of a bundled scenario file (``"mtd_vs_metronomic"`` or with ``.toml``)."""
    stem = str(name)[:-5] if str(name).endswith(".toml") else str(name)
    path = LIBRARY / f"{stem}.toml"
    if not path.is_file():
        names = sorted(p.stem for p in LIBRARY.glob("*.toml"))
        raise InputError(f"no bundled scenario {name!r}; bundled: {names}.{close_matches(stem, names)}")
    return path


# -- errors --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScenarioProblem:
    """One located problem: key path (``arm[2].protocol``), file line and column (or None)."""

    key: str
    message: str
    line: int | None = None
    column: int | None = None

    def format(self, file: str) -> str:
        where = file
        if self.line is not None:
            where += f":{self.line}" + (f":{self.column}" if self.column is not None else "")
        if self.key:
            where += f" [{self.key}]"
        return f"{where}: {self.message}"


class ScenarioError(InputError):
    """A scenario file (or dict) is wrong; ``problems`` lists every located problem."""

    def __init__(self, file: str, problems: list[ScenarioProblem]):
        self.file = str(file)
        self.problems = list(problems)
        head = f"scenario {self.file}: {len(self.problems)} problem(s)"
        body = "\n".join(p.format(self.file) for p in self.problems)
        super().__init__(f"{head}\n{body}\nA valid scenario file looks like:\n{_indent(SCENARIO_EXAMPLE)}")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


class _Lines:
    """Where keys sit in the TOML text: key path -> (line, column of the value)."""

    _HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]?\s*(#.*)?$")
    _KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\")\s*=\s*")

    def __init__(self, text: str | None):
        self.where: dict[str, tuple[int, int]] = {}
        if not text:
            return
        prefix, arm_count, in_multiline = "", 0, False
        for i, line in enumerate(text.splitlines(), start=1):
            if in_multiline:
                if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                    in_multiline = False
                continue
            h = self._HEADER.match(line)
            if h:
                name = h.group(2).strip().replace('"', "")
                parts = name.split(".")
                if h.group(1) == "[[" and parts[0] == "arm" and len(parts) == 1:
                    arm_count += 1
                    prefix = f"arm[{arm_count}]"
                elif parts[0] == "arm" and arm_count:
                    prefix = ".".join([f"arm[{arm_count}]"] + parts[1:])
                else:
                    prefix = name
                self.where.setdefault(prefix, (i, 1))
                continue
            k = self._KEY.match(line)
            if k:
                key = k.group(1).strip('"')
                path = f"{prefix}.{key}" if prefix else key
                self.where.setdefault(path, (i, k.end() + 1))
                rest = line[k.end():]
                for q in ('"""', "'''"):
                    if rest.startswith(q) and rest.count(q) == 1:
                        in_multiline = True

    def line(self, key: str) -> int | None:
        k = key
        while k:
            if k in self.where:
                return self.where[k][0]
            k = k.rsplit(".", 1)[0] if "." in k else ""
        return None

    def value_pos(self, key: str) -> tuple[int, int] | None:
        return self.where.get(key)


# -- the typed scenario --------------------------------------------------------------------------
@dataclass(frozen=True)
class OutcomeSpec:
    """Which outcomes a scenario asks for.

    Attributes
    ----------
    criteria : names of progression criteria (``scenarios.outcomes.CRITERIA``:
        "recist_sld", "recist_volume", "pcwg3_psa"); the first also defines "progression"
        for arms that switch at progression.
    resistance_threshold : a draw is resistant once its resistant fraction exceeds this (0-1).
    resistance_horizon : [day] the time for the probability of resistance (None: the
        scenario horizon).
    """

    criteria: tuple[str, ...] = ()
    resistance_threshold: float = 0.5
    resistance_horizon: float | None = None

    def __post_init__(self):
        crit = (self.criteria,) if isinstance(self.criteria, str) else tuple(self.criteria)
        for c in crit:
            if c not in CRITERIA:
                raise InputError(f"unknown progression criterion {c!r}; expected one of {list(CRITERIA)}.{close_matches(str(c), CRITERIA)}")
        if len(set(crit)) != len(crit):
            raise InputError(f"criteria {list(crit)} name a criterion twice")
        object.__setattr__(self, "criteria", crit)
        thr = self.resistance_threshold
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 < float(thr) < 1:
            raise InputError(f"resistance_threshold = {thr!r}: expected a fraction between 0 and 1, e.g. 0.5")
        object.__setattr__(self, "resistance_threshold", float(thr))
        if self.resistance_horizon is not None:
            h = parse_duration(self.resistance_horizon, "resistance_horizon")
            if not h > 0:
                raise InputError(f"resistance_horizon = {self.resistance_horizon!r} must be after day 0")
            object.__setattr__(self, "resistance_horizon", h)


@dataclass(frozen=True)
class Arm:
    """One treatment arm: a fixed protocol, or a policy deciding when to give ``treat``.

    Attributes
    ----------
    name : unique within the scenario.
    protocol : a fixed :class:`Protocol` (may contain a switch at progression/resistance).
    policy : an adaptive :class:`Policy` (with ``treat``); exclusive with ``protocol``.
    treat : the :class:`Protocol` given while the policy says "treat" (restarted from its
        first step at each switch to treat, amounts times the dose factor).
    background : a :class:`Protocol` given throughout, whatever the policy decides (e.g.
        continuous ADT under adaptive abiraterone).
    description : free text.
    """

    name: str
    protocol: Protocol | None = None
    policy: Policy | None = None
    treat: Protocol | None = None
    background: Protocol | None = None
    description: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"Arm(name={self.name!r}): give the arm a name (text)")
        for k in ("protocol", "treat", "background"):
            v = getattr(self, k)
            if isinstance(v, str):
                object.__setattr__(self, k, Protocol.parse(v))
            elif v is not None and not isinstance(v, Protocol):
                raise InputError(f"Arm({self.name}).{k} = {v!r}: expected a Protocol or protocol text")
        if self.policy is not None and not isinstance(self.policy, Policy):
            object.__setattr__(self, "policy", make_policy(self.policy))
        if (self.protocol is None) == (self.policy is None):
            raise InputError(
                f"arm {self.name!r}: give either protocol (a fixed plan) or policy (with treat), not "
                + ("both" if self.protocol is not None else "neither")
            )
        if self.policy is not None and self.treat is None:
            raise InputError(f"arm {self.name!r}: a policy needs treat (the protocol it gives or holds)")
        if self.policy is None and self.treat is not None:
            raise InputError(f"arm {self.name!r}: treat is only used with a policy; use protocol for a fixed plan")
        if self.policy is None and self.background is not None:
            raise InputError(f"arm {self.name!r}: background is only used with a policy; add the drug to the protocol with '+'")
        if self.treat is not None and any(isinstance(s, Switch) for s in self.treat.steps):
            raise InputError(
                f"arm {self.name!r}: treat must not contain a switch ('until progression ...'); "
                "the policy decides when it is given"
            )

    @property
    def adaptive(self) -> bool:
        """True when a policy decides at visits."""
        return self.policy is not None

    @property
    def switch_conditions(self) -> tuple[str, ...]:
        """The conditions ('progression', 'resistance', 'toxicity') this arm's protocol switches at."""
        if self.protocol is None:
            return ()
        return tuple(s.at for s in self.protocol.steps if isinstance(s, Switch))


@dataclass(frozen=True)
class Scenario:
    """A what-if scenario: arms compared over a horizon, with visits and outcomes.

    Attributes
    ----------
    name : identifier of the scenario.
    arms : the :class:`Arm` s (unique names).
    horizon : [day] end of the simulation.
    visits : [day] visit times, strictly increasing, the first at 0, none after the horizon:
        where policies decide and progression is assessed.
    outcomes : :class:`OutcomeSpec`.
    seed : random seed (stochastic resistance; recorded in the results).
    replicates : stochastic replicates per draw (>= 1; > 1 turns on stochastic acquired
        resistance, :func:`twin.resistance.acquired_resistance`).
    mutation_rate : probability per sensitive-cell division of a resistant daughter
        (``mu`` of the stochastic resistance; default 1e-7), in [0, 1].
    description : free text.
    source : the file it was read from (None for a dict).
    """

    name: str
    arms: tuple
    horizon: float
    visits: tuple
    outcomes: OutcomeSpec = field(default_factory=OutcomeSpec)
    seed: int = 0
    replicates: int = 1
    description: str = ""
    source: str | None = field(default=None, compare=False)
    mutation_rate: float = 1e-7

    def __post_init__(self):
        s = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"Scenario(name={self.name!r}): give the scenario a name")
        arms = tuple(self.arms)
        if not arms or not all(isinstance(a, Arm) for a in arms):
            raise InputError("Scenario: give at least one Arm")
        names = [a.name.lower() for a in arms]
        dup = sorted({a.name for a in arms if names.count(a.name.lower()) > 1})
        if dup:
            raise InputError(f"Scenario: arm names must be unique; repeated: {dup}")
        s("arms", arms)
        s("horizon", parse_duration(self.horizon, "horizon"))
        if not self.horizon > 0:
            raise InputError("horizon must be after day 0")
        s("visits", _visits(self.visits, self.horizon))
        if not isinstance(self.outcomes, OutcomeSpec):
            raise InputError(f"Scenario.outcomes = {self.outcomes!r}: expected an OutcomeSpec")
        if self.outcomes.resistance_horizon is not None and self.outcomes.resistance_horizon > self.horizon + _EPS:
            raise InputError(
                f"resistance_horizon = {self.outcomes.resistance_horizon:g} days is after the scenario horizon ({self.horizon:g} days)"
            )
        if any("progression" in a.switch_conditions for a in arms) and not self.outcomes.criteria:
            raise InputError(
                "an arm switches at progression: name the progression criterion in [outcomes] criteria "
                f"(one of {list(CRITERIA)})"
            )
        for k, lo in (("seed", 0), ("replicates", 1)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise InputError(f"{k} = {v!r}: expected a whole number >= {lo}")
            s(k, int(v))
        mu = self.mutation_rate
        if isinstance(mu, bool) or not isinstance(mu, (int, float, np.integer, np.floating)) or not 0 <= float(mu) <= 1:
            raise InputError(f"mutation_rate = {mu!r}: expected a probability per division in [0, 1], e.g. 1e-7")
        s("mutation_rate", float(mu))

    # construction -------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> "Scenario":
        """Read a scenario file; raises :class:`ScenarioError` listing every located problem."""
        import tomllib

        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"scenario file {str(p)!r} does not exist") from None
        except UnicodeDecodeError as e:
            raise ScenarioError(str(p), [ScenarioProblem("", f"not UTF-8 text ({e.reason} at byte {e.start})")]) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg = str(e)
            m = re.search(r"\(at line (\d+), column (\d+)\)", msg)
            line, col = (int(m.group(1)), int(m.group(2))) if m else (None, None)
            reason = re.sub(r"\s*\(at line \d+, column \d+\)", "", msg).strip() or "invalid TOML"
            if m and line is not None:
                lines = text.splitlines()
                if 0 < line <= len(lines):
                    reason += f"\n    {lines[line - 1]}\n    {' ' * max(col - 1, 0)}^"
            raise ScenarioError(str(p), [ScenarioProblem("", f"not valid TOML: {reason}", line, col)]) from None
        return cls.from_dict(data, source=str(p), _text=text)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>", _text: str | None = None) -> "Scenario":
        """Build from the parsed TOML structure (a dict); same checks and messages as files."""
        b = _Builder(source, _text)
        return b.build(data)

    # views --------------------------------------------------------------------------------
    @property
    def arm_names(self) -> list[str]:
        return [a.name for a in self.arms]

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise InputError(f"no arm {name!r}; arms: {self.arm_names}.{close_matches(name, self.arm_names)}")

    @property
    def visit_times(self) -> np.ndarray:
        return np.asarray(self.visits, float)


def _visits(value: Any, horizon: float) -> tuple[float, ...]:
    if isinstance(value, str):
        m = re.fullmatch(r"\s*every\s+(.+?)\s*", value, re.I)
        if not m:
            raise InputError(
                f"visits = {value!r}: expected 'every <duration>' (e.g. 'every 4 weeks') or a list of days "
                "starting at 0 (e.g. [0, 28, 56, 84] or ['0 days', '12 weeks'])"
            )
        step = parse_duration(m.group(1), "visits")
        if not step > 0:
            raise InputError(f"visits = {value!r}: the interval must be positive")
        n = int(math.floor(horizon / step + _EPS))
        return tuple(float(k * step) for k in range(n + 1))
    if isinstance(value, (list, tuple, np.ndarray)):
        times = tuple(parse_duration(v, f"visits[{i + 1}]") for i, v in enumerate(value))
        if not times:
            raise InputError("visits = []: give at least the visit at day 0")
        if times[0] != 0:
            raise InputError(
                f"visits: the first visit must be at day 0 (where policies take their baseline), received {times[0]:g}"
            )
        bad = [f"{a:g} then {b:g}" for a, b in zip(times, times[1:]) if not b > a]
        if bad:
            raise InputError(f"visits must be strictly increasing; found {', '.join(bad)}")
        if times[-1] > horizon + _EPS:
            raise InputError(f"visits: day {times[-1]:g} is after the horizon ({horizon:g} days)")
        return times
    raise InputError(
        f"visits = {value!r} ({type(value).__name__}): expected 'every 4 weeks' or a list of days starting at 0"
    )


# -- the file builder ----------------------------------------------------------------------------
class _Builder:
    def __init__(self, source: str, text: str | None):
        self.source = source
        self.text = text
        self.lines = _Lines(text)
        self.problems: list[ScenarioProblem] = []

    def problem(self, key: str, message: str, *, line: int | None = None, column: int | None = None) -> None:
        if line is None:
            line = self.lines.line(key)
        self.problems.append(ScenarioProblem(key, message, line, column))

    def unknown_keys(self, table: Mapping, allowed: tuple[str, ...], prefix: str) -> None:
        for k in table:
            if k not in allowed:
                where = f"{prefix}.{k}" if prefix else str(k)
                self.problem(where, f"unknown key {k!r}; expected one of {list(allowed)}.{close_matches(str(k), allowed)}")

    def table(self, data: Mapping, key: str, required: bool) -> Mapping | None:
        v = data.get(key)
        if v is None:
            if required:
                self.problem(key, f"missing [{key}] table")
            return None
        if not isinstance(v, Mapping):
            self.problem(key, f"{key} must be a table ([{key}]), received {type(v).__name__}")
            return None
        return v

    def guarded(self, key: str, fn):
        try:
            return fn()
        except (ProtocolError, RuleError) as e:
            self.located_text_error(key, e)
        except InputError as e:
            self.problem(key, str(e))
        return None

    def located_text_error(self, key: str, e) -> None:
        """A protocol/rule error: keep its own message; add the file line/column when known."""
        line = column = None
        pos = self.lines.value_pos(key)
        if pos is not None and getattr(e, "line", None) is not None and self.text is not None:
            fline, vcol = pos
            src = self.text.splitlines()[fline - 1]
            rest = src[vcol - 1:]
            if rest.startswith('"""') or rest.startswith("'''"):
                after = rest[3:]
                # TOML trims a newline right after the opening quotes
                line, column = (fline + e.line, e.column) if not after.strip() else (fline + e.line - 1, e.column + (vcol + 2 if e.line == 1 else 0))
            elif rest[:1] in ('"', "'") and e.line == 1:
                line, column = fline, vcol + e.column
        if line is None:
            line = self.lines.line(key)
        kind = "protocol" if isinstance(e, ProtocolError) else "rule"
        self.problems.append(ScenarioProblem(key, f"{kind} text: {e}", line, column))

    def build(self, data: Any) -> Scenario:
        if not isinstance(data, Mapping):
            raise ScenarioError(self.source, [ScenarioProblem("", f"expected a table of tables, received {type(data).__name__}")])
        self.unknown_keys(data, _TOP_KEYS, "")
        sc = self.table(data, "scenario", True) or {}
        self.unknown_keys(sc, _SCENARIO_KEYS, "scenario")

        name = sc.get("name")
        if sc and (not isinstance(name, str) or not name.strip()):
            self.problem("scenario.name", f"name = {name!r}: give the scenario a name (text)" if name is not None else "missing name")
        description = sc.get("description", "")
        if not isinstance(description, str):
            self.problem("scenario.description", f"description must be text, received {type(description).__name__}")
            description = ""
        horizon = None
        if "horizon" not in sc:
            if sc:
                self.problem("scenario.horizon", "missing horizon (e.g. horizon = \"2 years\" or a number of days)")
        else:
            horizon = self.guarded("scenario.horizon", lambda: parse_duration(sc["horizon"], "horizon"))
            if horizon is not None and not horizon > 0:
                self.problem("scenario.horizon", f"horizon = {sc['horizon']!r} must be after day 0")
                horizon = None
        visits = None
        if "visits" not in sc:
            if sc:
                self.problem("scenario.visits", "missing visits (e.g. visits = \"every 4 weeks\" or [0, 28, 56])")
        elif horizon is not None:
            visits = self.guarded("scenario.visits", lambda: _visits(sc["visits"], horizon))
        seed = sc.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            self.problem("scenario.seed", f"seed = {seed!r}: expected a whole number >= 0")
        reps = sc.get("replicates", 1)
        if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
            self.problem("scenario.replicates", f"replicates = {reps!r}: expected a whole number >= 1")
        mu = sc.get("mutation_rate", 1e-7)
        if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not 0 <= mu <= 1:
            self.problem("scenario.mutation_rate", f"mutation_rate = {mu!r}: expected a probability per division in [0, 1], e.g. 1e-7")

        arms = self.arms(data.get("arm"), "arm" in data)
        outcomes = self.outcomes(data.get("outcomes"))
        if outcomes is not None and horizon is not None and outcomes.resistance_horizon is not None \
                and outcomes.resistance_horizon > horizon + _EPS:
            self.problem("outcomes.resistance_horizon",
                         f"resistance_horizon ({outcomes.resistance_horizon:g} days) is after the scenario horizon ({horizon:g} days)")
        if outcomes is not None and not outcomes.criteria:
            for i, a in enumerate(arms, start=1):
                if a is not None and "progression" in a.switch_conditions:
                    self.problem(f"arm[{i}].protocol",
                                 f"arm {a.name!r} switches at progression: name the criterion in [outcomes] criteria "
                                 f"(one of {list(CRITERIA)})")
        if self.problems:
            raise ScenarioError(self.source, self.problems)
        try:
            return Scenario(name=name, arms=tuple(arms), horizon=horizon, visits=visits, outcomes=outcomes,
                            seed=seed, replicates=reps, description=description, source=self.source,
                            mutation_rate=mu)
        except InputError as e:  # pragma: no cover - the checks above come first
            raise ScenarioError(self.source, [ScenarioProblem("", str(e))]) from None

    def arms(self, value: Any, present: bool) -> list:
        if not present:
            self.problem("arm", "no arms: add at least one [[arm]] table with a name and a protocol or policy")
            return []
        if isinstance(value, Mapping):
            self.problem("arm", "write each arm as [[arm]] (an array of tables), not [arm]")
            return []
        if not isinstance(value, list) or not value:
            self.problem("arm", "no arms: add at least one [[arm]] table with a name and a protocol or policy")
            return []
        out, seen = [], {}
        for i, a in enumerate(value, start=1):
            key = f"arm[{i}]"
            if not isinstance(a, Mapping):
                self.problem(key, f"expected a table, received {type(a).__name__}")
                continue
            out.append(self.arm(a, key, seen))
        return out

    def arm(self, a: Mapping, key: str, seen: dict) -> Arm | None:
        self.unknown_keys(a, _ARM_KEYS, key)
        name = a.get("name")
        n_before = len(self.problems)
        if not isinstance(name, str) or not name.strip():
            self.problem(f"{key}.name", "missing name" if name is None else f"name = {name!r}: expected text")
            name = None
        elif name.lower() in seen:
            self.problem(f"{key}.name", f"arm name {name!r} is already used by {seen[name.lower()]}; arm names must be unique")
        else:
            seen[name.lower()] = key
        label = f"arm {name!r}" if name else key
        has_protocol, has_policy = "protocol" in a, "policy" in a
        if has_protocol and has_policy:
            self.problem(key, f"{label}: give either protocol (a fixed plan) or policy (with treat), not both")
        elif not has_protocol and not has_policy:
            self.problem(key, f"{label}: give protocol = \"...\" (a fixed plan) or policy = \"zhang\" with treat = \"...\"")
        if has_policy and "treat" not in a:
            self.problem(f"{key}.policy", f"{label}: a policy needs treat = \"...\" (the protocol it gives or holds)")
        for k, needs in (("treat", "policy"), ("background", "policy"), ("limits", "policy")):
            if k in a and not has_policy:
                hint = {"limits": "; for a fixed plan with limits use policy = \"continuous\" and treat = \"...\"",
                        "background": "; add the drug to the protocol with '+'",
                        "treat": "; use protocol = \"...\" for a fixed plan"}[k]
                self.problem(f"{key}.{k}", f"{label}: {k} is only used with a policy{hint}")
        protocols = {}
        for k in ("protocol", "treat", "background"):
            if k not in a:
                continue
            v = a[k]
            if not isinstance(v, str):
                self.problem(f"{key}.{k}", f"{k} must be protocol text, e.g. \"leuprolide 7.5 mg im every 4 weeks\"; received {type(v).__name__}")
                continue
            protocols[k] = self.guarded(f"{key}.{k}", lambda v=v: Protocol.parse(v))
        if protocols.get("treat") is not None and any(isinstance(s, Switch) for s in protocols["treat"].steps):
            self.problem(f"{key}.treat", f"{label}: treat must not switch ('until progression ...'); the policy decides when it is given")
        policy = None
        if has_policy:
            limits = a.get("limits")
            if limits is not None and not isinstance(limits, Mapping):
                self.problem(f"{key}.limits", f"limits must be a table, e.g. {{max_duration = \"1 year\"}}; received {type(limits).__name__}")
                limits = None
            spec = a["policy"]
            pkey = f"{key}.policy.rule" if isinstance(spec, Mapping) and "rule" in spec else f"{key}.policy"
            policy = self.guarded(pkey, lambda: make_policy(spec))
            if policy is not None and limits:
                policy = self.guarded(f"{key}.limits", lambda: make_policy(policy, limits=limits))
        description = a.get("description", "")
        if not isinstance(description, str):
            self.problem(f"{key}.description", "description must be text")
            description = ""
        if len(self.problems) > n_before:
            return None
        try:
            return Arm(name, protocol=protocols.get("protocol"), policy=policy, treat=protocols.get("treat"),
                       background=protocols.get("background"), description=description)
        except InputError as e:  # pragma: no cover - the checks above come first
            self.problem(key, str(e))
            return None

    def outcomes(self, value: Any) -> OutcomeSpec | None:
        if value is None:
            return OutcomeSpec()
        if not isinstance(value, Mapping):
            self.problem("outcomes", f"outcomes must be a table ([outcomes]), received {type(value).__name__}")
            return None
        self.unknown_keys(value, _OUTCOME_KEYS, "outcomes")
        ok = True
        crit = value.get("criteria", [])
        if isinstance(crit, str):
            crit = [crit]
        if not isinstance(crit, list) or not all(isinstance(c, str) for c in crit):
            self.problem("outcomes.criteria", f"criteria must be a list of names, e.g. [\"recist_sld\"]; received {crit!r}")
            ok = False
        else:
            for c in crit:
                if c not in CRITERIA:
                    self.problem("outcomes.criteria",
                                 f"unknown progression criterion {c!r}; expected one of {list(CRITERIA)}.{close_matches(c, CRITERIA)}")
                    ok = False
        kw = {}
        for k in ("resistance_threshold", "resistance_horizon"):
            if k in value:
                kw[k] = value[k]
        spec = None
        if ok:
            spec = self.guarded("outcomes", lambda: OutcomeSpec(criteria=tuple(crit), **kw))
            if spec is None:
                # re-locate at the offending key
                last = self.problems[-1]
                for k in kw:
                    if k in last.message:
                        self.problems[-1] = ScenarioProblem(f"outcomes.{k}", last.message, self.lines.line(f"outcomes.{k}"))
        return spec


# -- doses of a policy arm -----------------------------------------------------------------------
def policy_doses(treat: Protocol, *, anchor: float, start: float, stop: float, factor: float = 1.0,
                 covariates=None, arm: str = "main") -> Regimen:
    """The doses of ``treat`` in ``[start, stop)`` for a treatment period that began at ``anchor``.

    The runner calls it for each draw and visit interval where the policy says treat:
    ``anchor`` is the draw's ``PolicyState.phase_start`` (the protocol restarts from its first
    step at each switch to treat), ``factor`` the dose factor (amounts are multiplied by it;
    0 gives no doses).
    """
    if not stop > start >= anchor - _EPS:
        raise InputError(f"policy_doses: expected anchor <= start < stop, received {anchor}, {start}, {stop}")
    if not factor > 0:
        return Regimen.empty()
    ev = treat.expand(covariates, start=anchor, horizon=stop, arm=arm).events()
    ev = ev[ev["time"] >= start - _EPS].copy()
    ev["amount"] = ev["amount"] * float(factor)
    return Regimen.from_events(ev)
