"""Synthetic patients simulated from known parameters (posterior-recovery tests, docs).

``synthetic_patient(model, truth, regimen, times)`` simulates the twin with ``truth``
(``twin.simulate``, tight tolerances), observes ``observable`` at ``times`` with
log-normal noise ``sigma`` (seeded) and returns a :class:`twin.Patient` whose values below
``lloq`` are marked censored, exactly as a loaded patient file would be.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

__all__ = ["synthetic_patient"]


def synthetic_patient(model, truth: Mapping[str, float], regimen, times, *, observable: str = "tumor_volume", sigma: float = 0.1,
                      lloq: float | None = None, seed: int = 0, patient_id: str = "synthetic", arm: str = "main"):
    """A patient whose ``observable`` follows ``model`` at ``truth`` with log-normal noise."""
    from twin.patient import Patient
    from twin.regimen import Regimen
    from twin.simulate import simulate

    times = np.asarray(times, dtype=float)
    reg = regimen if regimen is not None else Regimen.empty()
    res = simulate(model, {k: np.array([float(v)]) for k, v in truth.items()}, {"main": Regimen(reg.table.assign(arm="main")) if len(reg) else reg}, times,
                   rtol=1e-10, atol=1e-12)
    if int(res["status"].values.max()) != 0:
        raise RuntimeError(f"synthetic_patient: the simulation failed: {res['status_message'].values.ravel()[0]}")
    mean = res[observable].values[0, 0]
    rng = np.random.default_rng(seed)
    val = np.exp(np.log(mean) + sigma * rng.standard_normal(mean.shape))
    cens = np.zeros(len(val), dtype=bool) if lloq is None else val < lloq
    unit = model.observable_units.get(observable, "")
    meas = pd.DataFrame({
        "arm": arm, "time": times, "observable": observable, "value": np.where(cens, np.nan, val),
        "lloq": np.nan if lloq is None else float(lloq), "below_lloq": cens, "unit": unit, "note": None,
    })
    hist = Regimen(reg.table.assign(arm=arm)) if len(reg) else Regimen.empty()
    return Patient(id=patient_id, measurements=meas, history=hist, source={"synthetic": {"seed": int(seed), "sigma": float(sigma), "truth": {k: float(v) for k, v in truth.items()}}})
