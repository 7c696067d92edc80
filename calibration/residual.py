"""``twin train-residual``: fit the shared neural-residual weights on a cohort of twins.

Each calibrated twin (a ``.twin.nc`` file, e.g. from ``twin calibrate-cohort``) gives one
training series per arm with tumour-volume data: its posterior-median parameters, the
arm's exposure from the dosing history (the simulator's closed-form PK) and its observed
log volumes. :func:`twin.residual.train_residual` then fits the residual with the
mechanistic parameters held fixed. All twins must share one model structure (same drugs,
mechanisms, growth law). Calibrations that follow use the saved weights fixed
(``TwinModel.with_residual(NeuralResidual.load(path))``). Keep the residual only when it
improves held-out fit (see ``docs/validation.md``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from twin.errors import InputError

__all__ = ["cohort_series", "train_cohort_residual"]


def _exposure_function(model, regimen):
    from twin.simulate import _Exposure

    ex = _Exposure(model, regimen)
    events = ex.event_times()
    nd = len(model.drugs)

    def f(t):
        t = float(t)
        j = np.searchsorted(events, t, side="right") - 1
        if j < 0:
            return np.zeros(nd)
        at, any_dose = ex.segment(float(events[j]))
        return at(np.array([t]))[0] if any_dose else np.zeros(nd)

    return f, events


def cohort_series(twins) -> tuple[object, list]:
    """(model, [CohortSeries]) from calibrated twins (tumour-volume arms only)."""
    from twin.regimen import Regimen
    from twin.residual import CohortSeries

    model, spec, items = None, None, []
    for tw in twins:
        s = json.dumps(tw.model.without_residual().spec(), sort_keys=True, default=str)
        if spec is None:
            model, spec = tw.model.without_residual(), s
        elif s != spec:
            raise InputError(f"train-residual: twin {tw.patient.id!r} has a different model structure from the first twin; all twins of a training cohort must share one model (same drugs, mechanisms, growth)")
        med = {k: float(np.median(v)) for k, v in tw.draws.items()}
        m = tw.patient.measurements
        for arm in sorted(set(m.loc[m["observable"] == "tumor_volume", "arm"])):
            sub = m[(m["arm"] == arm) & (m["observable"] == "tumor_volume") & ~m["below_lloq"].astype(bool) & (m["value"] > 0)].sort_values("time")
            sub = sub.drop_duplicates("time")
            if len(sub) < 3:
                continue
            hist = tw.patient.history.table
            reg = Regimen(hist[hist["arm"] == arm].assign(arm="main")) if len(hist) else Regimen.empty()
            t = sub["time"].to_numpy(dtype=float)
            p = dict(med)
            if "N0_arm" in tw.idata.posterior and arm in list(tw.idata.posterior["arm"].values):
                p["N0"] = float(np.median(tw.idata.posterior["N0_arm"].sel(arm=arm).values))
            f, ev = _exposure_function(model, reg) if len(reg) else (None, np.zeros(0))
            items.append(CohortSeries(parameters=p, exposure=f, times=t, log_volume=np.log(sub["value"].to_numpy(dtype=float)),
                                      events=tuple(float(e) for e in ev if t[0] < e < t[-1])))
    if not items:
        raise InputError("train-residual: no twin has an arm with >= 3 positive tumour volumes to train on")
    return model, items


def train_cohort_residual(cohort, output, *, epochs: int = 200, seed: int = 0, progress: bool = True, **kw) -> Path:
    """Train the residual on the twins in folder ``cohort`` and save it to ``output``."""
    from twin.residual import train_residual
    from twin.twin import Twin

    folder = Path(cohort)
    if not folder.is_dir():
        raise InputError(f"train-residual: {cohort!r} is not a folder; give the folder of .twin.nc files written by twin calibrate-cohort")
    files = sorted(folder.glob("*.twin.nc"))
    if not files:
        raise InputError(f"train-residual: no .twin.nc file in {cohort!r}; run twin calibrate-cohort first")
    model, items = cohort_series(Twin.load(f) for f in files)

    def cb(epoch, loss):
        if progress and (epoch % 10 == 0 or epoch == epochs - 1):
            print(f"  epoch {epoch + 1}/{epochs}: mean squared error of ln volume {loss:.4f}", flush=True)

    residual, history = train_residual(model, items, epochs=int(epochs), seed=int(seed), callback=cb, **kw)
    out = Path(output)
    residual.save(out)
    return out
