"""``twin demo``: the demonstration on a bundled real patient (grows with each capability)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["run_demo", "patient_summary"]


def patient_summary(patient) -> str:
    """A readable multi-line summary of a patient (ids, covariates, data, treatment, omics)."""
    c = patient.covariates
    lines = [f"Patient {patient.id}"]
    cov = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in (("age", c.age), ("sex", c.sex), ("weight [kg]", c.weight), ("height [cm]", c.height), ("BSA [m²]", c.bsa)) if v is not None]
    lines.append("  covariates          : " + (", ".join(cov) if cov else "none recorded") + f" ({c.species})")
    m = patient.measurements
    if len(m):
        for (arm, obs), g in m.groupby(["arm", "observable"], sort=True):
            vals = g["value"]
            cens = int(g["below_lloq"].sum())
            unit = g["unit"].iloc[0].replace("**3", "³")
            arm_txt = f"[{arm}] " if arm != "main" else ""
            lines.append(
                f"  {arm_txt}{obs:<20}: {len(g):3d} values over days {g['time'].min():g}-{g['time'].max():g}, "
                f"range {vals.min():.3g}-{vals.max():.3g} {unit}" + (f", {cens} below LLOQ" if cens else "")
            )
    ev = patient.history.events()
    if len(ev):
        for (arm, drug), g in ev.groupby(["arm", "drug"], sort=True):
            amt = g["amount"]
            total = f"{amt.sum():.6g} mg total" if not amt.isna().any() else "amount not recorded"
            arm_txt = f"[{arm}] " if arm != "main" else ""
            lines.append(f"  {arm_txt}{drug:<20}: {len(g)} administrations ({', '.join(sorted(g['route'].unique()))}) days {g['time'].min():g}-{g['time'].max():g}, {total}")
    if len(patient.phases):
        on = patient.phases[patient.phases["phase"] == "on"]
        lines.append(f"  phases              : {patient.phases['cycle'].nunique()} treatment cycles, {len(on)} on-treatment periods")
    layers = patient.omics.layers
    lines.append("  omics               : " + (", ".join(f"{n} ({len(getattr(patient.omics, n))})" for n in layers) if layers else "none (population priors will be used)"))
    if patient.labels:
        lines.append("  labels              : " + ", ".join(f"{k}={v}" for k, v in patient.labels.items()))
    return "\n".join(lines)


def run_demo(output: Path, seed: int = 2026) -> int:
    """Load a bundled real patient and print its summary. Returns the exit code."""
    from . import datasets

    patient = datasets.load_patient_example()
    print("twin demo: a bundled real patient (Bruchovsky et al. intermittent androgen deprivation trial)\n")
    print(patient_summary(patient))
    cohorts = [("Bruchovsky/Shaw IAD prostate", datasets.load_bruchovsky()), ("Novartis PDX Encyclopedia", datasets.load_pdxe())]
    print("\nBundled cohorts:")
    for name, cohort in cohorts:
        n_meas = sum(len(p.measurements) for p in cohort)
        print(f"  {name:<30} {len(cohort):4d} patients, {n_meas} measurements")
    return 0
