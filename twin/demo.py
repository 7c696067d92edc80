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


DEMO_PDX = "X-1906"
DEMO_ARMS = ("untreated", "encorafenib+binimetinib")


def build_pdx_twin(patient, *, n_draws: int, seed: int, horizon: float):
    """The prior twin of a PDX patient: MAPK/PI3K model shifted by its omics, prior draws
    (baseline size centred on the first observed volume), simulated under two recorded arms."""
    import numpy as np

    from .graph import load_pathway
    from .model import CELL_VOLUME_MM3, TwinModel
    from .omics import omics_priors
    from .priors import sample_prior
    from .regimen import Regimen
    from .simulate import simulate

    graph = load_pathway("mapk_pi3k")
    model = TwinModel.from_graph(graph, drugs=["encorafenib", "binimetinib"], mechanisms=["mek_mutation"])
    op = omics_priors(patient.omics, graph)
    priors = model.default_priors(op)
    v0 = float(np.median([patient.series("tumor_volume", a)["value"].iloc[0] for a in DEMO_ARMS]))
    priors["N0"] = ("lognormal", {"mu": float(np.log(v0 / CELL_VOLUME_MM3)), "sigma": 0.1})
    draws = sample_prior(priors, n_draws, seed=seed)
    regimens = {a: Regimen(patient.history.for_arm(a).table.assign(arm="main")) if a != "untreated" else Regimen.empty() for a in DEMO_ARMS}
    times = np.arange(0.0, horizon + 1.0)
    result = simulate(model, draws, regimens, times, seed=seed, pathway_states=False)
    return model, op, result


def plot_pdx_twin(result, patient, path: Path) -> Path:
    """Two panels (one per arm): prior 50%/90% bands and median of tumour volume, observed points."""
    import io

    import numpy as np
    from matplotlib.figure import Figure

    from ._atomic import atomic_write_bytes

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, len(DEMO_ARMS), sharey=True)
    t = result["time"].values
    for ax, arm, color in zip(axes, DEMO_ARMS, ("#555555", "#1f77b4")):
        v = result["tumor_volume"].sel(regimen=arm).values
        q = np.nanquantile(v, [0.05, 0.25, 0.5, 0.75, 0.95], axis=0)
        ax.fill_between(t, q[0], q[4], color=color, alpha=0.15, lw=0, label="twin 90% (prior)")
        ax.fill_between(t, q[1], q[3], color=color, alpha=0.3, lw=0, label="twin 50%")
        ax.plot(t, q[2], color=color, lw=2, label="twin median")
        obs = patient.series("tumor_volume", arm)
        obs = obs[obs["time"] <= t[-1]]
        ax.scatter(obs["time"], obs["value"], color="k", s=16, zorder=5, label="observed")
        ax.set_yscale("log")
        ax.set_title(arm)
        ax.set_xlabel("day")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("tumour volume [mm³]")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Patient-derived tumour {patient.id}: prior twin from its omics vs what was observed")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())
    return path


def run_demo(output: Path, seed: int = 2026, n_draws: int = 100, horizon: float = 56.0) -> int:
    """The demonstration: a bundled real patient's summary, then the prior twin of a bundled
    PDX built from its omics, simulated under two arms, with a PNG of the trajectories."""
    import time
    import warnings

    import numpy as np

    from . import datasets

    patient = datasets.load_patient_example()
    print("twin demo\n\n1. A bundled real patient (Bruchovsky et al. intermittent androgen deprivation trial)\n")
    print(patient_summary(patient))
    cohorts = [("Bruchovsky/Shaw IAD prostate", datasets.load_bruchovsky()), ("Novartis PDX Encyclopedia", datasets.load_pdxe())]
    print("\nBundled cohorts:")
    for name, cohort in cohorts:
        n_meas = sum(len(p.measurements) for p in cohort)
        print(f"  {name:<30} {len(cohort):4d} patients, {n_meas} measurements")

    pdx = cohorts[1][1][DEMO_PDX]
    print(f"\n2. The prior twin of PDX {pdx.id} ({pdx.labels.get('tissue_name', '')}) built from its omics\n")
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True):  # imputed-dose warnings are printed as notes below
        warnings.simplefilter("always")
        model, op, result = build_pdx_twin(pdx, n_draws=n_draws, seed=seed, horizon=horizon)
    elapsed = time.perf_counter() - t0
    nodes = op.node_table()
    if len(nodes):
        print("  omics -> prior shifts on pathway nodes:")
        for _, r in nodes.iterrows():
            print(f"    {r['node']:<8} {r['quantity']:<13} {r['mean']:+.2f} ± {r['sd']:.2f}  ({r['sources'][:60]})")
    for r in op.resistance:
        print(f"  resistance prior: {r.mechanism} (mean initial fraction {r.mean:.2g}; {r.source})")
    for line in str(result.attrs.get("notes", "")).splitlines():
        if line.strip():
            print(f"  note: {line.strip()[:200]}")
    failed = int((result["status"].values != 0).sum())
    print(f"  simulated {n_draws} prior draws x {len(DEMO_ARMS)} arms x {horizon:g} days in {elapsed:.1f} s ({failed} failed draws)")
    print("\n  tumour volume [mm³]: twin median (90% interval) vs observed")
    for arm in DEMO_ARMS:
        obs = pdx.series("tumor_volume", arm)
        for day in (0.0, 21.0, float(horizon)):
            hit = obs[obs["time"] == day]
            v = result["tumor_volume"].sel(regimen=arm, time=day).values
            lo, med, hi = np.nanquantile(v, [0.05, 0.5, 0.95])
            o = f"{hit['value'].iloc[0]:9.1f}" if len(hit) else "        —"
            print(f"    {arm:<24} day {day:4.0f}: {med:9.1f} ({lo:8.1f}-{hi:9.1f})   observed {o}")
    output = Path(output)
    png = plot_pdx_twin(result, pdx, output / f"{pdx.id}_prior_twin.png")
    print(f"\n  picture: {png}")
    print("\nThese are prior predictions (no calibration yet): the bands show what the omics and the")
    print("population priors allow before the twin has seen this tumour's measurements.")
    return 0
