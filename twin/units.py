"""Unit parsing and normalisation at the edges (files, protocols, CLI).

Inside twin every quantity is a float in a canonical unit: time in days, drug amounts
in mg, tumour volume in mm³, lengths in mm, concentrations as listed in
:mod:`twin.observables`. Strings such as ``"7.5 mg"``, ``"ng/mL"`` or ``"mg/m2"`` are
parsed here with `pint <https://pint.readthedocs.io>`_ and never inside the numerics.
"""

from __future__ import annotations

import functools
import re

from .errors import InputError

__all__ = ["registry", "conversion_factor", "parse_quantity", "normalise_unit_text", "is_readable_unit", "UnitError"]


class UnitError(InputError):
    """A unit string could not be parsed or converted."""


# Spellings found in clinical files that pint does not read as intended.
_ALIASES = {
    "µ": "u",
    "μ": "u",
    "mcg": "ug",
    "cc": "cm**3",
    "mm3": "mm**3",
    "cm3": "cm**3",
    "m2": "m**2",
    "mm^3": "mm**3",
    "cm^3": "cm**3",
    "m^2": "m**2",
    "mm³": "mm**3",
    "cm³": "cm**3",
    "m²": "m**2",
}


@functools.lru_cache(maxsize=1)
def registry():
    """The shared pint registry (created on first use; pint is not imported by ``import twin``)."""
    import pint

    ureg = pint.UnitRegistry(autoconvert_offset_to_baseunit=True)
    ureg.define("international_unit = [biological_activity] = IU")
    ureg.define("unit_activity = international_unit = U")
    # Genome copies (ctDNA) and cells are counts.
    ureg.define("copies = [] = copy")
    ureg.define("cells = [] = cell")
    return ureg


@functools.lru_cache(maxsize=1024)
def normalise_unit_text(text: str) -> str:
    """Rewrite common clinical spellings ('µg/L', 'mg/m2', 'mm3', 'mcg') into pint syntax."""
    s = str(text).strip()
    for k in ("µ", "μ"):
        s = s.replace(k, "u")
    s = s.replace("³", "**3").replace("²", "**2").replace("^", "**")
    s = re.sub(r"\bmcg\b", "ug", s)
    s = re.sub(r"\bcc\b", "cm**3", s)
    # 'mm3', 'cm3', 'm2' -> powers; careful not to touch 'mg' etc.
    s = re.sub(r"\b(mm|cm|dm|m|um)([23])\b", r"\1**\2", s)
    return s


@functools.lru_cache(maxsize=512)
def _parse_unit(text: str):
    ureg = registry()
    if not str(text).strip():
        raise UnitError("empty unit")
    try:
        return ureg.parse_units(normalise_unit_text(text))
    except Exception as exc:  # pint raises several types
        raise UnitError(f"cannot read unit {text!r}: {exc}") from None


def is_readable_unit(text: str) -> bool:
    """True when pint reads ``text`` (clinical spellings accepted) as a unit."""
    try:
        _parse_unit(str(text))
        return True
    except UnitError:
        return False


def conversion_factor(unit: str, canonical: str, *, molar_mass: float | None = None) -> float:
    """Factor ``f`` such that ``value [unit] * f = value [canonical]`` (cached; see ``_conversion_factor``)."""
    return _conversion_factor(str(unit), str(canonical), molar_mass)


@functools.lru_cache(maxsize=1024)
def _conversion_factor(unit: str, canonical: str, molar_mass: float | None = None) -> float:
    """Factor ``f`` such that ``value [unit] * f = value [canonical]``.

    Parameters
    ----------
    unit, canonical : unit strings (clinical spellings accepted).
    molar_mass : g/mol, allows conversion between mass and molar concentrations
        (e.g. testosterone ng/dL <-> nmol/L).

    Raises
    ------
    UnitError
        if either unit cannot be parsed or the dimensions differ.
    """
    if unit.strip() and normalise_unit_text(unit) == normalise_unit_text(canonical):
        return 1.0  # the same spelling: no need to load pint's registry (~0.5 s per process)
    ureg = registry()
    src = _parse_unit(unit)
    dst = _parse_unit(canonical)
    q = ureg.Quantity(1.0, src)
    try:
        return float(q.to(dst).magnitude)
    except Exception:
        pass
    if molar_mass is not None:
        mm = ureg.Quantity(molar_mass, "g/mol")
        for candidate in (q / mm, q * mm):
            try:
                return float(candidate.to(dst).magnitude)
            except Exception:
                continue
    raise UnitError(
        f"unit {unit!r} cannot be converted to {canonical!r} "
        f"(dimension {ureg.Quantity(1.0, src).dimensionality} vs {ureg.Quantity(1.0, dst).dimensionality})"
    )


def parse_quantity(text: str | float | int, canonical: str, *, default_unit: str | None = None) -> float:
    """Parse ``"160 lb"`` or ``72`` into a float in ``canonical`` units.

    A bare number is taken to be in ``default_unit`` (or ``canonical``).
    """
    if isinstance(text, bool):
        raise UnitError(f"expected a quantity such as '72 kg', received {text!r}")
    if isinstance(text, (int, float)):
        return float(text) * (conversion_factor(default_unit, canonical) if default_unit else 1.0)
    s = str(text).strip()
    m = re.fullmatch(r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?)\s*(.*)", s)
    if not m:
        raise UnitError(f"expected a number with a unit such as '72 kg', received {text!r}")
    value = float(m.group(1))
    unit = m.group(2).strip() or default_unit or canonical
    return value * conversion_factor(unit, canonical)
