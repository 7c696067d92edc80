"""Calibrate a cohort, one patient per task, on Dask (or in-process), resumably.

    run = calibrate_cohort("data/cohort/", model, "twins/", draws=1000, chains=4, seed=0)
    run.summary()                  # one row per patient: status, seed, passed, wall time
    for tw in run.twins(): ...     # each calibrated Twin, loaded from its file

Output folder
-------------
* ``<outdir>/<safe id>.twin.nc``: one twin file per patient (:meth:`twin.twin.Twin.save`,
  written atomically by the worker that calibrated it).
* ``<outdir>/cohort.json``: the manifest, written atomically by the client after every
  patient: format tag, settings, and per patient ``status`` (``ok``, ``failed`` or
  ``pending``), ``file``, ``seed``, ``input_sha256`` (:func:`twin.twin.patient_hash`),
  ``passed`` (the diagnostics' flag), ``wall_s``, ``error`` (exception type and message
  for failures; no patient data beyond the id) and the settings the twin was made with.

Reproducibility: each patient's seed is derived from ``(seed, patient id)`` only
(:func:`patient_seed`), so results never depend on the order of patients, the number of
workers or which worker ran what.

Resuming: rerunning with the same ``outdir`` skips a patient when its manifest entry is
``ok``, its twin file exists and loads, and its input hash and settings (method, draws,
chains, seed, extra calibrate keywords) are unchanged; everything else is recomputed.
A killed run loses at most the patients in flight; stale temporary files are removed at the
next start. One run per ``outdir`` at a time (a lock file ``.cohort.lock`` enforces it).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from twin._atomic import atomic_write_text
from twin.errors import InputError
from twin.model import TwinModel
from twin.patient import Cohort, Patient

__all__ = ["calibrate_cohort", "CohortRun", "patient_seed", "twin_filename", "MANIFEST"]

MANIFEST = "cohort.json"
LOCK = ".cohort.lock"
MANIFEST_FORMAT = "twin.cohort_run"
MANIFEST_VERSION = 1
SUFFIX = ".twin.nc"
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


# ----------------------------------------------------------------------------- small helpers
def patient_seed(seed: int, patient_id: str) -> int:
    """The seed of one patient: the first 4 bytes (little-endian) of SHA-256(``"seed:id"``)."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{patient_id}".encode("utf-8")).digest()[:4], "little")


def twin_filename(patient_id: str) -> str:
    """``<safe id>.twin.nc`` for a patient id.

    Ids that name another folder (``/``, ``\\``, ``.``, ``..``, NUL, empty) are rejected
    with :class:`InputError`. Other characters outside ``A-Z a-z 0-9 . _ -`` become ``_``
    and the name then gets 8 hex digits of the id's SHA-256, so different ids never share a
    file.
    """
    pid = str(patient_id)
    if not pid.strip() or pid in (".", "..") or any(c in pid for c in ("/", "\\", "\x00")) or (os.altsep and os.altsep in pid):
        raise InputError(
            f"calibrate_cohort: patient id {pid!r} cannot name a file inside the output folder "
            "(expected an id without '/', '\\', NUL and other than '.' or '..'); fix: rename the patient in its patient file"
        )
    safe = _SAFE.sub("_", pid)
    if safe.startswith("."):
        safe = "_" + safe[1:]
    if safe != pid:
        safe = f"{safe}-{hashlib.sha256(pid.encode('utf-8')).hexdigest()[:8]}"
    return safe + SUFFIX


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    """``obj`` as JSON data (for settings comparison); unknown objects by ``repr``."""
    return json.loads(json.dumps(obj, sort_keys=True, default=repr))


# ----------------------------------------------------------------------------- the worker task
def _calibrate_one(payload: dict, spec: dict, outfile: str, seed: int, method: str, draws: int, chains: int,
                   calibrate_fn: Callable | None, kwargs: dict) -> dict:
    """Worker task (module level: picklable). Rebuilds the patient and model from plain data,
    calibrates, writes the twin file atomically and returns a small summary dict; any
    exception is returned as ``status = "failed"`` with its type and message."""
    t0 = time.perf_counter()
    pid = payload.get("document", {}).get("id", "?")
    try:
        from twin.twin import Twin, patient_from_payload

        if calibrate_fn is None:
            from calibration.calibrate import calibrate as calibrate_fn  # lazily: pymc only on workers
        patient = patient_from_payload(payload, label=f"patient {pid}")
        model = TwinModel.from_spec(spec)
        tw = calibrate_fn(patient, model, method=method, draws=draws, chains=chains, seed=seed, progress=False, **kwargs)
        if not isinstance(tw, Twin):
            raise TypeError(f"the calibrate function returned {type(tw).__name__}, expected a twin.twin.Twin")
        tw.save(outfile)
        diag = tw.diagnostics if isinstance(tw.diagnostics, dict) else {}
        passed = diag.get("passed")
        return {"status": "ok", "passed": None if passed is None else bool(passed), "messages": [str(m) for m in diag.get("messages", [])][:20],
                "wall_s": time.perf_counter() - t0, "error": None}
    except Exception as exc:  # noqa: BLE001 -- recorded in the manifest, the cohort goes on
        msg = str(exc).strip().splitlines()
        text = f"{type(exc).__name__}: {msg[0] if msg else ''}".strip()
        if len(text) > 500:
            text = text[:497] + "..."
        return {"status": "failed", "passed": None, "messages": [], "wall_s": time.perf_counter() - t0, "error": text}


# ----------------------------------------------------------------------------- result
@dataclass
class CohortRun:
    """The result of :func:`calibrate_cohort` (or :meth:`open` of an output folder).

    Attributes
    ----------
    outdir : the output folder.
    manifest : the manifest (``cohort.json``) as a dict.
    computed : ids calibrated by this run; skipped : ids reused from an earlier run.
    """

    outdir: Path
    manifest: dict
    computed: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    @classmethod
    def open(cls, outdir: str | Path) -> "CohortRun":
        """Read the manifest of an earlier run's output folder."""
        outdir = Path(outdir)
        m = _read_manifest(outdir)
        if m is None:
            raise InputError(f"CohortRun.open: {outdir} holds no {MANIFEST}; expected the output folder of calibrate_cohort")
        return cls(outdir, m)

    @property
    def patients(self) -> dict:
        return self.manifest.get("patients", {})

    @property
    def ok(self) -> list[str]:
        return [pid for pid, e in self.patients.items() if e.get("status") == "ok"]

    @property
    def failed(self) -> list[dict]:
        """``[{"id", "error"}, ...]`` of the patients whose calibration failed."""
        return [{"id": pid, "error": e.get("error")} for pid, e in self.patients.items() if e.get("status") == "failed"]

    def path(self, patient_id: str) -> Path:
        return self.outdir / self.patients[patient_id]["file"]

    def twins(self) -> Iterator:
        """Each successfully calibrated :class:`~twin.twin.Twin`, loaded from its file (manifest order)."""
        from twin.twin import Twin

        for pid in self.ok:
            yield Twin.load(self.path(pid))

    def summary(self):
        """One row per patient: status, passed, seed, wall_s, file, error (index: id)."""
        import pandas as pd

        cols = ["status", "passed", "seed", "wall_s", "method", "draws", "chains", "file", "error"]
        rows = [{"id": pid, **{c: e.get(c) for c in cols}} for pid, e in self.patients.items()]
        return pd.DataFrame(rows, columns=["id"] + cols).set_index("id")

    def __repr__(self) -> str:
        return f"CohortRun({str(self.outdir)!r}, {len(self.ok)} ok, {len(self.failed)} failed, {len(self.computed)} computed, {len(self.skipped)} reused)"


# ----------------------------------------------------------------------------- manifest & lock
def _read_manifest(outdir: Path) -> dict | None:
    f = outdir / MANIFEST
    if not f.exists():
        return None
    try:
        m = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"calibrate_cohort: {f} is not readable JSON ({type(exc).__name__}); expected the manifest of an earlier run; fix: delete it (the twin files are recomputed) or choose another output folder") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise InputError(f"calibrate_cohort: {f} is not a cohort manifest (expected \"format\": \"{MANIFEST_FORMAT}\"); fix: choose another output folder")
    if m.get("version") != MANIFEST_VERSION:
        raise InputError(f"calibrate_cohort: {f} has manifest version {m.get('version')!r}; this twin reads version {MANIFEST_VERSION}; fix: choose another output folder")
    m.setdefault("patients", {})
    return m


def _write_manifest(outdir: Path, manifest: dict) -> None:
    manifest["updated"] = _now()
    atomic_write_text(outdir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=False, default=repr) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process
        return True
    except OSError:  # pragma: no cover
        return False
    return True


def _acquire_lock(outdir: Path) -> Path:
    lock = outdir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                other = json.loads(lock.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                other = {}
            if other.get("host") == me["host"] and isinstance(other.get("pid"), int) and not _pid_alive(other["pid"]):
                lock.unlink(missing_ok=True)  # left by a killed run on this machine
                continue
            raise InputError(
                f"calibrate_cohort: {outdir} is in use by another run ({other or 'unknown'}); "
                f"fix: wait for it to finish, or delete {lock} if that run is no longer alive"
            ) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        return lock
    raise InputError(f"calibrate_cohort: cannot lock {outdir}; fix: delete {lock}")  # pragma: no cover


def _remove_stale_temporaries(outdir: Path) -> None:
    for f in outdir.iterdir():
        if f.name.startswith(".") and f.name.endswith(".tmp") and (SUFFIX in f.name or MANIFEST in f.name):
            try:
                f.unlink()
            except OSError:  # pragma: no cover
                pass


# ----------------------------------------------------------------------------- inputs
def _patients(patients) -> list[Patient]:
    if isinstance(patients, (str, os.PathLike)):
        from twin.io.load import load_cohort

        return list(load_cohort(patients))
    if isinstance(patients, Patient):
        return [patients]
    if isinstance(patients, Cohort):
        return list(patients)
    if isinstance(patients, Iterable) and not isinstance(patients, (bytes, Mapping)):
        out = list(patients)
        bad = [f"item {i}: {type(p).__name__}" for i, p in enumerate(out) if not isinstance(p, Patient)]
        if bad:
            raise InputError(f"calibrate_cohort: patients must be Patient objects; received {', '.join(bad[:3])}; fix: load them with twin.load_patient or pass the cohort folder")
        ids = [p.id for p in out]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise InputError(f"calibrate_cohort: duplicate patient ids {dup}; expected one patient per id; fix: give each patient its own id")
        return out
    raise InputError(
        f"calibrate_cohort: patients must be a cohort folder (path), a twin.Cohort or a list of twin.Patient; "
        f"received {type(patients).__name__}; fix: e.g. calibrate_cohort(twin.load_cohort('data/'), ...)"
    )


def _model_of(model_for, patient: Patient) -> TwinModel:
    if isinstance(model_for, TwinModel):
        return model_for
    if callable(model_for):
        m = model_for(patient)
        if not isinstance(m, TwinModel):
            raise InputError(f"calibrate_cohort: model_for({patient.id!r}) returned {type(m).__name__}, expected a TwinModel")
        return m
    raise InputError(f"calibrate_cohort: model_for must be a TwinModel or a function patient -> TwinModel; received {type(model_for).__name__}")


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"calibrate_cohort: {name} must be a whole number >= {low}, received {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- progress
class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and total:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[last]}"))
            self.task = self.bar.add_task("cohort", total=total, last="")
            self.bar.start()

    def advance(self, pid: str, status: str):
        if self.bar is not None:
            self.bar.update(self.task, advance=1, last=f"{pid}: {status}")

    def close(self):
        if self.bar is not None:
            self.bar.stop()


# ----------------------------------------------------------------------------- main entry
def calibrate_cohort(
    patients,
    model_for,
    outdir: str | Path,
    *,
    method: str = "nuts",
    draws: int = 1000,
    chains: int = 4,
    seed: int = 0,
    scheduler=None,
    n_workers: int | None = None,
    progress: bool = True,
    calibrate_fn: Callable | None = None,
    hierarchical: bool = False,
    **calibrate_kwargs,
) -> CohortRun:
    """Calibrate every patient of a cohort (one task per patient) and write one twin file each.

    Parameters
    ----------
    patients : a cohort folder (:func:`twin.load_cohort`), a :class:`twin.Cohort` or a list
        of :class:`twin.Patient`.
    model_for : a :class:`~twin.model.TwinModel` (the same for all) or a function
        ``patient -> TwinModel`` (called here, on the client).
    outdir : output folder (created); see the module docstring for its contents.
    method, draws, chains : passed to the calibrate function.
    seed : cohort seed; patient ``i`` gets :func:`patient_seed` ``(seed, id)``.
    scheduler : ``None``: a ``distributed.LocalCluster`` of ``n_workers`` (default
        ``min(2, cpu count)``) single-threaded worker processes, closed at the end;
        an address string (``"tcp://host:8786"``) or a ``distributed.Client``: use that
        cluster (a given Client is left open); ``"sync"``: run in this process without Dask.
    progress : show a progress bar (rich).
    calibrate_fn : ``f(patient, model, *, method, draws, chains, seed, progress, **kw) -> Twin``
        (default :func:`calibration.calibrate.calibrate`, imported on the worker). For Dask
        it must be picklable (a module-level function).
    calibrate_kwargs : passed on to ``calibrate_fn`` (part of the settings a resumed run compares).
    hierarchical : one joint posterior with partial pooling
        (:func:`calibration.hierarchical.calibrate_hierarchical`; ``method`` nuts or map), run in
        this process; the per-patient twins, ``cohort.json`` and ``population.csv`` are written
        atomically at the end (a rerun with the same settings and inputs skips the run).

    Returns
    -------
    :class:`CohortRun`. Failed patients are recorded (``run.failed``), not raised.
    """
    from twin.twin import Twin, patient_hash, patient_payload

    plist = _patients(patients)
    if hierarchical:
        return _hierarchical_cohort(plist, model_for, Path(outdir), method=method, draws=draws, chains=chains, seed=seed,
                                    progress=progress, **calibrate_kwargs)
    draws = _check_int("draws", draws, 1)
    chains = _check_int("chains", chains, 1)
    seed = _check_int("seed", seed, 0)
    if n_workers is not None:
        n_workers = _check_int("n_workers", n_workers, 1)
    if not isinstance(method, str) or not method:
        raise InputError(f"calibrate_cohort: method must be a name such as 'nuts', 'advi' or 'map', received {method!r}")
    if calibrate_fn is not None and not callable(calibrate_fn):
        raise InputError(f"calibrate_cohort: calibrate_fn must be a function, received {type(calibrate_fn).__name__}")
    files = {p.id: twin_filename(p.id) for p in plist}  # rejects path-escaping ids up front
    clash = {}
    for pid, f in files.items():
        clash.setdefault(f.lower(), []).append(pid)
    clash = [v for v in clash.values() if len(v) > 1]
    if clash:
        raise InputError(f"calibrate_cohort: patient ids {clash[0]} differ only in letter case and would share a file; fix: rename one of them")
    if model_for is None:
        from .calibrate import default_model

        model_for = default_model
    if not isinstance(model_for, TwinModel) and not callable(model_for):
        raise InputError(f"calibrate_cohort: model_for must be a TwinModel or a function patient -> TwinModel; received {type(model_for).__name__}")
    if not plist:
        raise InputError("calibrate_cohort: no patients to calibrate (received an empty cohort); fix: point to a folder with patient bundles or pass a non-empty list")
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise InputError(f"calibrate_cohort: outdir {outdir} is a file; expected a folder (created if missing)")
    outdir.mkdir(parents=True, exist_ok=True)
    outdir_real = outdir.resolve()
    for f in files.values():
        if (outdir_real / f).resolve().parent != outdir_real:  # pragma: no cover - twin_filename already refuses
            raise InputError(f"calibrate_cohort: {f} would be written outside {outdir}")

    extra = _jsonable(dict(calibrate_kwargs))
    settings = {"method": method, "draws": draws, "chains": chains, "cohort_seed": seed, "calibrate_kwargs": extra}
    fn_name = "calibration.calibrate.calibrate" if calibrate_fn is None else f"{getattr(calibrate_fn, '__module__', '?')}.{getattr(calibrate_fn, '__qualname__', repr(calibrate_fn))}"

    lock = _acquire_lock(outdir)
    try:
        _remove_stale_temporaries(outdir)
        manifest = _read_manifest(outdir) or {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "created": _now(), "patients": {}}
        manifest["settings"] = settings | {"calibrate_fn": fn_name}
        entries: dict = manifest["patients"]

        todo, skipped = [], []
        for p in plist:
            pseed = patient_seed(seed, p.id)
            h = patient_hash(p)
            entry = {"status": "pending", "file": files[p.id], "seed": pseed, "input_sha256": h, **settings}
            old = entries.get(p.id)
            if old and old.get("status") == "ok" and all(old.get(k) == v for k, v in entry.items() if k != "status"):
                try:
                    tw = Twin.load(outdir / files[p.id])
                    if tw.patient.id == p.id:
                        skipped.append(p.id)
                        continue
                except InputError:
                    pass
            try:
                model = _model_of(model_for, p)
                if model.residual is not None:
                    raise InputError("cohort calibration of a model with a neural residual is not supported yet (the worker receives the model specification only)")
                spec = model.spec()
            except Exception as exc:  # noqa: BLE001 -- a bad model for one patient fails that patient only
                entries[p.id] = entry | {"status": "failed", "passed": None, "wall_s": 0.0, "error": f"{type(exc).__name__}: {exc}"[:500]}
                continue
            entries[p.id] = entry
            todo.append((p, pseed, spec))
        _write_manifest(outdir, manifest)

        run = CohortRun(outdir, manifest, computed=[], skipped=skipped)
        bar = _Progress(len(todo), progress)

        def record(pid: str, res: dict):
            entries[pid] = entries[pid] | {"status": res["status"], "passed": res["passed"], "messages": res.get("messages", []),
                                           "wall_s": round(float(res["wall_s"]), 3), "error": res["error"], "finished": _now()}
            _write_manifest(outdir, manifest)
            run.computed.append(pid)
            bar.advance(pid, res["status"])

        def args(p, pseed, spec):
            return (patient_payload(p), spec, str(outdir_real / files[p.id]), pseed, method, draws, chains, calibrate_fn, dict(calibrate_kwargs))

        try:
            if not todo:
                pass
            elif scheduler == "sync":
                for p, pseed, spec in todo:
                    record(p.id, _calibrate_one(*args(p, pseed, spec)))
            else:
                _run_dask(todo, args, record, scheduler, n_workers)
        finally:
            bar.close()
        return run
    finally:
        lock.unlink(missing_ok=True)


def _run_dask(todo, args, record, scheduler, n_workers):
    import importlib.util

    from distributed import Client, LocalCluster, as_completed

    cluster = None
    own_client = True
    if scheduler is None:
        n = n_workers or min(2, os.cpu_count() or 1)
        dash = ":0" if importlib.util.find_spec("bokeh") is not None else None
        cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=dash, silence_logs=40)
        client = Client(cluster)
    elif isinstance(scheduler, Client):
        client, own_client = scheduler, False
    elif isinstance(scheduler, str):
        try:
            client = Client(scheduler, timeout=30)
        except (OSError, TimeoutError) as exc:
            raise InputError(f"calibrate_cohort: cannot reach the Dask scheduler at {scheduler!r} ({type(exc).__name__}); expected an address such as 'tcp://host:8786', 'sync' or None (a local cluster)") from None
    else:
        raise InputError(f"calibrate_cohort: scheduler must be None, 'sync', a scheduler address or a distributed.Client; received {type(scheduler).__name__}")
    futures = {}
    try:
        for p, pseed, spec in todo:
            fut = client.submit(_calibrate_one, *args(p, pseed, spec), pure=False, key=f"calibrate-{p.id}-{os.urandom(4).hex()}")
            futures[fut] = p.id
        for fut in as_completed(list(futures)):
            pid = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # noqa: BLE001 -- e.g. the worker died (KilledWorker)
                res = {"status": "failed", "passed": None, "wall_s": 0.0, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]}
            record(pid, res)
    finally:
        for fut in futures:
            if not fut.done():
                fut.cancel()
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()


def _hierarchical_cohort(plist, model_for, outdir: Path, *, method, draws, chains, seed, progress, **kw) -> "CohortRun":
    """Joint partially pooled calibration; outputs as the one-by-one mode."""
    import json
    import time as _t

    from twin._atomic import atomic_write_text
    from twin.twin import patient_hash

    from .hierarchical import calibrate_hierarchical

    if not plist:
        raise InputError("calibrate_cohort: no patients to calibrate (received an empty cohort)")
    if model_for is None:
        from .calibrate import default_model

        model_for = default_model
    models = [_model_of(model_for, p) for p in plist]
    spec0 = json.dumps(models[0].spec(), sort_keys=True, default=str)
    if any(json.dumps(m.spec(), sort_keys=True, default=str) != spec0 for m in models[1:]):
        raise InputError("calibrate_cohort(hierarchical=True): the patients need one shared model (same drugs, mechanisms, growth); pass one TwinModel")
    outdir.mkdir(parents=True, exist_ok=True)
    files = {p.id: twin_filename(p.id) for p in plist}
    settings = {"mode": "hierarchical", "method": method, "draws": draws, "chains": chains, "cohort_seed": seed, "calibrate_kwargs": _jsonable(dict(kw)),
                "inputs": {p.id: patient_hash(p) for p in plist}}
    old = _read_manifest(outdir)
    if old and old.get("settings") == settings and all((outdir / f).is_file() for f in files.values()):
        return CohortRun(outdir, old, computed=[], skipped=[p.id for p in plist])
    t0 = _t.perf_counter()
    res = calibrate_hierarchical(plist, models[0], method=method, draws=draws, chains=chains, seed=seed, progress=progress, **kw)
    entries = {}
    for p, tw in zip(plist, res.twins):
        tw.save(outdir / files[p.id])
        entries[p.id] = {"status": "ok", "file": files[p.id], "seed": seed, "input_sha256": settings["inputs"][p.id],
                         "diagnostics_passed": bool(tw.diagnostics.get("passed")), "wall_s": None}
    atomic_write_text(outdir / "population.csv", res.population().to_csv())
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "created": _now(), "settings": settings, "patients": entries,
                "joint_diagnostics": _jsonable(res.diagnostics), "wall_s": round(_t.perf_counter() - t0, 3)}
    atomic_write_text(outdir / "cohort.json", json.dumps(manifest, indent=2, sort_keys=True, default=str))
    return CohortRun(outdir, manifest, computed=[p.id for p in plist], skipped=[])
