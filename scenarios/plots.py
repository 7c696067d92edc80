"""Figures of scenario results. Each function imports matplotlib inside itself and returns
a :class:`matplotlib.figure.Figure` (built without pyplot: no global state, no display
needed). Library code never calls these; :func:`save_png` writes a figure atomically.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from twin._atomic import atomic_write_bytes
from twin.errors import InputError

from .outcomes import DIM_ARM, DIM_DRAW, DIM_REPLICATE, DIM_TIME, kaplan_meier

__all__ = [
    "plot_trajectories",
    "plot_resistant_fraction",
    "plot_km",
    "plot_outcome_table",
    "save_png",
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _figure(figsize=(7.0, 4.5)):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _colors(n):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _bands(result: xr.Dataset, variable: str, arm) -> tuple[np.ndarray, dict[float, np.ndarray]]:
    if variable not in result.data_vars:
        raise InputError(f"the result has no variable {variable!r}; it has {sorted(map(str, result.data_vars))}")
    da = result[variable].sel({DIM_ARM: arm})
    sdims = [d for d in (DIM_DRAW, DIM_REPLICATE) if d in da.dims]
    y = np.asarray(da.transpose(*sdims, DIM_TIME).values, float).reshape(-1, result.sizes[DIM_TIME])
    qs = (0.05, 0.25, 0.5, 0.75, 0.95)
    with np.errstate(all="ignore"):
        q = np.nanquantile(y, qs, axis=0)
    return result[DIM_TIME].values.astype(float), dict(zip(qs, q))


def plot_trajectories(
    result: xr.Dataset,
    variable: str = "tumor_volume",
    *,
    arms: Sequence[str] | None = None,
    observed: pd.DataFrame | None = None,
    log_y: bool | None = None,
    title: str | None = None,
):
    """Posterior median with 50 % and 90 % bands per arm; observed points on top.

    ``observed``: long table (``time, observable, value, censored``); uncensored values are
    filled dots, censored ones (true value below the plotted value, e.g. below the LLOQ)
    open downward triangles. ``log_y`` defaults to True for PSA and ctDNA.
    """
    arms = list(arms) if arms is not None else [str(a) for a in result[DIM_ARM].values]
    fig = _figure()
    ax = fig.add_subplot()
    for arm, c in zip(arms, _colors(len(arms))):
        t, q = _bands(result, variable, arm)
        ax.fill_between(t, q[0.05], q[0.95], color=c, alpha=0.15, linewidth=0, label=f"{arm} 90%")
        ax.fill_between(t, q[0.25], q[0.75], color=c, alpha=0.30, linewidth=0, label=f"{arm} 50%")
        ax.plot(t, q[0.5], color=c, lw=1.8, label=f"{arm} median")
    if observed is not None and len(observed):
        o = observed[observed["observable"] == variable]
        cens = o["censored"].astype(bool) if "censored" in o.columns else pd.Series(False, index=o.index)
        ax.scatter(o.loc[~cens, "time"], o.loc[~cens, "value"], color="k", s=18, zorder=5, label="observed")
        if cens.any():
            ax.scatter(o.loc[cens, "time"], o.loc[cens, "value"], facecolors="none", edgecolors="k", marker="v",
                       s=30, zorder=5, label="observed (censored, below)")
    units = result[variable].attrs.get("units", "")
    if log_y if log_y is not None else variable in ("psa", "ctdna"):
        ax.set_yscale("log")
    ax.set_xlabel("time [day]")
    ax.set_ylabel(f"{variable} [{units}]")
    ax.set_title(title or f"{variable}: posterior median, 50% and 90% bands")
    ax.legend(fontsize="small", ncols=2)
    return fig


def plot_resistant_fraction(result: xr.Dataset, *, arms: Sequence[str] | None = None, threshold: float | None = 0.5):
    """Resistant fraction over time per arm (median, 50 % and 90 % bands) with the threshold."""
    arms = list(arms) if arms is not None else [str(a) for a in result[DIM_ARM].values]
    fig = _figure()
    ax = fig.add_subplot()
    for arm, c in zip(arms, _colors(len(arms))):
        t, q = _bands(result, "resistant_fraction", arm)
        ax.fill_between(t, q[0.05], q[0.95], color=c, alpha=0.15, linewidth=0)
        ax.fill_between(t, q[0.25], q[0.75], color=c, alpha=0.30, linewidth=0)
        ax.plot(t, q[0.5], color=c, lw=1.8, label=arm)
    if threshold is not None:
        ax.axhline(threshold, color="grey", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("time [day]")
    ax.set_ylabel("resistant fraction [1]")
    ax.set_title("Resistant fraction: median, 50% and 90% bands")
    ax.legend(fontsize="small")
    return fig


def plot_km(source, *, title: str | None = None):
    """Kaplan-Meier curves per arm, with censoring ticks.

    ``source``: a :class:`scenarios.compare.VirtualTrial` (cohort curves, log-rank p in the
    title) or a time-to-event outcome DataArray (one patient: KM over posterior draws).
    """
    fig = _figure()
    ax = fig.add_subplot()
    if isinstance(source, xr.DataArray):
        if "event" not in source.coords:
            raise InputError("plot_km: the outcome has no 'event' coord (use a time-to-event outcome)")
        curves = {}
        for arm in source[DIM_ARM].values:
            sub = source.sel({DIM_ARM: arm})
            ev = np.asarray(sub["event"].values, bool).ravel()
            dur = np.where(ev, np.asarray(sub.values, float).ravel(), np.asarray(sub["followup"].values, float).ravel())
            curves[str(arm)] = (dur, ev)
        label = source.attrs.get("outcome", source.name)
        subtitle = "over posterior draws"
    elif hasattr(source, "table") and hasattr(source, "logrank"):
        curves = {a: (g["duration"].to_numpy(float), g["event"].to_numpy(bool))
                  for a, g in source.table.groupby("arm", sort=False)}
        label = source.outcome
        p = source.logrank.get("p_value", np.nan)
        subtitle = f"virtual cohort (sample: {source.sample}); log-rank p = {p:.3g}"
    else:
        raise InputError(f"plot_km: expected a VirtualTrial or a time-to-event DataArray, got {type(source).__name__}")
    for (arm, (dur, ev)), c in zip(curves.items(), _colors(len(curves))):
        ok = np.isfinite(dur)
        dur, ev = dur[ok], ev[ok]
        t, s = kaplan_meier(dur, ev)
        tt = np.concatenate([[0.0], t, [dur.max() if dur.size else 0.0]])
        ss = np.concatenate([[1.0], s, [s[-1] if s.size else 1.0]])
        ax.step(tt, ss, where="post", color=c, lw=1.8, label=f"{arm} (n={dur.size})")
        cens_t = dur[~ev]
        if cens_t.size:
            s_at = np.array([ss[np.searchsorted(tt, x, side="right") - 1] for x in cens_t])
            ax.plot(cens_t, s_at, "|", color=c, ms=8, mew=1.2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time [day]")
    ax.set_ylabel("event-free probability")
    ax.set_title(title or f"{label}: Kaplan-Meier, {subtitle}", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


def plot_outcome_table(summary: pd.DataFrame, *, title: str = "Outcomes: posterior median [90% interval]"):
    """A figure showing a :func:`scenarios.outcomes.summarize` table."""
    if summary.empty:
        raise InputError("plot_outcome_table: the summary table is empty")

    def fmt(x):
        if x is None or (isinstance(x, float) and np.isnan(x)):
            return "-"
        if np.isinf(x):
            return "not reached"
        return f"{x:.3g}"

    cells = [[r["arm"], r["outcome"], f"{fmt(r['median'])} [{fmt(r['q05'])}, {fmt(r['q95'])}]", str(r["units"]),
              "-" if pd.isna(r["n_events"]) else f"{int(r['n_events'])}/{int(r['n'])}",
              "KM" if "Kaplan" in str(r["method"]) else ("MC mean" if "MCSE" in str(r["method"]) else "empirical")]
             for _, r in summary.iterrows()]
    fig = _figure(figsize=(7.5, 0.7 + 0.3 * (len(cells) + 1)))
    ax = fig.add_subplot()
    ax.axis("off")
    tab = ax.table(cellText=cells, colLabels=["arm", "outcome", "median [q05, q95]", "units", "events", "method"],
                   loc="center", cellLoc="left")
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.auto_set_column_width(list(range(6)))
    ax.set_title(title, fontsize="medium")
    return fig


def save_png(fig, path: str | Path, *, dpi: int = 150) -> Path:
    """Render ``fig`` to PNG in memory, then write it atomically to ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    data = buf.getvalue()
    if not data.startswith(PNG_MAGIC):  # pragma: no cover - matplotlib always writes PNG here
        raise RuntimeError("matplotlib did not produce a PNG")
    atomic_write_bytes(path, data)
    return Path(path)
