"""`Patient` and `Cohort`: the in-memory form of patient files (canonical units inside).

Load with :func:`twin.load_patient` (folder bundle or single JSON/YAML file); write with
:func:`twin.save_patient`. See ``docs/patient-format.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import pandas as pd

from .errors import Problem
from .regimen import Regimen

__all__ = ["Patient", "Covariates", "Omics", "Cohort", "MEASUREMENT_COLUMNS"]

MEASUREMENT_COLUMNS = ("arm", "time", "observable", "value", "lloq", "below_lloq")


@dataclass(frozen=True)
class Covariates:
    """Baseline covariates in canonical units (``None`` when unknown).

    age [year], weight [kg], height [cm], bsa [m²] (Mosteller 1987 from weight and height
    when absent), sex, species.
    """

    age: float | None = None
    sex: str | None = None
    weight: float | None = None
    height: float | None = None
    bsa: float | None = None
    species: str = "human"


@dataclass(frozen=True)
class Omics:
    """Baseline molecular profile; any layer may be an empty table.

    mutations: gene, protein_change, vaf, classification, sample
    copy_number: gene, log2_ratio, copies, gistic, call, sample
    expression: gene, value, scale, sample
    protein: protein, value, scale, sample
    """

    mutations: pd.DataFrame = field(default_factory=pd.DataFrame)
    copy_number: pd.DataFrame = field(default_factory=pd.DataFrame)
    expression: pd.DataFrame = field(default_factory=pd.DataFrame)
    protein: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def layers(self) -> list[str]:
        """Names of the layers that hold data."""
        return [n for n in ("mutations", "copy_number", "expression", "protein") if len(getattr(self, n))]

    def mutated(self, gene: str) -> bool:
        m = self.mutations
        return bool(len(m)) and bool((m["gene"] == gene).any())


@dataclass(frozen=True, eq=False)
class Patient:
    """One patient (or one patient-derived tumour with several treatment arms).

    Attributes
    ----------
    id : pseudonymous identifier (the only patient field twin writes to logs).
    covariates : :class:`Covariates`.
    omics : :class:`Omics`.
    measurements : long table ``MEASUREMENT_COLUMNS`` (+ ``unit``, the canonical unit);
        time [day], value in the observable's canonical unit, NaN when censored.
    history : the administered doses as a :class:`~twin.regimen.Regimen`.
    phases : treatment phases (arm, cycle, phase on/off, start, end [day]); may be empty.
    labels : outcome labels from the file (e.g. ``relapse``).
    drugs, observables : declarations of names not in twin's catalogues.
    source : provenance (file path, format, SHA-256 of each file, dataset citation).
    notes : what the loader normalised or warned about while reading (nothing is silent).
    """

    id: str
    covariates: Covariates = field(default_factory=Covariates)
    omics: Omics = field(default_factory=Omics)
    measurements: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(MEASUREMENT_COLUMNS) + ["unit"]))
    history: Regimen = field(default_factory=Regimen.empty)
    phases: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["arm", "cycle", "phase", "start", "end"]))
    labels: dict = field(default_factory=dict)
    drugs: dict = field(default_factory=dict)
    observables: dict = field(default_factory=dict)
    time_origin: str | None = None
    source: dict = field(default_factory=dict)
    notes: tuple[Problem, ...] = ()

    @property
    def observed(self) -> list[str]:
        """Observables with at least one measurement."""
        return sorted(self.measurements["observable"].unique()) if len(self.measurements) else []

    @property
    def arms(self) -> list[str]:
        arms = set(self.measurements["arm"]) | set(self.history.table["arm"])
        return sorted(arms)

    def series(self, observable: str, arm: str = "main") -> pd.DataFrame:
        """Measurements of one observable in one arm, sorted by time."""
        m = self.measurements
        return m[(m["observable"] == observable) & (m["arm"] == arm)].sort_values("time").reset_index(drop=True)

    @property
    def follow_up(self) -> float:
        """Days from the first to the last record (measurement or dose)."""
        times = list(self.measurements["time"]) + list(self.history.table["time"])
        return float(max(times) - min(times)) if times else 0.0

    def __repr__(self) -> str:
        return (
            f"Patient(id={self.id!r}, {len(self.measurements)} measurements of {self.observed}, "
            f"{len(self.history)} dosing rows, omics={self.omics.layers})"
        )


@dataclass(frozen=True, eq=False)
class Cohort:
    """Many patients, by id (iteration order = insertion order)."""

    patients: tuple[Patient, ...]
    name: str = ""
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        ids = [p.id for p in self.patients]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"Cohort {self.name!r}: duplicate patient ids {dup}")

    def __len__(self) -> int:
        return len(self.patients)

    def __iter__(self) -> Iterator[Patient]:
        return iter(self.patients)

    def __getitem__(self, key: str | int) -> Patient:
        if isinstance(key, int):
            return self.patients[key]
        for p in self.patients:
            if p.id == key:
                return p
        from .errors import InputError, close_matches

        raise InputError(f"no patient {key!r} in cohort {self.name!r}.{close_matches(key, self.ids)}")

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.patients]

    def summary(self) -> pd.DataFrame:
        """One row per patient: arms, observables, measurement and dose counts, follow-up, omics layers."""
        return pd.DataFrame(
            [
                {
                    "id": p.id,
                    "arms": len(p.arms),
                    "observables": ",".join(p.observed),
                    "measurements": len(p.measurements),
                    "dosing_rows": len(p.history),
                    "follow_up_days": p.follow_up,
                    "omics": ",".join(p.omics.layers),
                    **{f"label_{k}": v for k, v in p.labels.items()},
                }
                for p in self.patients
            ]
        )

    def __repr__(self) -> str:
        return f"Cohort({self.name!r}, {len(self)} patients)"
