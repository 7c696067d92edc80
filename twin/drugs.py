"""The drug catalogue: canonical names, synonyms, targets, class, PK and potency.

The catalogue ships as ``twin/data/drugs.toml``. Names in patient files are matched
case-insensitively against canonical names and synonyms; an unknown drug is an error
with close matches, unless the patient file declares it (``[drugs.NAME]`` in
``patient.toml``).

Each drug table also carries human PK and potency parameters with their sources
(``pk_source``, ``potency_source``); they are parsed into a typed :class:`DrugPK`
(``Drug.pk``). Parameters not known from the literature are *population priors*:
class-typical values with a wide log-normal uncertainty (``*_sd_log``) and a
``note = "population prior: ..."``. Units (canonical, see ``docs/pk.md``):

=====================  ==========  ==============================================
key                    unit        meaning
=====================  ==========  ==============================================
``pk_model``           --          ``"1cpt"`` or ``"2cpt"``
``cl``                 L/day       clearance from the central compartment
``v``                  L           central volume
``q``                  L/day       inter-compartmental clearance (2cpt)
``v2``                 L           peripheral volume (2cpt)
``ka``                 1/day       first-order absorption rate (extravascular)
``f``                  --          absolute bioavailability (extravascular)
``apparent``           --          ``true``: cl, v, q, v2 are CL/F, V/F, ... (oral data)
``molar_mass``         g/mol       of the measured species (free base)
``fu``                 --          fraction unbound in plasma
``ic50_nm``            nM          potency (or ``ic50_mg_l`` in mg/L)
``ic50_basis``         --          ``"in_vitro"`` (applied to unbound plasma
                                   concentration, fu * C) or ``"plasma_total"``
``hill``, ``imax``     --          Hill coefficient and maximal inhibition
``standard_dose_mg``   mg          typical adult dose (70 kg, 1.8 m^2)
``standard_interval_day``  day     dosing interval
``standard_route``     --          oral | iv | sc | im | ip
``standard_duration_day``  day     infusion duration (0 = bolus)
``depot_unit_mg``      mg          a depot formulation's amount per standard interval:
                                   an extravascular dose of n x this amount is an
                                   n-interval depot (:func:`twin.pk.dose_table`)
``<param>_sd_log``     --          sd of log(param) (prior / between-patient)
``<param>_cv``         --          coefficient of variation (converted to sd_log)
=====================  ==========  ==============================================
"""

from __future__ import annotations

import functools
import math
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Mapping

__all__ = ["Drug", "DrugPK", "catalogue", "lookup_drug", "known_drug_names", "parse_drug_pk", "PK_PARAMETERS"]

#: PK parameters that may carry an uncertainty (``<name>_sd_log`` / ``<name>_cv``).
PK_PARAMETERS = ("cl", "v", "q", "v2", "ka", "f", "fu", "ic50", "hill")

_ROUTES = ("oral", "iv", "sc", "im", "ip")
_MODELS = ("1cpt", "2cpt")
_BASES = ("in_vitro", "plasma_total")
#: between-patient sd of log for literature PK parameters without a stated CV.
DEFAULT_SD_LOG = {"cl": 0.3, "v": 0.3, "q": 0.5, "v2": 0.5, "ka": 0.5, "f": 0.2, "fu": 0.3, "ic50": 1.0, "hill": 0.3}


@dataclass(frozen=True)
class DrugPK:
    """Human PK and potency of one catalogue drug (typed view of its TOML table).

    All values are for a typical adult (70 kg, 1.8 m^2 body-surface area) and are the
    *systemic* values used by :mod:`twin.pk`: where the source reports apparent oral
    values (CL/F, V/F), they are converted with ``f`` when ``f`` is known; otherwise
    ``f`` is 1 and the values stay apparent (equivalent for oral exposure; wrong for an
    IV dose of the same drug, which ``notes`` says).

    Attributes
    ----------
    model : "1cpt" or "2cpt".
    cl [L/day], v [L], q [L/day], v2 [L] : disposition (q, v2 ``None`` for 1cpt).
    ka [1/day] : first-order absorption rate for extravascular bolus doses (``None``
        if the drug is only given intravenously).
    f : bioavailability of extravascular doses.
    molar_mass [g/mol], fu : molar mass of the measured species; fraction unbound.
    ic50_mg_l [mg/L] : potency on the *total plasma* concentration (in-vitro values
        converted from nM with the molar mass and divided by ``fu``).
    hill, imax : Hill coefficient, maximal inhibition.
    standard_dose_mg, standard_interval_day, standard_route, standard_duration_day,
    standard_schedule : the usual adult regimen (dose used when an amount is not
        recorded, always with a flag).
    species : species of the parameters ("human").
    source, potency_source : citations.
    prior : True when the PK is a population prior (``note`` starts with
        "population prior"); ``potency_prior`` likewise for potency.
    sd_log : sd of log of each parameter (prior width or between-patient variability).
    notes : caveats (apparent values, non-linear PK linearised, ...).
    """

    model: str
    cl: float
    v: float
    q: float | None = None
    v2: float | None = None
    ka: float | None = None
    f: float = 1.0
    molar_mass: float | None = None
    fu: float | None = None
    ic50_mg_l: float | None = None
    hill: float = 1.0
    imax: float = 1.0
    standard_dose_mg: float | None = None
    standard_interval_day: float | None = None
    standard_route: str | None = None
    standard_duration_day: float = 0.0
    standard_schedule: str = ""
    depot_unit_mg: float | None = None
    species: str = "human"
    source: str = ""
    potency_source: str = ""
    prior: bool = False
    potency_prior: bool = False
    sd_log: Mapping[str, float] = field(default_factory=dict, compare=False, hash=False)
    notes: tuple[str, ...] = ()

    @property
    def half_life_day(self) -> float:
        """Terminal half-life [day] (of the disposition, not absorption)."""
        from .pk import disposition

        _, rates = disposition(self.params())
        return math.log(2.0) / float(min(rates))

    def params(self):
        """The PK as a :class:`twin.pk.PKParams` of scalars."""
        from .pk import PKParams

        return PKParams(cl=self.cl, v=self.v, q=self.q, v2=self.v2, ka=self.ka, f=self.f)

    def potency(self):
        """The potency as a :class:`twin.pk.Potency` (IC50 on total plasma concentration)."""
        from .pk import Potency

        if self.ic50_mg_l is None:
            return None
        return Potency(ic50=self.ic50_mg_l, hill=self.hill, imax=self.imax)


@dataclass(frozen=True)
class Drug:
    """One drug.

    Attributes
    ----------
    name : canonical identifier (INN where one exists, lower case with underscores).
    synonyms : other names accepted in files (brand, code names, abbreviations).
    targets : HGNC symbols of the molecular targets.
    drug_class : short mechanism description.
    extra : every other key of the drug's TOML table, as written.
    pk : typed PK and potency (:class:`DrugPK`) parsed from ``extra``, or ``None``.
    """

    name: str
    synonyms: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    drug_class: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    pk: DrugPK | None = field(default=None, compare=False, hash=False)


class _PKSpecError(ValueError):
    pass


def _num(spec: Mapping[str, Any], key: str, name: str, *, positive: bool = True, required: bool = False) -> float | None:
    if key not in spec:
        if required:
            raise _PKSpecError(f"drug {name!r}: PK key {key!r} is missing")
        return None
    val = spec[key]
    if isinstance(val, bool) or not isinstance(val, (int, float)):
        raise _PKSpecError(f"drug {name!r}: {key} = {val!r} is not a number")
    val = float(val)
    if not math.isfinite(val) or (positive and val <= 0):
        raise _PKSpecError(f"drug {name!r}: {key} = {val!r} must be a positive finite number")
    return val


def parse_drug_pk(name: str, spec: Mapping[str, Any]) -> DrugPK | None:
    """Parse the PK/potency keys of one drug table into a :class:`DrugPK`.

    Returns ``None`` if the table has no ``pk_model``. Raises ``ValueError`` with the
    drug name and key when a value is malformed or a required key is missing.
    """
    if "pk_model" not in spec:
        return None
    model = spec["pk_model"]
    if model not in _MODELS:
        raise _PKSpecError(f"drug {name!r}: pk_model = {model!r}; expected one of {list(_MODELS)}")
    notes: list[str] = []
    cl = _num(spec, "cl", name, required=True)
    v = _num(spec, "v", name, required=True)
    q = v2 = None
    if model == "2cpt":
        q = _num(spec, "q", name, required=True)
        v2 = _num(spec, "v2", name, required=True)
    elif "q" in spec or "v2" in spec:
        raise _PKSpecError(f"drug {name!r}: q/v2 given for a 1cpt model; set pk_model = \"2cpt\"")
    ka = _num(spec, "ka", name)
    f = _num(spec, "f", name)
    if f is not None and f > 1.0:
        raise _PKSpecError(f"drug {name!r}: f = {f} > 1")
    apparent = bool(spec.get("apparent", False))
    if apparent:
        if f is not None:
            # convert CL/F, V/F, Q/F, V2/F to systemic values
            cl, v = cl * f, v * f
            q = None if q is None else q * f
            v2 = None if v2 is None else v2 * f
        else:
            f = 1.0
            notes.append("bioavailability unknown: PK values are apparent (CL/F, V/F); exposure after an iv dose would be overestimated by 1/F")
    if f is None:
        f = 1.0
    molar_mass = _num(spec, "molar_mass", name)
    fu = _num(spec, "fu", name)
    if fu is not None and fu > 1.0:
        raise _PKSpecError(f"drug {name!r}: fu = {fu} > 1")
    hill = _num(spec, "hill", name) or 1.0
    imax = _num(spec, "imax", name) or 1.0
    basis = spec.get("ic50_basis", "in_vitro")
    if basis not in _BASES:
        raise _PKSpecError(f"drug {name!r}: ic50_basis = {basis!r}; expected one of {list(_BASES)}")
    ic50_nm = _num(spec, "ic50_nm", name)
    ic50_mg_l = _num(spec, "ic50_mg_l", name)
    if ic50_nm is not None and ic50_mg_l is not None:
        raise _PKSpecError(f"drug {name!r}: give ic50_nm or ic50_mg_l, not both")
    if ic50_nm is not None:
        if molar_mass is None:
            raise _PKSpecError(f"drug {name!r}: ic50_nm needs molar_mass [g/mol] to convert to mg/L")
        ic50_mg_l = ic50_nm * molar_mass * 1e-6  # nmol/L * g/mol = ng/L; * 1e-6 -> mg/L
    if ic50_mg_l is not None and basis == "in_vitro":
        if fu is None:
            raise _PKSpecError(f"drug {name!r}: ic50_basis = \"in_vitro\" needs fu (fraction unbound) to apply the IC50 to unbound plasma concentration; give fu or set ic50_basis = \"plasma_total\"")
        ic50_mg_l = ic50_mg_l / fu
    route = spec.get("standard_route")
    if route is not None and route not in _ROUTES:
        raise _PKSpecError(f"drug {name!r}: standard_route = {route!r}; expected one of {list(_ROUTES)}")
    if route in ("oral", "sc", "im", "ip") and ka is None and not spec.get("standard_duration_day"):
        raise _PKSpecError(f"drug {name!r}: extravascular standard route {route!r} needs ka [1/day]")
    sd_log: dict[str, float] = {}
    for p in PK_PARAMETERS:
        if f"{p}_sd_log" in spec:
            sd_log[p] = _num(spec, f"{p}_sd_log", name)
        elif f"{p}_cv" in spec:
            cv = _num(spec, f"{p}_cv", name)
            sd_log[p] = math.sqrt(math.log1p(cv * cv))
    note = str(spec.get("note", ""))
    prior = note.lower().startswith("population prior")
    potency_note = str(spec.get("potency_note", ""))
    potency_prior = potency_note.lower().startswith("population prior")
    if not prior:
        for p in ("cl", "v", "q", "v2", "ka", "f", "fu", "hill"):
            sd_log.setdefault(p, DEFAULT_SD_LOG[p])
    sd_log.setdefault("ic50", DEFAULT_SD_LOG["ic50"])
    for key in ("pk_note", "potency_note"):
        if spec.get(key):
            notes.append(str(spec[key]))
    if note:
        notes.insert(0, note)
    return DrugPK(
        model=model,
        cl=cl,
        v=v,
        q=q,
        v2=v2,
        ka=ka,
        f=f,
        molar_mass=molar_mass,
        fu=fu,
        ic50_mg_l=ic50_mg_l,
        hill=hill,
        imax=imax,
        standard_dose_mg=_num(spec, "standard_dose_mg", name),
        standard_interval_day=_num(spec, "standard_interval_day", name),
        standard_route=route,
        standard_duration_day=_num(spec, "standard_duration_day", name, positive=False) or 0.0,
        standard_schedule=str(spec.get("standard_schedule", "")),
        depot_unit_mg=_num(spec, "depot_unit_mg", name),
        species=str(spec.get("species", "human")),
        source=str(spec.get("pk_source", "")),
        potency_source=str(spec.get("potency_source", "")),
        prior=prior,
        potency_prior=potency_prior,
        sd_log=sd_log,
        notes=tuple(notes),
    )


@functools.lru_cache(maxsize=1)
def catalogue() -> dict[str, Drug]:
    """All drugs of the bundled catalogue, by canonical name."""
    text = resources.files("twin").joinpath("data/drugs.toml").read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    out = {}
    for name, spec in raw.items():
        spec = dict(spec)
        synonyms = tuple(s.lower() for s in spec.pop("synonyms", []))
        targets = tuple(spec.pop("targets", []))
        drug_class = spec.pop("class", "")
        out[name] = Drug(
            name=name,
            synonyms=synonyms,
            targets=targets,
            drug_class=drug_class,
            extra=spec,
            pk=parse_drug_pk(name, spec),
        )
    return out


@functools.lru_cache(maxsize=1)
def _index() -> dict[str, str]:
    idx = {}
    for name, drug in catalogue().items():
        idx[name.lower()] = name
        idx[name.lower().replace("_", " ")] = name
        for s in drug.synonyms:
            idx[s] = name
    return idx


def lookup_drug(name: str) -> Drug | None:
    """The catalogue entry for a name or synonym (case-insensitive), or ``None``."""
    key = str(name).strip().lower()
    canonical = _index().get(key) or _index().get(key.replace("-", "_"))
    return catalogue()[canonical] if canonical else None


def known_drug_names() -> list[str]:
    """Canonical names and synonyms, for 'did you mean' suggestions."""
    return sorted(_index())


def _pk_markdown() -> str:
    """The catalogue's PK table and per-drug sources as Markdown (the generated part of docs/pk.md).

    Regenerate the page's section with
    ``python -c "from twin.drugs import _pk_markdown; print(_pk_markdown())"``.
    """

    def g(x, n=3):
        return "–" if x is None else f"{x:.{n}g}"

    lines = [
        "| drug | model | CL [L/day] | V [L] | Q [L/day] | V2 [L] | ka [1/day] | F | t½ | IC50 total [mg/L] | h | standard regimen | PK | potency |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, d in catalogue().items():
        pk = d.pk
        if pk is None:
            lines.append(f"| `{name}` | – | – | – | – | – | – | – | – | – | – | – | none | none |")
            continue
        th = pk.half_life_day
        ths = f"{th * 24:.3g} h" if th < 2 else f"{th:.3g} d"
        reg = f"{pk.standard_dose_mg:g} mg {pk.standard_route} q{pk.standard_interval_day:g}d" if pk.standard_dose_mg else "–"
        if pk.standard_dose_mg and pk.standard_duration_day:
            reg += f" over {pk.standard_duration_day * 24:.3g} h"
        lines.append(
            f"| `{name}` | {pk.model} | {g(pk.cl)} | {g(pk.v)} | {g(pk.q)} | {g(pk.v2)} | {g(pk.ka)} | {g(pk.f, 2)} | {ths} | "
            f"{g(pk.ic50_mg_l)} | {g(pk.hill, 2)} | {reg} | {'prior' if pk.prior else 'literature'} | {'prior' if pk.potency_prior else 'literature'} |"
        )
    lines += ["", "### Sources and caveats per drug", ""]
    for name, d in catalogue().items():
        e = d.extra
        if d.pk is None:
            continue
        item = f"- **`{name}`**: PK: {e['pk_source']}."
        if e.get("note"):
            item += f" *Note:* {e['note']}."
        if e.get("pk_note"):
            item += f" *Caveat:* {e['pk_note']}."
        item += f" Potency: {e.get('potency_source', '')}."
        if e.get("potency_note"):
            item += f" *Potency note:* {e['potency_note']}."
        lines.append(item)
    return "\n".join(lines) + "\n"
