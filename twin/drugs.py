"""The drug catalogue: canonical names, synonyms, targets and class.

The catalogue ships as ``twin/data/drugs.toml``. Names in patient files are matched
case-insensitively against canonical names and synonyms; an unknown drug is an error
with close matches, unless the patient file declares it (``[drugs.NAME]`` in
``patient.toml``).
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, field
from importlib import resources

__all__ = ["Drug", "catalogue", "lookup_drug"]


@dataclass(frozen=True)
class Drug:
    """One drug.

    Attributes
    ----------
    name : canonical identifier (INN where one exists, lower case with underscores).
    synonyms : other names accepted in files (brand, code names, abbreviations).
    targets : HGNC symbols of the molecular targets.
    drug_class : short mechanism description.
    """

    name: str
    synonyms: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    drug_class: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)


@functools.lru_cache(maxsize=1)
def catalogue() -> dict[str, Drug]:
    """All drugs of the bundled catalogue, by canonical name."""
    text = resources.files("twin").joinpath("data/drugs.toml").read_text(encoding="utf-8")
    raw = tomllib.loads(text)
    out = {}
    for name, spec in raw.items():
        spec = dict(spec)
        out[name] = Drug(
            name=name,
            synonyms=tuple(s.lower() for s in spec.pop("synonyms", [])),
            targets=tuple(spec.pop("targets", [])),
            drug_class=spec.pop("class", ""),
            extra=spec,
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
