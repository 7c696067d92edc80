"""Compare arms within a patient, arms across a virtual cohort, and a twin against data.

* :func:`prob_beats` / :func:`compare_arms`: per patient, the posterior probability that
  arm A beats arm B on an outcome, with a Monte-Carlo standard error. Samples are paired by
  ``draw`` (x ``replicate``) by default: the same posterior parameter set under two
  treatments is the counterfactual comparison a twin makes.
* :func:`virtual_trial`: across a cohort, Kaplan-Meier curves per arm (lifelines
  ``KaplanMeierFitter``) from one sample per patient, with a log-rank test.
* :func:`predictive_check`: the twin against a patient's observed measurements:
  per-visit posterior-predictive error, 90 % coverage and CRPS, split into fit and
  held-out visits at a cutoff time.

lifelines is imported inside the functions that use it; matplotlib never.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import xarray as xr

from twin.errors import InputError, close_matches

from .outcomes import DIM_ARM, DIM_DRAW, DIM_REPLICATE, DIM_TIME, SAMPLE_DIMS, _interp_last, km_quantile, outcome_list

__all__ = [
    "pair_scores",
    "prob_beats",
    "compare_arms",
    "COMPARE_COLUMNS",
    "VirtualTrial",
    "virtual_trial",
    "crps_sample",
    "PredictiveCheck",
    "predictive_check",
]


# --------------------------------------------------------------------------------------
# P(A beats B)
# --------------------------------------------------------------------------------------


def _samples(da: xr.DataArray, arm: str):
    """Values, events, follow-up of one arm, flattened over (draw, replicate)."""
    if DIM_ARM not in da.dims:
        raise InputError(f"outcome {da.name!r} has no 'arm' dim (dims {da.dims})")
    arms = [str(a) for a in da[DIM_ARM].values]
    if arm not in arms:
        raise InputError(f"arm {arm!r} not in the outcome's arms {arms}." + close_matches(arm, arms))
    sub = da.sel({DIM_ARM: arm})
    sdims = [d for d in SAMPLE_DIMS if d in sub.dims]
    other = [d for d in sub.dims if d not in sdims]
    if other:
        raise InputError(f"outcome {da.name!r}: select one label of {other} first (e.g. da.sel(drug='abiraterone'))")
    sub = sub.transpose(*sdims)
    v = np.asarray(sub.values, float).ravel()
    if "event" in sub.coords:
        ev = np.asarray(sub["event"].values, bool).ravel()
        fu = np.asarray(sub["followup"].values, float).ravel()
    else:
        ev = np.ones(v.shape, bool)
        fu = v.copy()
    return v, ev, fu


def pair_scores(a, ev_a, fu_a, b, ev_b, fu_b, *, higher_is_better: bool = True):
    """Classify pairs: returns (a_better, b_better, tie, undetermined) boolean arrays.

    Inputs broadcast against each other. A sample without the event (``ev`` False) is
    right-censored at its follow-up ``fu``: its true value is > ``fu`` (time-to-event
    outcomes, where higher is better). Rules for T_A vs T_B:

    * both events: compare values (equal = tie);
    * A event at ``a``, B censored at ``c``: B is better if ``a <= c`` (B was still free of
      the event when A had it), else undetermined; symmetrically;
    * both censored: undetermined (in a simulation with a common horizon: neither arm had
      the event by the end).

    Outcomes without censoring (all events) reduce to the plain comparison; for
    ``higher_is_better=False`` (e.g. AUC, dose) the roles swap.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    ev_a, ev_b = np.asarray(ev_a, bool), np.asarray(ev_b, bool)
    fu_a, fu_b = np.asarray(fu_a, float), np.asarray(fu_b, float)
    both = ev_a & ev_b
    if higher_is_better:
        gt, lt = a > b, a < b
    else:
        gt, lt = a < b, a > b
    a_better = both & gt
    b_better = both & lt
    tie = both & (a == b)
    # censoring only arises for time-to-event outcomes, where higher is better
    a_cens_b_ev = ~ev_a & ev_b
    b_cens_a_ev = ev_a & ~ev_b
    a_better = a_better | (a_cens_b_ev & (b <= fu_a))
    b_better = b_better | (b_cens_a_ev & (a <= fu_b))
    undetermined = ~(a_better | b_better | tie)
    nan = ~np.isfinite(np.where(ev_a, a, fu_a)) | ~np.isfinite(np.where(ev_b, b, fu_b))
    return a_better & ~nan, b_better & ~nan, tie & ~nan, undetermined & ~nan


#: Columns of :func:`compare_arms`.
COMPARE_COLUMNS = (
    "outcome", "arm_a", "arm_b", "p_a_better", "mcse", "p_a_strictly", "p_b_strictly",
    "p_tie", "p_undetermined", "n_pairs", "pairing", "better",
)


def prob_beats(
    outcome: xr.DataArray,
    arm_a: str,
    arm_b: str,
    *,
    pairing: str = "draw",
    higher_is_better: bool | None = None,
) -> dict[str, Any]:
    """Posterior probability that ``arm_a`` beats ``arm_b`` on one outcome.

    ``p_a_better = P(A strictly better) + 1/2 P(tie) + 1/2 P(undetermined)``, where
    *undetermined* pairs are those whose order censoring hides (mostly: neither arm had the
    event by the horizon). The parts are also reported separately (``p_a_strictly``,
    ``p_b_strictly``, ``p_tie``, ``p_undetermined``) so a reader can bound the answer.

    ``pairing="draw"`` (default) pairs sample ``i`` of A with sample ``i`` of B (same
    posterior draw and replicate); ``mcse = sd(score) / sqrt(n)``. ``pairing="all"``
    compares every A sample with every B sample (a Mann-Whitney U statistic, for arms
    simulated from independent draws); its MCSE is the two-sample U-statistic formula
    ``sqrt(var(row means) / n_A + var(column means) / n_B)``. Both assume independent
    draws; with autocorrelated MCMC draws scale by ``sqrt(n / ESS)``.

    Direction: ``higher_is_better`` defaults to the outcome's ``attrs['better']``
    ("higher" for times to event, "lower" for burden AUC, dose, treatment days).
    """
    if higher_is_better is None:
        better = outcome.attrs.get("better", "higher")
        if better not in ("higher", "lower"):
            raise InputError(f"outcome {outcome.name!r} has attrs better={better!r}; pass higher_is_better=True/False")
        higher_is_better = better == "higher"
    a, ea, fa = _samples(outcome, arm_a)
    b, eb, fb = _samples(outcome, arm_b)
    if pairing == "draw":
        if a.shape != b.shape:
            raise InputError(f"pairing='draw' needs the same number of samples per arm, got {a.size} and {b.size}")
        ab, bb, tie, und = pair_scores(a, ea, fa, b, eb, fb, higher_is_better=higher_is_better)
        valid = ab | bb | tie | und
        n = int(valid.sum())
        score = (ab + 0.5 * (tie | und))[valid].astype(float)
        p = float(score.mean()) if n else np.nan
        mcse = float(score.std(ddof=1) / np.sqrt(n)) if n > 1 else np.nan
    elif pairing == "all":
        ab, bb, tie, und = pair_scores(
            a[:, None], ea[:, None], fa[:, None], b[None, :], eb[None, :], fb[None, :], higher_is_better=higher_is_better
        )
        valid = ab | bb | tie | und
        score = np.where(valid, ab + 0.5 * (tie | und), np.nan)
        n = int(valid.sum())
        p = float(np.nanmean(score)) if n else np.nan
        rows, cols = np.nanmean(score, axis=1), np.nanmean(score, axis=0)
        rows, cols = rows[np.isfinite(rows)], cols[np.isfinite(cols)]
        mcse = float(np.sqrt(np.var(rows, ddof=1) / rows.size + np.var(cols, ddof=1) / cols.size)) if n > 1 else np.nan
    else:
        raise InputError(f"pairing={pairing!r}: expected 'draw' (paired by posterior draw) or 'all' (every pair)")
    frac = (lambda m: float(m[valid].mean()) if n else np.nan)
    return {
        "outcome": outcome.attrs.get("outcome", outcome.name),
        "arm_a": arm_a,
        "arm_b": arm_b,
        "p_a_better": p,
        "mcse": mcse,
        "p_a_strictly": frac(ab),
        "p_b_strictly": frac(bb),
        "p_tie": frac(tie),
        "p_undetermined": frac(und),
        "n_pairs": n,
        "pairing": pairing,
        "better": "higher" if higher_is_better else "lower",
    }


def compare_arms(
    outcomes: xr.DataArray | Sequence[xr.DataArray] | Mapping[str, xr.DataArray],
    arm_a: str,
    arm_b: str,
    *,
    pairing: str = "draw",
) -> pd.DataFrame:
    """:func:`prob_beats` for every outcome (one row per outcome; outcomes with an extra
    dim such as ``drug`` give one row per label; arm-level numbers such as a probability of
    resistance and response-class labels are skipped). Columns: ``COMPARE_COLUMNS``."""
    items = outcome_list(outcomes)
    rows = []
    for da in items:
        if DIM_DRAW not in da.dims or da.dtype.kind in "OU":
            continue
        other = [d for d in da.dims if d not in (DIM_ARM, *SAMPLE_DIMS)]
        if other:
            st = da.stack(_label=other)
            for i in range(st.sizes["_label"]):
                sub = st.isel(_label=i)
                lab = ",".join(str(sub[o].values) for o in other)
                sub = sub.drop_vars([c for c in sub.coords if c in ("_label", *other)])
                sub.attrs = dict(da.attrs, outcome=f"{da.attrs.get('outcome', da.name)}[{lab}]")
                rows.append(prob_beats(sub, arm_a, arm_b, pairing=pairing))
        else:
            rows.append(prob_beats(da, arm_a, arm_b, pairing=pairing))
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))


# --------------------------------------------------------------------------------------
# Virtual trial across a cohort
# --------------------------------------------------------------------------------------


@dataclass
class VirtualTrial:
    """Kaplan-Meier curves per arm over a virtual cohort, with a log-rank test.

    ``table``: one row per patient and arm (``patient, arm, duration, event``);
    ``fitters``: arm -> fitted ``lifelines.KaplanMeierFitter``; ``logrank``: test
    statistic, p-value, degrees of freedom and the test name; ``sample``: how each
    patient's value was chosen.
    """

    table: pd.DataFrame
    fitters: dict[str, Any]
    logrank: dict[str, Any]
    sample: str
    outcome: str = ""
    units: str = "day"
    notes: list[str] = field(default_factory=list)

    def median_survival(self) -> pd.Series:
        """KM median per arm (inf = not reached)."""
        return pd.Series({a: float(f.median_survival_time_) for a, f in self.fitters.items()}, name="median")


def _per_patient(outcomes) -> dict[str, xr.DataArray]:
    if isinstance(outcomes, Mapping):
        return {str(k): v for k, v in outcomes.items()}
    if isinstance(outcomes, xr.DataArray) and "patient" in outcomes.dims:
        return {str(p): outcomes.sel(patient=p) for p in outcomes["patient"].values}
    raise InputError(
        "virtual_trial: expected a mapping patient_id -> time-to-event DataArray, or a DataArray with a 'patient' dim"
    )


def virtual_trial(
    outcomes,
    *,
    arms: Sequence[str] | None = None,
    sample: str = "draw",
    random_seed: int | np.random.Generator | None = None,
) -> VirtualTrial:
    """Kaplan-Meier per arm across a cohort, one sample per patient, and a log-rank test.

    ``outcomes``: patient id -> time-to-event DataArray (e.g. :func:`time_to_progression`
    of that patient's result), or one DataArray with a ``patient`` dim.

    ``sample`` chooses each patient's value:

    * ``"draw"`` (default): one posterior draw (x replicate) per patient, picked at random
      with ``random_seed``; the *same* draw index in every arm, so arms stay paired. The
      cohort curve is then a sample from the posterior predictive of the trial: it carries
      each patient's uncertainty instead of hiding it.
    * ``"median"``: each patient's posterior median (Kaplan-Meier median over draws when
      censored); a patient whose median is not reached is censored at the follow-up.
      Smoother, but understates the spread.

    The log-rank test (lifelines ``logrank_test``, or ``multivariate_logrank_test`` for
    more than two arms) treats the arms as independent groups; in a virtual trial the same
    patients appear in every arm, so read its p-value as descriptive.
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test, multivariate_logrank_test

    per = _per_patient(outcomes)
    if not per:
        raise InputError("virtual_trial: no patients given")
    rng = random_seed if isinstance(random_seed, np.random.Generator) else np.random.default_rng(random_seed)
    first = next(iter(per.values()))
    all_arms = [str(a) for a in first[DIM_ARM].values]
    arms = list(arms) if arms is not None else all_arms
    rows = []
    for pid, da in per.items():
        if "event" not in da.coords:
            raise InputError(f"virtual_trial: patient {pid!r}: the outcome has no 'event' coord (use a time-to-event outcome)")
        n_samples = None
        for arm in arms:
            v, ev, fu = _samples(da, arm)
            if sample == "draw":
                if n_samples is None:
                    n_samples = v.size
                    pick = int(rng.integers(n_samples))
                dur, e = (v[pick] if ev[pick] else fu[pick]), bool(ev[pick])
            elif sample == "median":
                dd = np.where(ev, v, fu)
                ok = np.isfinite(dd)
                med = km_quantile(dd[ok], ev[ok], 0.5)
                if np.isfinite(med):
                    dur, e = med, True
                else:
                    dur, e = float(np.nanmax(fu[ok])), False
            else:
                raise InputError(f"sample={sample!r}: expected 'draw' (one posterior draw per patient) or 'median'")
            if np.isfinite(dur):
                rows.append({"patient": pid, "arm": arm, "duration": float(dur), "event": e})
    table = pd.DataFrame(rows, columns=["patient", "arm", "duration", "event"])
    fitters = {}
    for arm in arms:
        t = table[table["arm"] == arm]
        fitters[arm] = KaplanMeierFitter(label=arm).fit(t["duration"], t["event"])
    if len(arms) == 2:
        ta, tb = (table[table["arm"] == a] for a in arms)
        res = logrank_test(ta["duration"], tb["duration"], event_observed_A=ta["event"], event_observed_B=tb["event"])
        name = "log-rank (2 groups)"
    elif len(arms) > 2:
        res = multivariate_logrank_test(table["duration"], table["arm"], table["event"])
        name = f"log-rank ({len(arms)} groups)"
    else:
        res, name = None, "none (one arm)"
    logrank = {
        "test": name,
        "statistic": float(res.test_statistic) if res is not None else np.nan,
        "p_value": float(res.p_value) if res is not None else np.nan,
        "df": int(res.degrees_of_freedom) if res is not None else 0,
    }
    return VirtualTrial(
        table=table, fitters=fitters, logrank=logrank, sample=sample,
        outcome=str(first.attrs.get("outcome", first.name)), units=str(first.attrs.get("units", "day")),
        notes=["arms share patients (paired); the log-rank p-value assumes independent groups"],
    )


# --------------------------------------------------------------------------------------
# Twin against observed data
# --------------------------------------------------------------------------------------


def crps_sample(samples, obs, axis: int = -1) -> np.ndarray:
    """Continuous ranked probability score of a predictive sample (lower is better).

    ``CRPS = E|X - y| - 1/2 E|X - X'|`` with both expectations over the empirical
    distribution of the sample (the ``1/n**2`` form; ``E|X - X'|`` from the sorted sample
    as ``2/n**2 * sum_i (2 i - n - 1) x_(i)``). Same units as the observable.
    """
    x = np.moveaxis(np.asarray(samples, float), axis, -1)
    y = np.asarray(obs, float)[..., None]
    n = x.shape[-1]
    term1 = np.mean(np.abs(x - y), axis=-1)
    xs = np.sort(x, axis=-1)
    i = np.arange(1, n + 1)
    e_xx = 2.0 / n**2 * np.sum((2 * i - n - 1) * xs, axis=-1)
    return term1 - 0.5 * e_xx


@dataclass
class PredictiveCheck:
    """Per-visit predictive check (``visits``) and its summary per split and observable."""

    visits: pd.DataFrame
    summary: pd.DataFrame
    arm: str
    cutoff: float


def _observed_table(observed) -> pd.DataFrame:
    obs = getattr(observed, "measurements", observed)
    if not isinstance(obs, pd.DataFrame):
        raise InputError(f"observed: expected a DataFrame (time, observable, value, censored) or a Patient, got {type(observed).__name__}")
    obs = obs.copy()
    missing = [c for c in ("time", "observable", "value") if c not in obs.columns]
    if missing:
        raise InputError(f"observed table lacks columns {missing}; it has {list(obs.columns)} "
                         "(expected time, observable, value, censored)")
    if "censored" not in obs.columns:
        if "below_lloq" in obs.columns:  # the Patient measurement format: value NaN, lloq given
            obs["censored"] = obs["below_lloq"].fillna(False).astype(bool)
            if "lloq" in obs.columns:
                obs.loc[obs["censored"], "value"] = obs.loc[obs["censored"], "lloq"]
        else:
            obs["censored"] = False
    obs["censored"] = obs["censored"].fillna(False).astype(bool)
    obs["time"] = obs["time"].astype(float)
    obs["value"] = obs["value"].astype(float)
    return obs[["time", "observable", "value", "censored"]].reset_index(drop=True)


def predictive_check(
    result: xr.Dataset,
    observed,
    *,
    arm: str,
    cutoff: float,
    observables: Sequence[str] | None = None,
    log_sigma: Mapping[str, float] | None = None,
    interval: float = 0.90,
    random_seed: int | np.random.Generator | None = None,
) -> PredictiveCheck:
    """Posterior-predictive accuracy of a twin on a patient's observed measurements.

    ``observed``: a long table with ``time, observable, value, censored`` (censored = the
    true value is below ``value``, e.g. below the LLOQ), or a ``Patient`` / its
    ``measurements`` table (``below_lloq`` and ``lloq`` are used). ``arm``: the result arm
    that replays the patient's actual treatment. Visits with ``time <= cutoff`` are
    ``"fit"`` (used for calibration), later ones ``"held-out"``.

    The predictive at each observed time is the result trajectory (linearly interpolated)
    over draws (x replicates). If ``log_sigma`` gives a log-normal observation error per
    observable, each sample is multiplied by ``exp(N(0, sigma))`` (seeded by
    ``random_seed``); otherwise the check is on the latent trajectory and the interval is
    narrower than a true posterior predictive.

    Per visit: ``pred_median``, ``lower``/``upper`` (central ``interval``), ``abs_log_error =
    |log(pred_median / value)|``, ``covered`` (value inside the interval), ``crps``
    (:func:`crps_sample`). Censored visits: ``covered`` = the interval reaches below the
    censoring value; error and CRPS are NaN. Observations outside the simulated time range
    are dropped (listed in the summary's ``n_dropped``). Summary per split x observable:
    ``n``, ``median_abs_log_error``, ``coverage``, ``mean_crps``.
    """
    obs = _observed_table(observed)
    rng = random_seed if isinstance(random_seed, np.random.Generator) else np.random.default_rng(random_seed)
    names = list(observables) if observables is not None else sorted(set(obs["observable"]) & set(map(str, result.data_vars)))
    if not names:
        raise InputError(f"predictive_check: no observed observable is in the result (observed: "
                         f"{sorted(set(obs['observable']))}, result: {sorted(map(str, result.data_vars))})")
    arms = [str(a) for a in result[DIM_ARM].values]
    if arm not in arms:
        raise InputError(f"arm {arm!r} not in the result's arms {arms}." + close_matches(arm, arms))
    times = result[DIM_TIME].values.astype(float)
    lo_q, hi_q = (1 - interval) / 2, 1 - (1 - interval) / 2
    parts = []
    dropped = {}
    for name in names:
        if name not in result.data_vars:
            raise InputError(f"observable {name!r} is not in the result." + close_matches(name, map(str, result.data_vars)))
        o = obs[obs["observable"] == name]
        inside = (o["time"] >= times[0] - 1e-9) & (o["time"] <= times[-1] + 1e-9)
        dropped[name] = int((~inside).sum())
        o = o[inside & np.isfinite(o["value"])].copy()
        if o.empty:
            continue
        da = result[name].sel({DIM_ARM: arm})
        sdims = [d for d in (DIM_DRAW, DIM_REPLICATE) if d in da.dims]
        y = np.asarray(da.transpose(*sdims, DIM_TIME).values, float).reshape(-1, times.size)
        pred = _interp_last(y, times, o["time"].to_numpy()).T  # (visit, sample)
        if log_sigma and name in log_sigma:
            pred = pred * np.exp(rng.normal(0.0, float(log_sigma[name]), size=pred.shape))
        v = o["value"].to_numpy()
        cens = o["censored"].to_numpy()
        med = np.median(pred, axis=1)
        lo, hi = np.quantile(pred, lo_q, axis=1), np.quantile(pred, hi_q, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            err = np.abs(np.log(med / v))
        covered = np.where(cens, lo <= v, (lo <= v) & (v <= hi))
        crps = crps_sample(pred, v)
        o["pred_median"], o["lower"], o["upper"] = med, lo, hi
        o["abs_log_error"] = np.where(cens, np.nan, err)
        o["covered"] = covered
        o["crps"] = np.where(cens, np.nan, crps)
        o["split"] = np.where(o["time"] <= cutoff, "fit", "held-out")
        parts.append(o)
    visits = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["time", "observable", "value", "censored", "pred_median", "lower", "upper",
                 "abs_log_error", "covered", "crps", "split"])
    rows = []
    for (split, name), g in visits.groupby(["split", "observable"], sort=True):
        rows.append({
            "split": split, "observable": name, "n": len(g), "n_censored": int(g["censored"].sum()),
            "median_abs_log_error": float(np.nanmedian(g["abs_log_error"])) if g["abs_log_error"].notna().any() else np.nan,
            "coverage": float(g["covered"].mean()),
            "mean_crps": float(np.nanmean(g["crps"])) if g["crps"].notna().any() else np.nan,
            "n_dropped": dropped.get(name, 0),
        })
    summary = pd.DataFrame(rows, columns=["split", "observable", "n", "n_censored", "median_abs_log_error",
                                          "coverage", "mean_crps", "n_dropped"])
    summary.attrs["interval"] = interval
    return PredictiveCheck(visits=visits, summary=summary, arm=arm, cutoff=float(cutoff))
