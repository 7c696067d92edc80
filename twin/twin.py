"""`Twin`: a calibrated patient twin (patient + model + parameter draws) and its file.

A :class:`Twin` joins a :class:`~twin.patient.Patient`, the :class:`~twin.model.TwinModel`
it was calibrated with, and an ``arviz.InferenceData`` holding the posterior (one variable
per calibrated model parameter, named exactly like the model's parameters, plus the
error-model parameters such as ``sigma_psa``). Parameters held fixed during calibration are
in :attr:`Twin.fixed`; every other model parameter takes the model's default value.

    tw = calibrate(patient, model)          # calibration.calibrate
    tw.save("P001.twin.nc")
    tw = Twin.load("P001.twin.nc")          # needs arviz/xarray/h5netcdf, never pymc
    tw.draws["r_max"]                       # (n_chain * n_draw,) array, chain-major

The twin file (``*.twin.nc``)
------------------------------
ONE NetCDF-4/HDF5 file written with the ``h5netcdf`` engine:

* every group of the InferenceData (``posterior``, and when present
  ``posterior_predictive``, ``observed_data``, ``constant_data``, ``sample_stats``,
  ``prior``, ...) as written by ``InferenceData.to_netcdf`` (zlib-compressed, lossless:
  values load back bitwise equal);
* one extra group ``twin`` (not an InferenceData group) whose attributes are
  ``format = "twin.twin_file"``, ``format_version = 1``, ``method``, ``kind``,
  ``seed`` (JSON text: a number or ``null``), ``groups`` (JSON list of the InferenceData
  groups) and ``twin_version``; and whose 0-d text variables hold JSON documents:
  ``patient`` (:func:`twin.io.save.patient_document`), ``patient_source`` and
  ``patient_notes`` (restored as they were), ``model`` (:meth:`TwinModel.spec`),
  ``fixed``, ``diagnostics`` and ``provenance``. JSON documents are stored as data
  variables rather than attributes because HDF5 limits the size of attributes.
  When the model has a neural residual, its weights and architecture files
  (:meth:`twin.residual.NeuralResidual.save`) are stored as the byte variables
  ``residual_pt`` and ``residual_json``.

The file is written to a temporary sibling, flushed to disk (fsync) and renamed over
``path`` (``os.replace``): a crash never leaves a partial twin file. :meth:`Twin.load`
checks the format tag and version and reads everything into memory (the file is closed
on return, so it may be overwritten later).

``import twin.twin`` is light: arviz, xarray and h5netcdf are imported inside functions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from .errors import InputError, Problem, close_matches
from .model import TwinModel
from .patient import Patient

if TYPE_CHECKING:  # pragma: no cover
    import arviz
    import pandas as pd

__all__ = ["Twin", "provenance_for", "patient_hash", "patient_payload", "patient_from_payload", "FORMAT", "FORMAT_VERSION", "META_GROUP"]

FORMAT = "twin.twin_file"
FORMAT_VERSION = 1
META_GROUP = "twin"
_VERSIONED = ("twin-oncology", "numpy", "scipy", "torch", "pymc", "arviz", "pytensor", "xarray")


# ----------------------------------------------------------------------------- provenance
def _version_of(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _dumps(obj, what: str) -> str:
    try:
        return json.dumps(obj, default=_json_default, ensure_ascii=False, sort_keys=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"Twin.save: {what} must be JSON-serialisable plain data (dict/list/str/number/bool/None); {exc}; fix: convert it to plain values") from None


def patient_hash(patient: Patient) -> str:
    """SHA-256 of the patient's canonical document (:func:`twin.io.save.patient_document`,
    keys sorted): changes whenever the data the calibration sees changes, whatever file
    layout or units the patient came from."""
    from .io.save import patient_document

    text = json.dumps(patient_document(patient), sort_keys=True, ensure_ascii=False, default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def patient_payload(patient: Patient) -> dict:
    """The patient as JSON-able data that :func:`patient_from_payload` restores exactly:
    ``document`` (:func:`twin.io.save.patient_document`), ``source`` and ``notes``. Used for
    the twin file and to ship patients to cohort workers (no pickled objects)."""
    from .io.save import patient_document

    return {
        "document": patient_document(patient),
        "source": json.loads(_dumps(patient.source, "patient.source")),
        "notes": [dataclasses.asdict(p) for p in patient.notes],
    }


def patient_from_payload(payload: Mapping, label: str = "patient") -> Patient:
    """Rebuild the patient of :func:`patient_payload` (the document passes the loader's checks)."""
    from .io.load import patient_from_document

    patient, problems = patient_from_document(payload["document"], label=label)
    if patient is None:
        msgs = "; ".join(p.format().replace("\n", " ") for p in problems.errors[:3])
        raise InputError(f"{label}: the stored patient does not pass this twin's checks ({msgs}); fix: rebuild it with this version of twin")
    notes = tuple(Problem(**p) for p in payload.get("notes", ()))
    return dataclasses.replace(patient, source=dict(payload.get("source") or {}), notes=notes)


def provenance_for(patient: Patient, *, seed: int | None, method: str, extra: Mapping[str, Any] | None = None) -> dict:
    """Where a twin comes from, as JSON-able data.

    Keys: ``created`` (UTC ISO 8601), ``method``, ``seed``, ``patient_id``,
    ``input_sha256`` (the SHA-256 of each input file, from ``patient.source``; empty for a
    patient built in memory), ``patient_sha256`` (:func:`patient_hash`), ``versions``
    (twin, numpy, scipy, torch, pymc, arviz, pytensor, xarray; ``None`` when not installed;
    read with ``importlib.metadata``, nothing is imported), ``python``, ``platform``, and
    whatever ``extra`` adds (e.g. the command line).
    """
    src = patient.source or {}
    prov = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": str(method),
        "seed": None if seed is None else int(seed),
        "patient_id": patient.id,
        "input_sha256": dict(src.get("sha256") or {}),
        "input_format": src.get("format"),
        "patient_sha256": patient_hash(patient),
        "versions": {("twin" if d == "twin-oncology" else d): _version_of(d) for d in _VERSIONED},
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if extra:
        prov.update(json.loads(_dumps(dict(extra), "provenance extra")))
    return prov


# ----------------------------------------------------------------------------- the twin
@dataclass(frozen=True, eq=False)
class Twin:
    """A patient twin: patient, model and parameter draws (posterior or prior).

    Attributes
    ----------
    patient : :class:`~twin.patient.Patient`.
    model : :class:`~twin.model.TwinModel`.
    idata : ``arviz.InferenceData``; ``posterior`` has dims ``(chain, draw)`` and one
        variable per calibrated parameter (model parameter names) plus the error-model
        parameters (e.g. ``sigma_psa``); optionally ``posterior_predictive``,
        ``observed_data``, ``constant_data``, ``sample_stats``, ``prior``.
    fixed : model parameters held fixed during calibration, name -> value.
    method : ``"nuts"``, ``"advi"``, ``"map"``, ``"prior"``, ...
    seed : the calibration seed (``None``: unknown).
    diagnostics : JSON-able convergence/fit summary, e.g. ``passed``, ``messages``,
        ``rhat_max``, ``ess_bulk_min``, ``ess_tail_min``, ``divergences``, ``bfmi_min``,
        ``ppc_coverage90``.
    provenance : JSON-able: versions, seed, input hashes, creation time, command
        (:func:`provenance_for`).
    kind : ``"posterior"`` (calibrated) or ``"prior"``.
    """

    patient: Patient
    model: TwinModel
    idata: "arviz.InferenceData"
    fixed: dict = field(default_factory=dict)
    method: str = "nuts"
    seed: int | None = None
    diagnostics: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    kind: str = "posterior"

    def __post_init__(self):
        if not hasattr(self.idata, "posterior"):
            raise InputError(f"Twin: idata must be an arviz.InferenceData with a 'posterior' group, received {type(self.idata).__name__}; fix: build it with arviz.from_dict(posterior=...) or use Twin.from_draws")
        names = set(self.model.parameter_names)
        bad = [k for k in self.fixed if k not in names]
        if bad:
            hint = close_matches(bad[0], list(names))
            raise InputError(f"Twin: fixed parameters {bad} are not parameters of the model (it has {sorted(names)}).{hint} Fix: name model parameters only")
        both = sorted(set(self.fixed) & set(self.calibrated))
        if both:
            raise InputError(f"Twin: {both} are both fixed and in the posterior; fix: a parameter is either calibrated or fixed, not both")
        for k in ("chain", "draw"):
            if k not in self.idata.posterior.dims:
                raise InputError(f"Twin: the posterior must have dims (chain, draw), received dims {tuple(self.idata.posterior.dims)}")
        object.__setattr__(self, "fixed", {str(k): float(v) for k, v in dict(self.fixed).items()})

    # ------------------------------------------------------------------ draws
    @property
    def calibrated(self) -> tuple[str, ...]:
        """Model parameters in the posterior (in model order)."""
        post = self.idata.posterior
        return tuple(n for n in self.model.parameter_names if n in post.data_vars)

    @property
    def error_names(self) -> tuple[str, ...]:
        """Posterior variables that are not model parameters (the error model's, e.g. ``sigma_psa``)."""
        names = set(self.model.parameter_names)
        return tuple(str(n) for n in self.idata.posterior.data_vars if n not in names)

    @property
    def n_chains(self) -> int:
        return int(self.idata.posterior.sizes["chain"])

    @property
    def n_draws(self) -> int:
        """Number of draws over all chains (``n_chain * n_draw``)."""
        s = self.idata.posterior.sizes
        return int(s["chain"]) * int(s["draw"])

    def _flat(self, name: str) -> np.ndarray:
        v = np.asarray(self.idata.posterior[name].transpose("chain", "draw", ...).values)
        return v.reshape((self.n_draws,) + v.shape[2:])

    @property
    def draws(self) -> dict[str, np.ndarray]:
        """Every model parameter -> array ``(n_draws,)``: calibrated ones flattened
        chain-major from the posterior, fixed ones broadcast from :attr:`fixed`, the others
        broadcast from the model's default values. (A fresh dict each call.)"""
        n = self.n_draws
        defaults = self.model.default_values()
        out = {}
        calibrated = set(self.calibrated)
        for name in self.model.parameter_names:
            if name in calibrated:
                out[name] = self._flat(name).astype(float, copy=False)
            else:
                out[name] = np.full(n, float(self.fixed.get(name, defaults[name])))
        return out

    @property
    def error_draws(self) -> dict[str, np.ndarray]:
        """Error-model (and other non-model) posterior variables -> array ``(n_draws, ...)``."""
        return {name: self._flat(name) for name in self.error_names}

    def with_drugs(self, drugs) -> "Twin":
        """This twin with a model that also knows ``drugs`` (catalogue PK; a scenario may give
        drugs the patient never had). Parameters of the new drugs (e.g. a cytotoxic's kill
        rate) are not in the posterior: they take the model's default values. Same twin when
        nothing is new."""
        import dataclasses

        new = self.model.with_drugs(drugs)
        return self if new is self.model else dataclasses.replace(self, model=new)

    def thinned(self, n: int, *, seed: int | None = 0) -> "Twin":
        """A twin with at most ``n`` posterior draws (chains pooled, drawn without
        replacement with ``seed``; the same twin when it has ``n`` or fewer)."""
        import dataclasses

        import arviz as az

        if self.n_draws <= n:
            return self
        rng = np.random.default_rng(seed)
        sel = np.sort(rng.choice(self.n_draws, size=int(n), replace=False))
        post = self.idata.posterior.stack(sample=("chain", "draw")).isel(sample=sel)
        post = post.drop_vars(["sample", "chain", "draw"]).rename({"sample": "draw"}).expand_dims(chain=[0]).assign_coords(draw=np.arange(len(sel)))
        post = post.transpose("chain", "draw", ...)
        return dataclasses.replace(self, idata=az.InferenceData(posterior=post))

    def parameter_source(self) -> dict[str, str]:
        """Each model parameter -> ``"calibrated"``, ``"fixed"`` or ``"default"``."""
        cal = set(self.calibrated)
        return {n: "calibrated" if n in cal else "fixed" if n in self.fixed else "default" for n in self.model.parameter_names}

    def summary(self) -> "pd.DataFrame":
        """One row per model parameter and error-model parameter.

        Columns: ``unit``, ``source`` (calibrated/fixed/default/error model), ``median``,
        ``q05``, ``q95``, ``r_hat`` (``arviz.rhat``; NaN with one chain), ``ess_bulk``
        (``arviz.ess``; NaN with one chain or fewer than 4 draws).
        """
        import pandas as pd

        units = self.model.parameter_units
        src = self.parameter_source()
        multi = self.n_chains > 1 and int(self.idata.posterior.sizes["draw"]) >= 4
        rhat = ess = None
        scalar_vars = [n for n in list(self.calibrated) + list(self.error_names) if self.idata.posterior[n].ndim == 2]
        if multi and scalar_vars:
            import warnings

            import arviz as az

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rhat = az.rhat(self.idata.posterior[scalar_vars])
                ess = az.ess(self.idata.posterior[scalar_vars], method="bulk")
        rows = []
        draws = self.draws
        err = self.error_draws
        for name in list(self.model.parameter_names) + list(self.error_names):
            x = draws[name] if name in draws else err[name]
            scalar = x.ndim == 1
            q = np.quantile(x, [0.5, 0.05, 0.95], axis=0) if scalar else (np.nan, np.nan, np.nan)
            rows.append(
                {
                    "parameter": name,
                    "unit": units.get(name, ""),
                    "source": src.get(name, "error model"),
                    "median": float(q[0]),
                    "q05": float(q[1]),
                    "q95": float(q[2]),
                    "r_hat": float(rhat[name]) if rhat is not None and name in scalar_vars else np.nan,
                    "ess_bulk": float(ess[name]) if ess is not None and name in scalar_vars else np.nan,
                }
            )
        return pd.DataFrame(rows).set_index("parameter")

    def __repr__(self) -> str:
        s = self.idata.posterior.sizes
        passed = self.diagnostics.get("passed") if isinstance(self.diagnostics, dict) else None
        return (
            f"Twin(patient={self.patient.id!r}, kind={self.kind!r}, method={self.method!r}, "
            f"{int(s['chain'])} chain(s) x {int(s['draw'])} draw(s), calibrated={list(self.calibrated)}, "
            f"error={list(self.error_names)}, fixed={sorted(self.fixed)}, diagnostics passed={passed})"
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_draws(
        cls,
        patient: Patient,
        model: TwinModel,
        draws: Mapping[str, Any],
        *,
        fixed: Mapping[str, float] | None = None,
        method: str = "prior",
        seed: int | None = None,
        diagnostics: Mapping | None = None,
        provenance: Mapping | None = None,
        kind: str | None = None,
    ) -> "Twin":
        """A twin whose InferenceData holds only a posterior built from ``draws``.

        ``draws``: name -> array ``(n_chains, n_draws)`` (a 1-D array is one chain); model
        parameter names and error-model names (e.g. ``sigma_psa``). ``kind`` defaults to
        ``"prior"`` when ``method == "prior"``, else ``"posterior"``.
        """
        import arviz as az

        if not isinstance(draws, Mapping) or not draws:
            raise InputError(f"Twin.from_draws: expected draws as a dict name -> array (chains, draws), received {type(draws).__name__ if not isinstance(draws, Mapping) else 'an empty dict'}")
        post, shape = {}, None
        for k, v in draws.items():
            a = np.asarray(v)
            if a.ndim == 1:
                a = a[None, :]
            if a.ndim < 2 or a.size == 0:
                raise InputError(f"Twin.from_draws: draws[{k!r}] must be an array (chains, draws), received shape {np.shape(v)}")
            if shape is None:
                shape = a.shape[:2]
            elif a.shape[:2] != shape:
                raise InputError(f"Twin.from_draws: draws[{k!r}] has (chains, draws) = {a.shape[:2]}, but other draws have {shape}; fix: give every variable the same number of chains and draws")
            post[str(k)] = a
        idata = az.from_dict(posterior=post)
        return cls(
            patient,
            model,
            idata,
            fixed=dict(fixed or {}),
            method=str(method),
            seed=seed,
            diagnostics=dict(diagnostics or {}),
            provenance=dict(provenance) if provenance is not None else provenance_for(patient, seed=seed, method=method),
            kind=kind or ("prior" if method == "prior" else "posterior"),
        )

    # ------------------------------------------------------------------ file
    def save(self, path: str | Path) -> Path:
        """Write the twin as ONE NetCDF file (see the module docstring), atomically.

        An existing file at ``path`` is replaced; a failure leaves it untouched and no
        temporary file behind. Returns ``path``.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = _meta_dataset(self)
        groups = [str(g) for g in self.idata.groups()]
        if META_GROUP in groups:
            raise InputError(f"Twin.save: the InferenceData has a group named {META_GROUP!r}, which the twin file reserves; fix: rename that group")
        meta.attrs["groups"] = json.dumps(groups)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            self.idata.to_netcdf(tmp, engine="h5netcdf", overwrite_existing=True)
            meta.to_netcdf(tmp, mode="a", group=META_GROUP, engine="h5netcdf")
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(path.parent)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Twin":
        """Read a twin file written by :meth:`save` (everything into memory; the file is closed).

        Raises :class:`~twin.errors.InputError` when the file does not exist, is not a
        NetCDF/HDF5 file, is not a twin file, or has a format version this twin cannot read.
        """
        path = Path(path)
        fix = "fix: pass a file written by Twin.save / `twin calibrate` (name ending in .twin.nc)"
        if not path.exists():
            raise InputError(f"Twin.load: {path} does not exist; expected a twin file (.twin.nc); {fix}")
        if path.is_dir():
            raise InputError(f"Twin.load: {path} is a folder; expected a twin file (.twin.nc); {fix}")
        import h5netcdf

        try:
            with h5netcdf.File(path, "r") as f:
                file_groups = list(f.groups)
        except Exception as exc:  # noqa: BLE001 -- any reader failure means "not NetCDF-4/HDF5"
            raise InputError(f"Twin.load: {path} is not a NetCDF-4/HDF5 file ({type(exc).__name__}); expected a twin file; {fix}") from None
        if META_GROUP not in file_groups:
            raise InputError(f"Twin.load: {path} is a NetCDF file but not a twin file (no '{META_GROUP}' group; groups found: {file_groups}); {fix}")
        try:
            meta = _read_group(path, META_GROUP)
        except Exception as exc:  # noqa: BLE001 -- an unreadable group is a damaged file
            raise InputError(f"Twin.load: {path} is a damaged twin file (its '{META_GROUP}' group cannot be read: {type(exc).__name__}); fix: recalibrate to rewrite it") from None
        fmt, ver = meta.attrs.get("format"), meta.attrs.get("format_version")
        if fmt != FORMAT:
            raise InputError(f"Twin.load: {path} is not a twin file (format tag {fmt!r}, expected {FORMAT!r}); {fix}")
        try:
            ver = int(ver)
        except (TypeError, ValueError):
            raise InputError(f"Twin.load: {path} has an unreadable format version {ver!r}; expected {FORMAT_VERSION}") from None
        if ver != FORMAT_VERSION:
            newer = ver > FORMAT_VERSION
            raise InputError(
                f"Twin.load: {path} has twin file format version {ver}; this twin reads version {FORMAT_VERSION}; "
                + ("fix: upgrade twin (the file was written by a newer version)" if newer else "fix: recalibrate to write a current file")
            )
        try:
            return _from_meta(path, meta, [g for g in json.loads(meta.attrs["groups"]) if g in file_groups])
        except InputError:
            raise
        except (KeyError, ValueError, TypeError, OSError) as exc:
            raise InputError(f"Twin.load: {path} is a damaged twin file ({type(exc).__name__}: {exc}); fix: recalibrate to rewrite it") from None


# ----------------------------------------------------------------------------- file helpers
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _text(value: str):
    return np.array(value, dtype=object)


def _meta_dataset(tw: Twin):
    import xarray as xr

    pay = patient_payload(tw.patient)
    data = {
        "patient": _dumps(pay["document"], "the patient document"),
        "patient_source": _dumps(pay["source"], "patient.source"),
        "patient_notes": _dumps(pay["notes"], "patient.notes"),
        "model": _dumps(tw.model.spec(), "the model specification"),
        "fixed": _dumps(tw.fixed, "fixed"),
        "diagnostics": _dumps(tw.diagnostics, "diagnostics"),
        "provenance": _dumps(tw.provenance, "provenance"),
    }
    variables = {k: xr.Variable((), _text(v)) for k, v in data.items()}
    if tw.model.residual is not None:
        with tempfile.TemporaryDirectory() as d:
            pt, js = tw.model.residual.save(Path(d) / "residual")
            variables["residual_pt"] = xr.Variable(("residual_pt_bytes",), np.frombuffer(pt.read_bytes(), dtype=np.uint8))
            variables["residual_json"] = xr.Variable(("residual_json_bytes",), np.frombuffer(js.read_bytes(), dtype=np.uint8))
    attrs = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": str(tw.method),
        "kind": str(tw.kind),
        "seed": json.dumps(None if tw.seed is None else int(tw.seed)),
        "twin_version": _version_of("twin-oncology") or "unknown",
    }
    return xr.Dataset(variables, attrs=attrs)


def _read_group(path: Path, group: str):
    import xarray as xr

    with xr.open_dataset(path, group=group, engine="h5netcdf") as ds:
        return ds.load()


def _from_meta(path: Path, meta, groups: list[str]) -> Twin:
    import arviz as az

    def doc(name):
        return json.loads(str(meta[name].values.item()))

    payload = {"document": doc("patient"), "source": doc("patient_source"), "notes": doc("patient_notes")}
    patient = patient_from_payload(payload, label=f"Twin.load: {path.name} › patient")
    model = TwinModel.from_spec(doc("model"))
    if "residual_pt" in meta.data_vars:
        from .residual import NeuralResidual

        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "residual.pt").write_bytes(np.asarray(meta["residual_pt"].values, np.uint8).tobytes())
            (Path(d) / "residual.json").write_bytes(np.asarray(meta["residual_json"].values, np.uint8).tobytes())
            model = model.with_residual(NeuralResidual.load(Path(d) / "residual"))
    if "posterior" not in groups:
        raise InputError(f"Twin.load: {path} has no posterior group; fix: recalibrate to rewrite it")
    idata = az.InferenceData(**{g: _read_group(path, g) for g in groups})
    return Twin(
        patient=patient,
        model=model,
        idata=idata,
        fixed=doc("fixed"),
        method=str(meta.attrs["method"]),
        seed=json.loads(meta.attrs["seed"]),
        diagnostics=doc("diagnostics"),
        provenance=doc("provenance"),
        kind=str(meta.attrs["kind"]),
    )

