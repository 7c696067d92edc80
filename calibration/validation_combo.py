"""PDXE combination arms predicted from the monotherapies (issue #6, split kind ``pdxe_combo``).

For every PDX with an untreated arm, a combination arm (``a+b[+c]``) and every component of it as a
single-agent arm, the twin is calibrated **once** on untreated + the component single-agent arms
(the model is built on those arms and the combination arms, so it has every drug) and forecasts each
combination arm from its first observed volume (:func:`pdxe_combo_split`). Nothing of a combination
arm is seen by the calibration: the twin's combination forecast is its mechanistic composition of the
drugs it learned one at a time.

Baselines per combination arm, on the same points:

* ``pop``: the combination's population mean log-ratio curve over the other PDXs,
* ``untr``: the PDX's own untreated curve plus the combination's mean effect in the other PDXs
  (both exactly as :func:`calibration.validation.pdxe_split` does for a single-agent arm),
* ``bliss``: response additivity on log growth from the PDX's **own** curves (a Bliss-like
  independence baseline, :func:`bliss_log_ratio`): log-ratio_combo(t) = log-ratio_untreated(t) +
  sum over components (log-ratio_A(t) - log-ratio_untreated(t)), each curve extrapolated past its
  last day as the "untr" baseline extrapolates (linear in log with the slope of its last points).
  Its predictive SD is the "untr" baseline's per-day SD (the across-PDX SD of the combination's
  effect); without one (fewer than two other PDXs with the combination and untreated) the fallback
  ``COMBO_SETTINGS["bliss_sd_fallback"]`` per day.

The settings of this kind live in :data:`COMBO_SETTINGS` (not in ``SETTINGS``, which is hashed into
every split's fingerprint): they are hashed into the ``pdxe_combo`` fingerprint only.
"""

from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from .validation import (
    SETTINGS,
    _dosable,
    _extrapolate_log,
    _pdx_arm_frequency,
    _pdx_held_arm,
    _pdx_twin_diagnostics,
    _quiet,
    _vol_curve,
    pdx_pooled_stats,
)

__all__ = ["COMBO_SETTINGS", "COMBO_QUICK_PDX", "pdxe_combo_candidates", "pdxe_combo_tasks", "pdxe_combo_split", "bliss_log_ratio",
           "combo_summary", "combo_results_markdown", "combo_discussion_markdown", "combo_components", "combo_eligibility_counts"]

#: fixed before the first combination result was looked at; hashed into the pdxe_combo fingerprint
COMBO_SETTINGS = {
    "max_single_arms": 4,  # cap on the component single-agent arms one PDX's twin is calibrated on
    "bliss_sd_fallback": 0.5,  # per-day SD (log volume) of the Bliss baseline when the combination has no across-PDX SD
}
#: PDXs of a ``--quick`` run
COMBO_QUICK_PDX = 2


def combo_components(arm: str) -> list[str]:
    """The component treatments of combination arm ``arm`` (``"a+b"`` -> ``["a", "b"]``)."""
    return [c.strip() for c in arm.split("+") if c.strip()]


def _drugs(p, arm) -> set:
    h = p.history.table
    return set(h.loc[h["arm"] == arm, "drug"].str.lower())


def pdxe_combo_candidates(p) -> tuple[list[str], list[str]]:
    """(eligible combination arms, the component single-agent arms they need) of PDX ``p``, before the cap.

    Eligible: the PDX has 'untreated' with >= ``SETTINGS['pdx_min_volumes']`` volumes; the arm's name has
    '+' and no '-' (dose suffix), all its drugs are ``_dosable`` and it has >= that many volumes; every
    component is a single-agent arm of the PDX (dosable drugs) with >= that many volumes."""
    m = p.measurements
    arms = set(m.loc[m["observable"] == "tumor_volume", "arm"])
    nmin = SETTINGS["pdx_min_volumes"]
    if "untreated" not in arms or len(_vol_curve(p, "untreated")[0]) < nmin:
        return [], []

    def single_ok(a):
        ds = _drugs(p, a)
        return a in arms and "+" not in a and "-" not in a and bool(ds) and all(_dosable(d) for d in ds) and len(_vol_curve(p, a)[0]) >= nmin

    combos, comps = [], set()
    for a in sorted(arms):
        if "+" not in a or "-" in a:
            continue
        ds = _drugs(p, a)
        cs = combo_components(a)
        if not ds or not all(_dosable(d) for d in ds) or len(_vol_curve(p, a)[0]) < nmin or len(cs) < 2:
            continue
        if all(single_ok(c) for c in cs):
            combos.append(a)
            comps.update(cs)
    return combos, sorted(comps)


def _select(p, max_single: int) -> tuple[list[str], list[str]]:
    """(training arms: 'untreated' + component single-agent arms, combination arms) of PDX ``p``
    under the cap: combinations most frequent in the cohort first (ties by name) are taken while the
    union of their components stays within ``max_single`` arms. Components ordered by cohort frequency."""
    freq = _pdx_arm_frequency()
    combos, _ = pdxe_combo_candidates(p)
    combos = sorted(combos, key=lambda a: (-freq.get(a, 0), a))
    chosen, comps = [], set()
    for a in combos:
        u = comps | set(combo_components(a))
        if len(u) <= max_single:
            chosen.append(a)
            comps = u
    if not chosen:
        return [], []
    singles = sorted(comps, key=lambda a: (-freq.get(a, 0), a))
    return ["untreated"] + singles, sorted(chosen)


def pdxe_combo_tasks(max_pdx=None) -> list[tuple]:
    """(pdx id, training arms, combination arms) per eligible PDX, ordered round-robin over tissues
    (sorted ids within a tissue, as :func:`calibration.validation.pdxe_tasks`)."""
    return [(pid, tuple(tr), tuple(cb)) for pid, tr, cb in _combo_tasks_cached(COMBO_SETTINGS["max_single_arms"])][: None if max_pdx is None else int(max_pdx)]


@lru_cache(maxsize=2)
def _combo_tasks_cached(max_single: int) -> tuple:
    from twin.datasets import load_pdxe

    by = {}
    for p in load_pdxe():
        tr, cb = _select(p, max_single)
        if cb:
            by.setdefault(p.labels.get("tissue", "?"), []).append((p.id, tuple(tr), tuple(cb)))
    for v in by.values():
        v.sort()
    order, keys, i = [], sorted(by), 0
    while any(i < len(by[k]) for k in keys):
        for k in keys:
            if i < len(by[k]):
                order.append(by[k][i])
        i += 1
    return tuple(order)


def combo_eligibility_counts() -> dict:
    """Eligible PDXs / combination arms before and after the cap (for the summary and the page)."""
    from twin.datasets import load_pdxe

    n_pdx = n_combo = 0
    for p in load_pdxe():
        c, _ = pdxe_combo_candidates(p)
        n_pdx += bool(c)
        n_combo += len(c)
    tasks = pdxe_combo_tasks(None)
    return {"n_pdx_eligible": n_pdx, "n_combos_eligible": n_combo, "n_pdx_tasks": len(tasks), "n_combos_tasks": sum(len(t[2]) for t in tasks)}


def bliss_log_ratio(untreated, components, days) -> np.ndarray:
    """Response additivity on log growth from one PDX's own curves: on ``days`` (days after each
    curve's first volume), log(V_combo(d)/V_combo(0)) = lr_U(d) + sum_i (lr_i(d) - lr_U(d)), where lr is
    a curve's log-ratio to its first volume, extrapolated past its end by
    :func:`calibration.validation._extrapolate_log`. ``untreated``, ``components``: (times, volumes)."""
    days = np.asarray(days, float)
    lu = _extrapolate_log(np.asarray(untreated[0], float), np.asarray(untreated[1], float), days)
    out = lu.copy()
    for t, v in components:
        out += _extrapolate_log(np.asarray(t, float), np.asarray(v, float), days) - lu
    return out


def pdxe_combo_split(pid: str, train_arms, combos, *, seed: int = 0, n_draws: int = 200, keep_curve: bool = True) -> dict:
    """One PDX: calibrate once on ``train_arms`` (model on ``train_arms + combos``), forecast each arm
    of ``combos`` as ``pdxe_split`` forecasts a held-out arm, with the baselines pop, untr and bliss.
    Returns ``{"row": task row, "arms": [{"row", "curve", "obs"} per combination arm]}``."""
    _quiet()
    from twin.datasets import load_pdxe

    from .calibrate import calibrate, default_model

    t_start = time.perf_counter()
    p = load_pdxe()[pid]
    train_arms, combos = list(train_arms), list(combos)
    task = {"pdx": pid, "tissue": p.labels.get("tissue"), "train_arms": "|".join(train_arms), "combos": "|".join(combos), "n_combos": len(combos),
            "status": "ok", "error": ""}
    state = {}
    try:
        model = default_model(p, arms=train_arms + combos)
        t_cal = time.perf_counter()
        tw = calibrate(p, model, method=SETTINGS["method"], draws=n_draws, chains=1, seed=seed, progress=False,
                       arms=train_arms, observables=["tumor_volume"])
        task["calibrate_s"] = round(time.perf_counter() - t_cal, 2)
        state["tw"] = tw
        state["diag"] = _pdx_twin_diagnostics(tw, train_arms)
        task.update(state["diag"])
    except Exception as e:
        task["status"] = "twin_failed"
        task["error"] = state["error"] = f"{type(e).__name__}: {e}"[:500]

    def twin(row):  # the PDX's one twin, calibrated above
        if "tw" not in state:
            raise RuntimeError(f"calibration failed: {state.get('error')}")
        row["calibrate_s"] = task["calibrate_s"]
        row.update(state["diag"])
        return state["tw"]

    out = []
    untr = _vol_curve(p, "untreated")
    for arm in combos:
        comps = [_vol_curve(p, c) for c in combo_components(arm)]

        def bliss(ctx, comps=comps):
            t, v, days, rng, n = ctx["t"], ctx["v"], ctx["days"], ctx["rng"], ctx["n_draws"]
            mu = bliss_log_ratio(untr, comps, days)
            s = ctx["untr_sd"]
            ctx["row"]["bliss_sd_source"] = "untr" if s is not None else "fallback"
            if s is None:
                s = np.full(len(t), COMBO_SETTINGS["bliss_sd_fallback"])
                s[0] = 1e-6
            return {"bliss": v[0] * np.exp(mu[None, :] + s[None, :] * rng.standard_normal((n, len(t))))}

        r = _pdx_held_arm(p, arm, train_arms, twin, seed=seed, n_draws=n_draws, keep_curve=keep_curve, extra_baselines=bliss)
        r["row"]["components"] = "|".join(combo_components(arm))
        out.append(r)
    task["n_twin_failed"] = sum(r["row"]["status"] != "ok" for r in out)
    if task["status"] == "ok" and task["n_twin_failed"]:
        task["status"] = "partly_failed"
    task["wall_s"] = round(time.perf_counter() - t_start, 2)
    for r in out:
        r["row"]["task_wall_s"] = task["wall_s"]
    return {"row": task, "arms": out}


# ======================================================================================
# summary, figure, page parts
# ======================================================================================
METHODS = ("twin", "pop", "untr", "bliss")
BASELINES = ("pop", "untr", "bliss")
LABELS = {"twin": "twin (calibrated on the monotherapies)", "pop": "combination population mean curve",
          "untr": "own untreated + combination mean effect", "bliss": "Bliss / response additivity (own monotherapies)"}
_SHORT = {"twin": "twin", "pop": "comb. pop. mean", "untr": "own untreated\n+ comb. effect", "bliss": "Bliss (own\nmonotherapies)"}


def combo_rows(res) -> list[dict]:
    """The per-combination-arm rows of the task results ``res`` (each row carries its fingerprint)."""
    rows = []
    for r in res:
        for a in r.get("arms", []):
            rows.append(dict(a["row"], model_fingerprint=r["row"].get("model_fingerprint")))
        if not r.get("arms") and r["row"].get("status") == "failed":  # the whole task failed
            rows.append(dict(r["row"]))
    return rows


def combo_summary(outdir: Path, res, *, log=print) -> dict:
    """Write ``<outdir>/pdxe_combo.csv`` and ``pdxe_combo.png``; return the summary section."""
    import pandas as pd

    from twin._atomic import atomic_write_text

    rows = pd.DataFrame(combo_rows(res))
    if not len(rows):
        return {}
    rows = rows.sort_values([c for c in ("pdx", "held_out") if c in rows])
    atomic_write_text(Path(outdir) / "pdxe_combo.csv", rows.to_csv(index=False))
    s = {"n_pdx": int(rows["pdx"].nunique()), "n_combos": int(len(rows)), "n_twin_failed": int((rows["status"] != "ok").sum()),
         "settings": dict(COMBO_SETTINGS)}
    common = rows.dropna(subset=[f"{m}_abslogerr_list" for m in METHODS if f"{m}_abslogerr_list" in rows])
    if not all(f"{m}_abslogerr_list" in rows for m in METHODS):
        common = common.iloc[:0]
    s["n_combos_common"] = int(len(common))
    s.update(pdx_pooled_stats(common, METHODS))
    base = [s.get(f"{m}_med_abslogerr", np.nan) for m in BASELINES]
    if "twin_med_abslogerr" in s and np.isfinite(np.nanmin(base)):
        s["best_baseline"] = BASELINES[int(np.nanargmin(base))]
        s["err_ratio"] = s["twin_med_abslogerr"] / float(np.nanmin(base))
        s["best_method"] = min(METHODS, key=lambda m: s.get(f"{m}_med_abslogerr", np.inf))
    if "class_obs" in rows:
        s["class_counts_obs"] = rows["class_obs"].value_counts().to_dict()
    for m in METHODS:
        if f"class_{m}" in rows:
            s[f"class_counts_{m}"] = rows[f"class_{m}"].fillna("NA").value_counts().to_dict()
    if "bliss_sd_source" in rows:
        s["n_bliss_sd_fallback"] = int((rows["bliss_sd_source"] == "fallback").sum())
    if "tissue" in rows:
        s["n_tissues"] = int(rows["tissue"].nunique())
    try:
        s.update(combo_eligibility_counts())
    except Exception:  # pragma: no cover
        pass
    tasks = pd.DataFrame([r["row"] for r in res])
    for c, src in (("task_wall_s", tasks.get("wall_s")), ("calibrate_s", tasks.get("calibrate_s")), ("forecast_s", rows.get("forecast_s")),
                   ("arm_wall_s", rows.get("wall_s"))):
        if src is not None:
            v = pd.to_numeric(src, errors="coerce").dropna()
            if len(v):
                s[f"median_{c}"], s[f"max_{c}"], s[f"sum_{c}"] = float(v.median()), float(v.max()), float(v.sum())
    if "median_task_wall_s" in s:
        s["median_combos_per_task"] = float(tasks["n_combos"].median()) if "n_combos" in tasks else float("nan")
    try:
        _figure(Path(outdir), res, rows)
    except Exception as e:  # pragma: no cover
        log(f"figure pdxe_combo failed: {e}")
    return s


def _figure(outdir: Path, res, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    ex = [a for r in res for a in r.get("arms", []) if a.get("curve", {}).get("twin")]
    ax = axes[0]
    if ex:
        a = sorted(ex, key=lambda a: (a["row"].get("n_points", 0), a["row"]["pdx"], a["row"]["held_out"]))[len(ex) // 2]  # a median-length arm
        for name, col in (("twin", "C0"), ("pop", "C1"), ("untr", "C2"), ("bliss", "C3")):
            c = a["curve"].get(name)
            if c:
                ax.fill_between(c["t"], c["q05"], c["q95"], color=col, alpha=0.12)
                ax.plot(c["t"], c["q50"], color=col, label=_SHORT[name].replace("\n", " "))
        ax.plot(a["obs"]["t"], a["obs"]["v"], "kx", label="combination arm volumes")
        ax.set_yscale("log")
        ax.set_xlabel("day")
        ax.set_ylabel("tumour volume [mm³]")
        ax.set_title(f"{a['row']['pdx']}: {a['row']['held_out']} (from its monotherapies)", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[1]
    data, labs = [], []
    for m in METHODS:
        col = f"{m}_abslogerr_list"
        if col in rows:
            e = [x for s in rows[col].dropna() for x in json.loads(s)]
            if e:
                data.append(e)
                labs.append(_SHORT[m])
    if data:
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(labs) + 1), labs, fontsize=8)
        ax.set_ylabel("|log(pred/obs)| per combination-arm volume")
        ax.set_title(f"combination arm error ({len(rows)} arms)")
    fig.tight_layout()
    fig.savefig(outdir / "pdxe_combo.png", dpi=110)
    plt.close(fig)


def _f(x, nd=3):
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def combo_results_markdown(summary: dict, outdir) -> str:
    """The results table of the combination arms (or a 'not run' line)."""
    c = summary.get("pdxe_combo")
    lvl = int(round(100 * summary["settings"]["level"]))
    head = "### PDXE combination arms predicted from the monotherapies"
    if not c:
        return f"{head}\n\nNot run in this run (`--datasets ...,pdxe_combo`)."
    lines = [head, "",
             f"{c['n_pdx']} PDXs, {c['n_combos']} combination arms ({c.get('n_points_common', 0)} volumes on the {c.get('n_combos_common', 0)} arms every method "
             f"forecasts; twin failed on {c['n_twin_failed']} arms). Eligible in the cohort: {c.get('n_combos_eligible', '–')} combination arms in "
             f"{c.get('n_pdx_eligible', '–')} PDXs, {c.get('n_combos_tasks', '–')} arms in {c.get('n_pdx_tasks', '–')} PDXs within the cap of "
             f"{c['settings']['max_single_arms']} single-agent arms per twin.", "",
             f"| method | median abs log error | {lvl}% PI coverage | CRPS (log volume; mean over arms) | mRECIST balanced accuracy |", "|---|---|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {LABELS[m]} | {_f(c.get(m + '_med_abslogerr'))} | {_f(c.get(m + '_cov90'))} | {_f(c.get(m + '_crps_mean_of_splits'))} | "
                     f"{_f(c.get(m + '_balanced_accuracy'))} |")
    if c.get("best_baseline"):
        lines += ["", f"Error ratio twin / best baseline ({LABELS[c['best_baseline']]}): **{c['err_ratio']:.2f}**."]
    cc = c.get("class_counts_obs") or {}
    if cc:
        lines += ["", "mRECIST classes (observed, and from each method's median curve): " + "; ".join(
            f"{lab} " + ", ".join(f"{k} {v}" for k, v in sorted((c.get(key) or {}).items()))
            for lab, key in (("observed", "class_counts_obs"), ("twin", "class_counts_twin"), ("comb. pop. mean", "class_counts_pop"),
                             ("own untreated + effect", "class_counts_untr"), ("Bliss", "class_counts_bliss")) if c.get(key)) + "."]
    if "median_task_wall_s" in c:
        lines += ["", f"Timing: one PDX (one calibration + {c.get('median_combos_per_task', float('nan')):.0f} combination forecast(s), median) "
                      f"{c['median_task_wall_s']:.1f} s wall (calibration median {c.get('median_calibrate_s', float('nan')):.1f} s, forecast of the "
                      f"posterior draws per arm {c.get('median_forecast_s', float('nan')):.1f} s); {c.get('sum_task_wall_s', 0) / 3600:.2f} CPU-hours in all."]
    csv = Path(outdir) / "pdxe_combo.csv"
    if csv.exists():
        import pandas as pd

        r = pd.read_csv(csv)
        cols = [f"{m}_med_abslogerr" for m in METHODS]
        if set(cols) <= set(r):
            r = r.dropna(subset=cols)
            g = r.groupby("held_out")
            top = g.size().sort_values(ascending=False)
            top = top[top >= 3]
            if len(top):
                lines += ["", "By combination with at least 3 arms (median over arms of the arm's median abs log error):", "",
                          "| combination | arms | twin | comb. pop. mean | own untreated + effect | Bliss |", "|---|---|---|---|---|---|"]
                for k in top.index[:15]:
                    gg = g.get_group(k)
                    lines.append(f"| {k} | {len(gg)} | " + " | ".join(f"{gg[c].median():.3f}" for c in cols) + " |")
    return "\n".join(lines)


def combo_discussion_markdown(summary: dict) -> str:
    """Sentences from the combination numbers: which method wins."""
    c = summary.get("pdxe_combo")
    if not c:
        return "**PDXE combination arms.** Not run in this run."
    if "twin_med_abslogerr" not in c:
        return "**PDXE combination arms.** No arm with a forecast of every method."
    t = c["twin_med_abslogerr"]
    out = ["**PDXE combination arms (from the monotherapies).**"]
    bb = c.get("best_baseline")
    if bb:
        r = c["err_ratio"]
        out.append(f"- The twin's median error is {r:.2f}x the best baseline's ({LABELS[bb]}, {c[bb + '_med_abslogerr']:.3f} vs {t:.3f}): "
                   f"{'the twin beats every baseline' if r < 1 else 'the twin loses to it'}; the most accurate method is "
                   f"{LABELS[c['best_method']]}.")
    for m in BASELINES:
        if m != bb and f"{m}_med_abslogerr" in c:
            e = c[f"{m}_med_abslogerr"]
            verdict = "roughly ties with" if abs(t / e - 1) < 0.02 else ("beats" if t < e else "loses to")
            out.append(f"- Against {LABELS[m]} ({e:.3f}) the twin {verdict} it (ratio {t / e:.2f}).")
    if "bliss_med_abslogerr" in c and "pop_med_abslogerr" in c:
        out.append(f"- Bliss additivity from the PDX's own monotherapy curves vs the combination's population curve: "
                   f"{c['bliss_med_abslogerr']:.3f} vs {c['pop_med_abslogerr']:.3f}; "
                   + ("the PDX's own monotherapies carry more about its combination response than other PDXs' combination curves."
                      if c["bliss_med_abslogerr"] < c["pop_med_abslogerr"] else "other PDXs' combination curves carry more than the PDX's own monotherapies."))
    out.append(f"- {LABELS['twin'][0].upper() + LABELS['twin'][1:]}: {_f(c.get('twin_cov90'), 2)} coverage of the {int(round(100 * summary['settings']['level']))}% interval "
               f"(Bliss {_f(c.get('bliss_cov90'), 2)}, comb. pop. mean {_f(c.get('pop_cov90'), 2)}, own untreated + effect {_f(c.get('untr_cov90'), 2)}); "
               f"mRECIST balanced accuracy twin {_f(c.get('twin_balanced_accuracy'), 2)}, Bliss {_f(c.get('bliss_balanced_accuracy'), 2)}.")
    if c.get("n_bliss_sd_fallback"):
        out.append(f"- {c['n_bliss_sd_fallback']} arm(s) had no across-PDX SD for the combination: the Bliss baseline used the fallback SD "
                   f"{c['settings']['bliss_sd_fallback']} per day.")
    return "\n".join(out)
