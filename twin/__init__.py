"""twin: patient digital twins for oncology.

The ``twin`` package holds the domain and the simulator: patients and their files,
pathway graphs, drugs and PK, regimens, the twin model and simulation. Bayesian
calibration lives in :mod:`calibration`, what-if scenarios in :mod:`scenarios`.

>>> import twin
>>> cohort = twin.datasets.load_bruchovsky()      # doctest: +SKIP
>>> patient = cohort["bruchovsky-001"]            # doctest: +SKIP
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version as _version

from . import datasets, importers
from .errors import InputError, PatientFileError, Problem, TwinError
from .graph import GraphError, PathwayGraph, list_pathways, load_pathway, read_pathway
from .model import TwinModel
from .observation import ErrorModel
from .omics import OmicsPriors, omics_priors
from .priors import sample_prior
from .simulate import simulate
from .io import load_cohort, load_patient, read_patient, save_patient, validate_patient
from .patient import Cohort, Covariates, Omics, Patient
from .regimen import Regimen

try:
    __version__ = _version("twin-oncology")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "__version__",
    "Cohort",
    "Covariates",
    "ErrorModel",
    "Twin",
    "TwinModel",
    "GraphError",
    "OmicsPriors",
    "PathwayGraph",
    "InputError",
    "Omics",
    "Patient",
    "PatientFileError",
    "Problem",
    "Regimen",
    "TwinError",
    "datasets",
    "importers",
    "list_pathways",
    "load_cohort",
    "load_pathway",
    "omics_priors",
    "read_pathway",
    "load_patient",
    "read_patient",
    "sample_prior",
    "save_patient",
    "simulate",
    "validate_patient",
]


def __getattr__(name: str):
    """Lazy exports: ``twin.Twin`` (the twin file needs arviz/xarray only when used)."""
    if name == "Twin":
        from .twin import Twin

        return Twin
    raise AttributeError(f"module 'twin' has no attribute {name!r}")
