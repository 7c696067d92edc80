"""Known observables, their canonical units and what they measure.

A patient file names each measurement by one of these observables (or by a custom one
declared in its ``patient.toml``); values are converted to the canonical unit at load time.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Observable", "OBSERVABLES", "canonical_observable"]


@dataclass(frozen=True)
class Observable:
    """A measurable quantity.

    Attributes
    ----------
    name : identifier used in files and results.
    unit : canonical unit (values are stored in it).
    description : one line.
    aliases : other spellings accepted in files (case-insensitive).
    molar_mass : g/mol, for converting mass <-> molar concentrations.
    positive : whether values must be > 0 (else >= 0).
    """

    name: str
    unit: str
    description: str
    aliases: tuple[str, ...] = ()
    molar_mass: float | None = None
    positive: bool = False


OBSERVABLES: dict[str, Observable] = {
    o.name: o
    for o in [
        Observable("tumor_volume", "mm**3", "tumour volume (caliper or imaging)", ("tumour_volume", "volume", "tv")),
        Observable("sld", "mm", "sum of longest diameters of target lesions (RECIST)", ("sum_longest_diameters", "lesion_size")),
        Observable("psa", "ng/mL", "prostate-specific antigen, serum", ("prostate_specific_antigen",)),
        Observable(
            "testosterone", "nmol/L", "serum testosterone", ("t", "serum_testosterone"), molar_mass=288.42
        ),
        Observable("ctdna", "copies/mL", "circulating tumour DNA, mutant copies per mL plasma", ("ctdna_copies",)),
        Observable("ctdna_vaf", "dimensionless", "circulating tumour DNA variant allele fraction (0-1)", ()),
        Observable("ca125", "U/mL", "cancer antigen 125", ("ca-125",)),
        Observable("cea", "ng/mL", "carcinoembryonic antigen", ()),
        Observable("ldh", "U/L", "lactate dehydrogenase", ()),
        Observable("body_weight", "kg", "body weight", ("weight", "bw")),
    ]
}


def canonical_observable(name: str, custom: dict[str, Observable] | None = None) -> Observable | None:
    """Look up an observable by name or alias (case-insensitive); ``None`` when unknown."""
    key = str(name).strip().lower()
    pool = dict(OBSERVABLES)
    if custom:
        pool.update(custom)
    if key in pool:
        return pool[key]
    for obs in pool.values():
        if key in obs.aliases:
            return obs
    return None
