"""The Twin and its file (twin/twin.py): exact round trip, draws, errors, atomicity, lightness."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from twin.errors import InputError
from twin.graph import load_pathway
from twin.model import TwinModel
from twin.twin import FORMAT, Twin, patient_hash, provenance_for

ROOT = Path(__file__).resolve().parents[1]

az = pytest.importorskip("arviz")


@pytest.fixture(scope="module")
def model():
    return TwinModel.from_graph(load_pathway("androgen_receptor"), drugs=["leuprolide", "cyproterone_acetate"], pathway=False)


@pytest.fixture(scope="module")
def patient():
    import twin.datasets

    return twin.datasets.load_patient_example()


def _idata(seed=0, chains=2, draws=30):
    rng = np.random.default_rng(seed)
    obs_t = np.array([0.0, 28.0, 56.0, 84.0, 112.0])
    return az.from_dict(
        posterior={
            "r_max": rng.lognormal(-2.3, 0.2, (chains, draws)),
            "N0": rng.lognormal(20.0, 0.5, (chains, draws)),
            "sigma_psa": rng.lognormal(-1.0, 0.1, (chains, draws)),
        },
        posterior_predictive={"psa": rng.lognormal(1.0, 0.3, (chains, draws, obs_t.size))},
        observed_data={"psa": np.array([12.5, 8.1, 4.0, 2.2, 3.3])},
        constant_data={"time": obs_t},
        sample_stats={"diverging": rng.random((chains, draws)) > 0.95, "lp": rng.normal(size=(chains, draws)), "tree_depth": rng.integers(1, 6, (chains, draws))},
        dims={"psa": ["obs"], "time": ["obs"]},
        coords={"obs": np.arange(obs_t.size)},
    )


@pytest.fixture
def tw(patient, model):
    diag = {"passed": True, "messages": ["ok"], "rhat_max": 1.004, "ess_bulk_min": 812.5, "ess_tail_min": 700.0, "divergences": 0, "bfmi_min": 0.91, "ppc_coverage90": 0.9}
    prov = provenance_for(patient, seed=7, method="nuts", extra={"command": "twin calibrate P001"})
    return Twin(patient, model, _idata(), fixed={"K": 2.0e12}, method="nuts", seed=7, diagnostics=diag, provenance=prov)


def _assert_same(a: Twin, b: Twin):
    assert set(a.idata.groups()) == set(b.idata.groups())
    for g in a.idata.groups():
        da, db = a.idata[g], b.idata[g]
        assert set(da.data_vars) == set(db.data_vars), g
        for v in da.data_vars:
            x, y = da[v].values, db[v].values
            assert x.dtype == y.dtype and x.shape == y.shape, (g, v)
            assert x.tobytes() == y.tobytes(), (g, v)  # bitwise
            assert da[v].dims == db[v].dims
        for c in da.coords:
            np.testing.assert_array_equal(da[c].values, db[c].values)
        assert da.attrs == db.attrs
    pa, pb = a.patient, b.patient
    assert pa.id == pb.id
    pd.testing.assert_frame_equal(pa.measurements, pb.measurements)
    pd.testing.assert_frame_equal(pa.history.table, pb.history.table)
    pd.testing.assert_frame_equal(pa.phases, pb.phases)
    assert pa.covariates == pb.covariates and pa.labels == pb.labels and pa.time_origin == pb.time_origin
    assert pa.source == pb.source and pa.notes == pb.notes
    assert a.model.spec() == b.model.spec()
    assert (a.fixed, a.method, a.seed, a.kind) == (b.fixed, b.method, b.seed, b.kind)
    assert a.diagnostics == b.diagnostics
    assert a.provenance == b.provenance


def test_save_load_round_trip_is_exact(tw, tmp_path):
    path = tw.save(tmp_path / "P.twin.nc")
    assert path == tmp_path / "P.twin.nc" and path.is_file()
    back = Twin.load(path)
    _assert_same(tw, back)
    assert patient_hash(back.patient) == patient_hash(tw.patient)
    # the loaded twin is in memory: the file can be replaced while it is in use
    back.save(path)
    _assert_same(tw, Twin.load(path))
    assert [p.name for p in tmp_path.iterdir()] == ["P.twin.nc"]


def test_draws_shapes_fixed_and_defaults(tw, model):
    assert tw.n_draws == 60 and tw.n_chains == 2
    d = tw.draws
    assert list(d) == list(model.parameter_names)
    assert all(v.shape == (60,) for v in d.values())
    post = tw.idata.posterior
    np.testing.assert_array_equal(d["r_max"][:30], post["r_max"].values[0])  # chain-major
    np.testing.assert_array_equal(d["r_max"][30:], post["r_max"].values[1])
    assert np.all(d["K"] == 2.0e12)  # fixed, broadcast
    assert np.all(d["d_max"] == model.default_values()["d_max"])  # neither: the default
    assert tw.calibrated == ("r_max", "N0") and tw.error_names == ("sigma_psa",)
    assert list(tw.error_draws) == ["sigma_psa"] and tw.error_draws["sigma_psa"].shape == (60,)
    src = tw.parameter_source()
    assert list(src) == list(model.parameter_names)
    assert (src["r_max"], src["N0"], src["K"], src["d_max"]) == ("calibrated", "calibrated", "fixed", "default")


def test_summary(tw, model):
    s = tw.summary()
    assert list(s.index) == list(model.parameter_names) + ["sigma_psa"]
    assert {"unit", "median", "q05", "q95", "r_hat", "ess_bulk"} <= set(s.columns)
    assert s.loc["r_max", "unit"] == "1/day"
    assert s.loc["r_max", "q05"] < s.loc["r_max", "median"] < s.loc["r_max", "q95"]
    assert np.isfinite(s.loc["r_max", "r_hat"]) and np.isfinite(s.loc["sigma_psa", "ess_bulk"])
    assert np.isnan(s.loc["K", "r_hat"]) and s.loc["K", "median"] == 2.0e12


def test_from_draws_and_single_chain(patient, model, tmp_path):
    rng = np.random.default_rng(1)
    t = Twin.from_draws(patient, model, {"r_max": rng.random((1, 8)), "sigma_psa": rng.random(8)}, fixed={"N0": 1e9}, method="prior", seed=1)
    assert t.kind == "prior" and t.n_draws == 8 and set(t.idata.groups()) == {"posterior"}
    assert t.provenance["seed"] == 1 and t.provenance["patient_id"] == patient.id
    s = t.summary()
    assert np.isnan(s["r_hat"]).all()
    _assert_same(t, Twin.load(t.save(tmp_path / "prior.twin.nc")))
    with pytest.raises(InputError, match="not parameters of the model"):
        Twin.from_draws(patient, model, {"r_max": rng.random((1, 8))}, fixed={"r_maxx": 1.0})
    with pytest.raises(InputError, match="both fixed and in the posterior"):
        Twin.from_draws(patient, model, {"r_max": rng.random((1, 8))}, fixed={"r_max": 1.0})
    with pytest.raises(InputError, match="same number of chains"):
        Twin.from_draws(patient, model, {"r_max": rng.random((1, 8)), "N0": rng.random((2, 8))})


def test_provenance_for(patient):
    p = provenance_for(patient, seed=3, method="advi", extra={"command": "x"})
    assert {"created", "method", "seed", "versions", "input_sha256", "patient_sha256", "python", "platform", "command"} <= set(p)
    assert set(p["versions"]) == {"twin", "numpy", "scipy", "torch", "pymc", "arviz", "pytensor", "xarray"}
    assert p["input_sha256"] == patient.source["sha256"] and p["created"].endswith("+00:00")
    assert p["seed"] == 3 and p["method"] == "advi"


def test_not_a_twin_file(tw, tmp_path):
    import h5netcdf
    import xarray as xr

    with pytest.raises(InputError, match="does not exist") as e:
        Twin.load(tmp_path / "missing.twin.nc")
    assert "Traceback" not in str(e.value)
    text = tmp_path / "notes.twin.nc"
    text.write_text("hello")
    with pytest.raises(InputError, match="not a NetCDF-4/HDF5 file"):
        Twin.load(text)
    other = tmp_path / "other.nc"
    xr.Dataset({"x": ("t", np.arange(3.0))}).to_netcdf(other, engine="h5netcdf")
    with pytest.raises(InputError, match="not a twin file"):
        Twin.load(other)
    with pytest.raises(InputError, match="is a folder"):
        Twin.load(tmp_path)
    # a wrong format tag / a newer format version
    for attr, value, message in (("format", "something.else", "not a twin file"), ("format_version", 2, "format version 2")):
        p = tw.save(tmp_path / f"{attr}.twin.nc")
        with h5netcdf.File(p, "a") as f:
            f.groups["twin"].attrs[attr] = value
        with pytest.raises(InputError, match=message):
            Twin.load(p)
    assert FORMAT == "twin.twin_file"


def test_atomic_save_never_leaves_a_partial_file(tw, tmp_path, monkeypatch):
    target = tmp_path / "P.twin.nc"

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        tw.save(target)
    assert list(tmp_path.iterdir()) == []  # no target, no temporary file
    monkeypatch.undo()
    tw.save(target)
    before = target.read_bytes()
    other = Twin.from_draws(tw.patient, tw.model, {"r_max": np.ones((1, 3))}, seed=9)
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        other.save(target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["P.twin.nc"]
    monkeypatch.undo()
    _assert_same(tw, Twin.load(target))


def test_load_does_not_import_pymc(tw, tmp_path):
    p = tw.save(tmp_path / "P.twin.nc")
    code = (
        "import sys\nfrom twin.twin import Twin\n"
        f"t = Twin.load({str(p)!r})\n"
        "assert t.n_draws == 60\n"
        "bad = [m for m in ('pymc', 'pytensor', 'calibration', 'scenarios') if m in sys.modules]\n"
        "assert not bad, bad\n"  # (arviz itself imports matplotlib)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_lazy_export():
    import twin
    from twin.twin import Twin as T

    assert twin.Twin is T


def test_twin_is_a_scenario_input(tw):
    from scenarios.run import _as_twin

    pt = _as_twin(tw)
    assert pt.kind == "posterior" and pt.seed == 7 and pt.n_draws == 60
    assert set(pt.draws) == set(tw.model.parameter_names)


def test_neural_residual_travels_in_the_file(patient, tmp_path):
    torch = pytest.importorskip("torch")
    from twin.residual import NeuralResidual

    m = TwinModel.from_graph(load_pathway("androgen_receptor"), drugs=["leuprolide"])
    m = m.with_residual(NeuralResidual(m.nodes, m.drugs, seed=3))
    back = Twin.load(Twin.from_draws(patient, m, {"r_max": np.ones((1, 4))}).save(tmp_path / "r.twin.nc"))
    sa, sb = m.residual.state_dict(), back.model.residual.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert back.model.spec() == m.spec()
