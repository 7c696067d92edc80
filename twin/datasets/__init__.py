"""Bundled real patient data (shipped inside the package; nothing is downloaded).

Two converted data sets ship as patient bundle folders under ``twin/data/`` (see
``docs/datasets.md`` and each folder's ``PROVENANCE.md``):

- **Bruchovsky IAD** (:func:`load_bruchovsky`): PSA and testosterone of 54 men of the
  Canadian phase II trial of intermittent androgen suppression (Bruchovsky 2006/2007) and
  13 of the Shaw 2007 cohort, with on/off cycles, dosing and the Hirata 2010 relapse labels.
- **Novartis PDXE** (:func:`load_pdxe`): tumour-volume curves of 208 patient-derived
  xenografts, one mouse per treatment arm (Gao 2015), with mutation / copy-number calls.

Every bundle passes the patient-file checks when loaded. The first load of a data set
validates every file (about 1 s for Bruchovsky, about 10 s for PDXE) and stores the
validated cohort in a cache keyed by the SHA-256 of the bundled files and of the twin
source files that decide validation (``twin/io/*.py``, ``patient.py``, ``regimen.py``,
``units.py``, ``observables.py``, ``drugs.py``, ``errors.py``, ``data/drugs.toml``; a change
to any of them re-validates); later loads in the same process are free and
loads in a new process read the cache (well under a second). Set ``TWIN_CACHE_DIR`` to move
the cache (default: ``$XDG_CACHE_HOME/twin`` or ``~/.cache/twin``) or ``TWIN_NO_CACHE=1``
to always validate.

>>> from twin.datasets import load_bruchovsky, load_pdxe
>>> cohort = load_bruchovsky("shaw")                       # doctest: +SKIP
>>> crc = load_pdxe(tissue="CRC")                          # doctest: +SKIP

Patients of a cached cohort are shared between calls: copy a table before changing it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
from importlib import resources
from pathlib import Path

__all__ = ["load_bruchovsky", "load_pdxe", "load_patient_example", "dataset_path", "EXAMPLE_PATIENT"]

#: The demo patient: relapse under IAD (Hirata 2010 class "with relapse"), 4 treatment
#: cycles, 42 PSA values; also one of the 7 Strobl 2021 benchmark fits.
EXAMPLE_PATIENT = "bruchovsky-101"

_SETS = ("bruchovsky", "pdxe")
_CACHE_FORMAT = 1
# twin files whose content decides what a validated patient looks like (with twin/io/*.py)
_VALIDATION_SOURCES = ("patient.py", "regimen.py", "errors.py", "units.py", "observables.py", "drugs.py", "data/drugs.toml")


def dataset_path(name: str) -> Path:
    """Folder of a bundled data set (``"bruchovsky"`` or ``"pdxe"``) inside the installed package."""
    if name not in _SETS:
        from ..errors import InputError, close_matches

        raise InputError(f"no bundled data set {name!r}; expected one of {', '.join(_SETS)}.{close_matches(name, _SETS)}")
    root = resources.files("twin").joinpath("data", name)
    if isinstance(root, Path):
        return root
    return _extracted(name)  # pragma: no cover - zipped installs only


@functools.lru_cache(maxsize=None)
def _extracted(name: str) -> Path:  # pragma: no cover - zipped installs only
    """Copy a data set out of a zipped package into a temporary folder (read_patient needs paths)."""
    out = Path(tempfile.mkdtemp(prefix=f"twin-{name}-"))

    def copy(trav, dest: Path):
        for child in trav.iterdir():
            if child.is_dir():
                (dest / child.name).mkdir()
                copy(child, dest / child.name)
            else:
                (dest / child.name).write_bytes(child.read_bytes())

    copy(resources.files("twin").joinpath("data", name), out)
    return out


def _fingerprint(root: Path) -> str:
    """SHA-256 over the data set's files and the twin sources that decide validation."""
    h = hashlib.sha256(f"format {_CACHE_FORMAT}\n{root}\n".encode())
    pkg = Path(__file__).resolve().parents[1]
    sources = [pkg / f for f in _VALIDATION_SOURCES if (pkg / f).exists()] + sorted((pkg / "io").glob("*.py"))
    for f in sorted(p for p in root.rglob("*") if p.is_file()) + sources:
        h.update(str(f.relative_to(root) if f.is_relative_to(root) else f.relative_to(pkg)).encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _cache_dir() -> Path | None:
    if os.environ.get("TWIN_NO_CACHE"):
        return None
    base = os.environ.get("TWIN_CACHE_DIR") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "twin")
    return Path(base) / "datasets"


@functools.lru_cache(maxsize=None)
def _cohort(name: str):
    """The whole bundled data set, validated once (then cached in memory and on disk)."""
    from ..io import load_cohort
    from ..patient import Cohort

    root = dataset_path(name)
    cache = _cache_dir()
    key = _fingerprint(root) if cache is not None else None
    if cache is not None:
        f = cache / f"{name}-{key[:32]}.pickle"
        try:
            with open(f, "rb") as fh:
                cohort = pickle.load(fh)  # written below by this function, keyed by content hash
            if isinstance(cohort, Cohort):
                return cohort
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError):
            pass
    cohort = load_cohort(root, name=name)  # validates every bundle; raises on any error
    if cache is not None:
        try:
            from .._atomic import atomic_write_bytes

            cache.mkdir(parents=True, exist_ok=True)
            for old in cache.glob(f"{name}-*.pickle"):
                old.unlink(missing_ok=True)
            atomic_write_bytes(cache / f"{name}-{key[:32]}.pickle", pickle.dumps(cohort, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError:
            pass  # read-only home: no disk cache, still correct
    return cohort


def load_bruchovsky(cohort: str = "all"):
    """The Bruchovsky intermittent androgen deprivation data as a :class:`~twin.patient.Cohort`.

    Parameters
    ----------
    cohort : ``"all"`` (67 patients), ``"bruchovsky"`` (54, ids ``bruchovsky-NNN``: CPA and
        leuprolide doses recorded) or ``"shaw"`` (13, ids ``shaw-NNNN``: on/off phases only).

    Patients carry PSA [ng/mL] and testosterone [nmol/L] in days since their first record,
    the treatment phases (``patient.phases``), the dosing history and the labels
    ``cohort``, ``relapse``, ``metastasis`` and ``hirata_class`` (Hirata et al. 2010).
    """
    from ..errors import InputError, close_matches
    from ..patient import Cohort

    choices = ("all", "bruchovsky", "shaw")
    key = str(cohort).strip().lower()
    if key not in choices:
        raise InputError(f"load_bruchovsky(cohort={cohort!r}): expected one of {', '.join(choices)}.{close_matches(key, choices)}")
    full = _cohort("bruchovsky")
    if key == "all":
        return full
    return Cohort(tuple(p for p in full if p.labels.get("cohort") == key), name=f"bruchovsky:{key}", source=full.source)


def load_pdxe(tissue: str | None = None):
    """The Novartis PDX Encyclopedia tumour-volume screen as a :class:`~twin.patient.Cohort`.

    One patient per patient-derived xenograft with volume curves (208); each treatment is an
    arm (``untreated``, ``alpelisib``, ``encorafenib+binimetinib``, ...) with
    ``tumor_volume`` [mm³] and ``body_weight`` [kg]; omics (mutations, copy number) for the
    143 PDXs with calls.

    Parameters
    ----------
    tissue : keep one indication: ``BRCA``, ``CM``, ``CRC``, ``GC``, ``NSCLC`` or ``PDAC``
        (case-insensitive); ``None`` for all.
    """
    from ..errors import InputError, close_matches
    from ..patient import Cohort

    full = _cohort("pdxe")
    if tissue is None:
        return full
    tissues = sorted({p.labels.get("tissue") for p in full})
    key = str(tissue).strip().upper()
    if key not in tissues:
        raise InputError(f"load_pdxe(tissue={tissue!r}): expected one of {', '.join(tissues)} or None.{close_matches(key, tissues)}")
    return Cohort(tuple(p for p in full if p.labels.get("tissue") == key), name=f"pdxe:{key}", source=full.source)


def load_patient_example():
    """One real patient for demos: ``bruchovsky-101``, who relapsed under intermittent androgen deprivation.

    PSA and testosterone over 4 on/off cycles (1,498 days) with the recorded cyproterone
    acetate and leuprolide doses; labels ``relapse = True``. Comes from the (cached)
    Bruchovsky cohort, so it is the same object as ``load_bruchovsky()["bruchovsky-101"]``.
    """
    return _cohort("bruchovsky")[EXAMPLE_PATIENT]
