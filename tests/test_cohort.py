"""Cohort calibration orchestration (calibration/cohort.py) with a fake, deterministic calibrate.

The fake builds a Twin from numpy draws of ``default_rng(seed)``, so the outputs show
whether each patient got the same seed whatever the scheduler and the number of workers.
Each call leaves a marker file (``marker_dir``), which counts the calls across processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from calibration.cohort import MANIFEST, CohortRun, calibrate_cohort, patient_seed, twin_filename
from twin.errors import InputError
from twin.graph import load_pathway
from twin.model import TwinModel
from twin.patient import Cohort, Patient
from twin.twin import Twin

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
N = 4
KW = dict(method="advi", draws=6, chains=2, seed=11, progress=False)


def fake_calibrate(patient, model, *, method, draws, chains, seed, progress=True, marker_dir=None, fail_ids=(), **kw):
    """Module-level (picklable) stand-in for calibration.calibrate.calibrate."""
    if marker_dir:
        Path(marker_dir, f"{patient.id}.{os.getpid()}.{uuid.uuid4().hex}").touch()
    if patient.id in fail_ids:
        raise RuntimeError("simulated sampler failure")
    rng = np.random.default_rng(seed)
    d = {"r_max": rng.lognormal(-2.3, 0.1, (chains, draws)), "N0": rng.lognormal(20.0, 0.3, (chains, draws)), "sigma_psa": rng.lognormal(-1.0, 0.1, (chains, draws))}
    return Twin.from_draws(patient, model, d, method=method, seed=seed, diagnostics={"passed": True, "messages": []})


def _model():
    return TwinModel.from_graph(load_pathway("androgen_receptor"), drugs=["leuprolide", "cyproterone_acetate"], pathway=False)


def _patients(n=N):
    import twin.datasets

    return Cohort(tuple(twin.datasets.load_bruchovsky().patients[:n]), name="small")


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def patients():
    return _patients()


def _markers(d: Path) -> list[str]:
    return sorted(p.name.split(".")[0] for p in d.iterdir()) if d.exists() else []


def _posteriors(outdir: Path) -> dict:
    run = CohortRun.open(outdir)
    out = {}
    for tw in run.twins():
        out[tw.patient.id] = {v: tw.idata.posterior[v].values for v in tw.idata.posterior.data_vars}
        assert tw.seed == patient_seed(KW["seed"], tw.patient.id)
    return out


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for pid in a:
        assert a[pid].keys() == b[pid].keys()
        for v in a[pid]:
            assert a[pid][v].tobytes() == b[pid][v].tobytes(), (pid, v)


def test_patient_seed_and_filenames():
    assert patient_seed(0, "P1") == int.from_bytes(__import__("hashlib").sha256(b"0:P1").digest()[:4], "little")
    assert patient_seed(0, "P1") != patient_seed(1, "P1") != patient_seed(0, "P2")
    assert twin_filename("bruchovsky-001") == "bruchovsky-001.twin.nc"
    odd = twin_filename("pat 7:β")
    assert odd.endswith(".twin.nc") and "/" not in odd and " " not in odd and odd != twin_filename("pat_7__")
    assert twin_filename(".hidden").startswith("_")
    for bad in ("../evil", "a/b", "..", ".", "a\\b", "", "x\x00y"):
        with pytest.raises(InputError, match="cannot name a file"):
            twin_filename(bad)


def test_sync_run_writes_twins_and_manifest(patients, model, tmp_path):
    out = tmp_path / "out"
    run = calibrate_cohort(patients, model, out, scheduler="sync", calibrate_fn=fake_calibrate, **KW)
    assert sorted(run.computed) == sorted(patients.ids) and run.skipped == [] and run.failed == []
    m = json.loads((out / MANIFEST).read_text())
    assert m["format"] == "twin.cohort_run" and m["settings"]["draws"] == 6
    for p in patients:
        e = m["patients"][p.id]
        assert e["status"] == "ok" and e["file"] == f"{p.id}.twin.nc" and e["passed"] is True
        assert e["seed"] == patient_seed(11, p.id) and e["method"] == "advi" and e["chains"] == 2
        assert len(e["input_sha256"]) == 64 and e["error"] is None and e["wall_s"] >= 0
    twins = list(run.twins())
    assert [t.patient.id for t in twins] == patients.ids and all(t.n_draws == 12 for t in twins)
    s = run.summary()
    assert list(s.index) == patients.ids and (s["status"] == "ok").all()
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST] + [f"{i}.twin.nc" for i in patients.ids])


def test_same_results_sync_one_and_two_workers(patients, model, tmp_path):
    """Bitwise-identical posteriors whatever the scheduler: seeds depend on (seed, id) only."""
    pytest.importorskip("distributed")
    from distributed import LocalCluster

    calibrate_cohort(patients, model, tmp_path / "sync", scheduler="sync", calibrate_fn=fake_calibrate, **KW)
    ref = _posteriors(tmp_path / "sync")
    # scheduler=None: the function starts (and closes) its own local cluster of 1 worker
    r1 = calibrate_cohort(list(reversed(patients.patients)), model, tmp_path / "one", scheduler=None, n_workers=1, calibrate_fn=fake_calibrate, **KW)
    assert sorted(r1.computed) == sorted(patients.ids)
    _same(ref, _posteriors(tmp_path / "one"))
    # a scheduler address: an existing cluster of 2 workers (left running by the function)
    (tmp_path / "m2").mkdir()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster:
        r2 = calibrate_cohort(patients, model, tmp_path / "two", scheduler=cluster.scheduler_address, calibrate_fn=fake_calibrate, marker_dir=str(tmp_path / "m2"), **KW)
        assert r2.failed == [] and sorted(r2.computed) == sorted(patients.ids)
        assert len(cluster.workers) == 2
    _same(ref, _posteriors(tmp_path / "two"))
    assert sorted(_markers(tmp_path / "m2")) == sorted(patients.ids)


def test_failing_patient_is_recorded_and_others_succeed(patients, model, tmp_path):
    out, bad = tmp_path / "out", patients.ids[1]
    run = calibrate_cohort(patients, model, out, scheduler="sync", calibrate_fn=fake_calibrate, fail_ids=[bad], **KW)
    assert run.failed == [{"id": bad, "error": "RuntimeError: simulated sampler failure"}]
    assert sorted(run.ok) == sorted(set(patients.ids) - {bad})
    assert not (out / twin_filename(bad)).exists()
    m = json.loads((out / MANIFEST).read_text())["patients"][bad]
    assert m["status"] == "failed" and m["passed"] is None
    assert run.summary().loc[bad, "status"] == "failed"
    # a rerun (same settings) recomputes only the failed patient
    markers = tmp_path / "markers"
    markers.mkdir()
    run2 = calibrate_cohort(patients, model, out, scheduler="sync", calibrate_fn=fake_calibrate, fail_ids=[bad], marker_dir=str(markers), **KW)
    # (marker_dir is a calibrate keyword, so it is part of the settings: everything reran)
    assert sorted(run2.computed) == sorted(patients.ids)
    run3 = calibrate_cohort(patients, model, out, scheduler="sync", calibrate_fn=fake_calibrate, fail_ids=[bad], marker_dir=str(markers), **KW)
    assert run3.computed == [bad] and sorted(run3.skipped) == sorted(set(patients.ids) - {bad})


def test_resume_recomputes_only_what_changed(patients, model, tmp_path):
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    kw = dict(KW, scheduler="sync", calibrate_fn=fake_calibrate, marker_dir=str(markers))
    calibrate_cohort(patients, model, out, **kw)
    assert len(_markers(markers)) == N
    again = calibrate_cohort(patients, model, out, **kw)
    assert again.computed == [] and sorted(again.skipped) == sorted(patients.ids) and len(_markers(markers)) == N
    # a damaged twin file and a changed patient are recomputed, nothing else
    first, second = patients.ids[0], patients.ids[1]
    (out / twin_filename(first)).write_bytes(b"garbage")
    import dataclasses

    changed = list(patients)
    changed[1] = dataclasses.replace(changed[1], measurements=changed[1].measurements.iloc[:-1].reset_index(drop=True))
    r = calibrate_cohort(changed, model, out, **kw)
    assert sorted(r.computed) == sorted([first, second])
    Twin.load(out / twin_filename(first))
    # other settings (more draws): everything again
    r = calibrate_cohort(changed, model, out, **(kw | {"draws": 7}))
    assert sorted(r.computed) == sorted(patients.ids)
    assert json.loads((out / MANIFEST).read_text())["patients"][first]["draws"] == 7


_KILLED_RUN = """
import os, sys
from pathlib import Path
sys.path.insert(0, {here!r})
from test_cohort import fake_calibrate, _model, _patients, KW
from calibration.cohort import calibrate_cohort

marker = Path({markers!r})

def dying(patient, model, **kw):
    if len(list(marker.iterdir())) >= 2:   # the 3rd patient: the process dies mid-run
        os._exit(3)
    return fake_calibrate(patient, model, **kw)

calibrate_cohort(_patients(), _model(), {out!r}, scheduler="sync", calibrate_fn=dying, marker_dir=str(marker), **KW)
"""


def test_killed_run_restarts_and_finishes(patients, model, tmp_path):
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    code = _KILLED_RUN.format(here=str(HERE), markers=str(markers), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 3, proc.stderr
    done = _markers(markers)
    assert len(done) == 2
    m = json.loads((out / MANIFEST).read_text())["patients"]
    assert sorted(pid for pid, e in m.items() if e["status"] == "ok") == sorted(done)
    kept = {pid: (out / twin_filename(pid)).read_bytes() for pid in done}
    # a half-written file of the killed run (as a worker killed while saving would leave)
    (out / f".{twin_filename(patients.ids[2])}.abc123.tmp").write_bytes(b"partial")
    run = calibrate_cohort(patients, model, out, scheduler="sync", calibrate_fn=fake_calibrate, marker_dir=str(markers), **KW)
    assert sorted(run.skipped) == sorted(done) and sorted(run.computed) == sorted(set(patients.ids) - set(done))
    assert len(_markers(markers)) == N  # only the missing patients were computed
    assert {pid: (out / twin_filename(pid)).read_bytes() for pid in done} == kept
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert sorted(run.ok) == sorted(patients.ids)


def test_bad_inputs(patients, model, tmp_path):
    with pytest.raises(InputError, match="patients must be a cohort folder"):
        calibrate_cohort(42, model, tmp_path / "o", scheduler="sync", calibrate_fn=fake_calibrate)
    with pytest.raises(InputError, match="Patient objects"):
        calibrate_cohort([patients[0], "P2"], model, tmp_path / "o", scheduler="sync", calibrate_fn=fake_calibrate)
    with pytest.raises(InputError, match="does not exist"):
        calibrate_cohort(tmp_path / "nowhere", model, tmp_path / "o", scheduler="sync", calibrate_fn=fake_calibrate)
    with pytest.raises(InputError, match="empty"):
        calibrate_cohort([], model, tmp_path / "o", scheduler="sync", calibrate_fn=fake_calibrate)
    with pytest.raises(InputError, match="model_for"):
        calibrate_cohort(patients, "model", tmp_path / "o", scheduler="sync", calibrate_fn=fake_calibrate)
    with pytest.raises(InputError, match="draws"):
        calibrate_cohort(patients, model, tmp_path / "o", scheduler="sync", calibrate_fn=fake_calibrate, draws=0)
    with pytest.raises(InputError, match="duplicate"):
        calibrate_cohort([patients[0], patients[0]], model, tmp_path / "o", scheduler="sync", calibrate_fn=fake_calibrate)
    escaping = Patient(id="../escape")
    with pytest.raises(InputError, match="cannot name a file"):
        calibrate_cohort([patients[0], escaping], model, tmp_path / "o", scheduler="sync", calibrate_fn=fake_calibrate)
    assert not (tmp_path / "escape.twin.nc").exists()
    with pytest.raises(InputError, match="scheduler must be"):
        calibrate_cohort(patients, model, tmp_path / "o2", scheduler=3.5, calibrate_fn=fake_calibrate, progress=False)


def test_cohort_folder_and_model_function(good_bundle, model, tmp_path):
    good_bundle("cohort/P001")
    good_bundle("cohort/P002")
    seen = []

    def model_for(p):
        seen.append(p.id)
        return model

    run = calibrate_cohort(tmp_path / "cohort", model_for, tmp_path / "out", scheduler="sync", calibrate_fn=fake_calibrate, **KW)
    assert sorted(run.ok) == ["P001", "P002"] and sorted(seen) == ["P001", "P002"]
    tw = next(run.twins())
    assert tw.provenance["input_sha256"]  # file hashes of the bundle travel with the patient


def _interrupting(patient, model, *, marker_dir, **kw):
    if len(list(Path(marker_dir).iterdir())) >= 1:
        raise KeyboardInterrupt
    return fake_calibrate(patient, model, marker_dir=marker_dir, **kw)


def test_interrupted_run_keeps_finished_patients(patients, model, tmp_path):
    out, markers = tmp_path / "out", tmp_path / "markers"
    markers.mkdir()
    with pytest.raises(KeyboardInterrupt):
        calibrate_cohort(patients, model, out, scheduler="sync", calibrate_fn=_interrupting, marker_dir=str(markers), **KW)
    m = json.loads((out / MANIFEST).read_text())["patients"]
    assert [e["status"] for e in m.values()].count("ok") == 1 and not (out / ".cohort.lock").exists()
    run = calibrate_cohort(patients, model, out, scheduler="sync", calibrate_fn=fake_calibrate, marker_dir=str(markers), **(KW | {"progress": True}))
    assert len(run.skipped) == 1 and len(run.computed) == N - 1 and len(_markers(markers)) == N
