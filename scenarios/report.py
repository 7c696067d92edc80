"""One self-contained HTML report of a scenario result (``twin compare``).

:func:`write_report` renders a jinja2 template kept in this module (no template files):
figures from :mod:`scenarios.plots` embedded as base64 PNG, the outcome table
(:func:`scenarios.outcomes.summarize`), arm comparisons (:func:`scenarios.compare.compare_arms`),
a short "how to read this" paragraph and a provenance footer (versions, seed, input
hashes). The page loads nothing from elsewhere: no scripts, no CDN, no remote fonts.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from twin.errors import InputError

__all__ = ["write_report", "render_report", "REPORT_TEMPLATE"]

REPORT_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
.note { background: #fff8e1; border-left: 4px solid #f0c040; padding: 0.6em 1em; }
footer { margin-top: 2.5em; font-size: 0.8em; color: #555; border-top: 1px solid #ddd; padding-top: 0.8em; }
code { font-size: 0.95em; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
<p>Patient <strong>{{ patient_id }}</strong> &middot; scenario <strong>{{ scenario }}</strong> &middot;
{{ n_arms }} arm(s) &middot; {{ n_draws }} draw(s) of the {{ twin_kind }} twin &middot; horizon {{ horizon }} days</p>
{% if kind_note %}<p class="note">{{ kind_note }}</p>{% endif %}

<h2>How to read this</h2>
<p>Each arm is a treatment plan simulated for this patient's digital twin. The twin is not one
prediction but many plausible versions of the patient (the <em>draws</em>); every draw is treated
with every arm, so differences between arms are not due to chance differences between patients.
In the pictures the line is the median over draws, the dark band holds the middle 50 % of draws and
the light band 90 %. In the tables, "median [90 % interval]" summarises the draws; a time to
progression of "&infin;" means the median draw did not progress within the horizon.
"P(A better)" is the share of draws in which arm A does better than arm B (0.5: no difference).
These are model predictions to support a discussion, not a recommendation; check them against the
patient's course and clinical judgement.</p>

<h2>Outcomes per arm</h2>
{{ outcome_table }}

{% if comparisons %}<h2>Arm comparisons</h2>
{% for c in comparisons %}<h3>{{ c.title }}</h3>
{{ c.table }}
{% endfor %}{% endif %}

{% if figures %}<h2>Trajectories</h2>
{% for f in figures %}<figure><img alt="{{ f.alt }}" src="data:image/png;base64,{{ f.data }}">
<figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}{% endif %}

{% if check %}<h2>Twin against observed data</h2>
{{ check }}{% endif %}

{% if notes %}<h2>Notes</h2><ul>{% for n in notes %}<li>{{ n }}</li>{% endfor %}</ul>{% endif %}

<footer>
<p><strong>Provenance.</strong> Versions: {{ versions }}. Seed: {{ seed }}.
Scenario file: <code>{{ scenario_file }}</code> (SHA-256 <code>{{ scenario_sha256 }}</code>).</p>
{% if patient_hashes %}<p>Patient files ({{ patient_source }}):</p><table><tr><th>file</th><th>SHA-256</th></tr>
{% for k, v in patient_hashes %}<tr><td>{{ k }}</td><td><code>{{ v }}</code></td></tr>{% endfor %}</table>{% endif %}
<p>Model: <code>{{ model }}</code></p>
</footer>
</body>
</html>
"""


def _fmt(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, (float, np.floating)):
        if np.isnan(x):
            return "—"
        if np.isinf(x):
            return "∞" if x > 0 else "−∞"
        return f"{x:.3g}"
    return str(x)


def _table_html(df, columns=None) -> str:
    """A pandas table as escaped HTML (numbers right-aligned)."""
    cols = list(columns or df.columns)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    rows = []
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            num = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
            cells.append(f'<td class="num">{html.escape(_fmt(v))}</td>' if num else f"<td>{html.escape(_fmt(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>\n" + "\n".join(rows) + "</table>"


def _png_b64(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _observed_table(observed):
    """A patient (or its measurements) -> long table time, observable, value, censored."""
    import pandas as pd

    if observed is None:
        return None
    m = getattr(observed, "measurements", observed)
    if not isinstance(m, pd.DataFrame):
        raise InputError(f"observed: expected a Patient or a measurements table, received {type(observed).__name__}")
    out = m.copy()
    if "censored" not in out.columns:
        out["censored"] = out["below_lloq"].astype(bool) if "below_lloq" in out.columns else False
    return out[["time", "observable", "value", "censored"]]


def render_report(result, *, observed=None, title: str = "What-if scenarios: treatment comparison") -> str:
    """The report as an HTML string (see :func:`write_report`)."""
    import jinja2

    from . import plots
    from .compare import compare_arms
    from .outcomes import check_result
    from .run import outcomes_of

    check_result(result)
    outcomes = outcomes_of(result)
    from .outcomes import summarize

    summary = summarize(outcomes)
    arms = [str(a) for a in result["arm"].values]
    table = summary.copy()
    if len(table):
        table["median [90% interval]"] = [f"{_fmt(m)} [{_fmt(a)}, {_fmt(b)}]" for m, a, b in zip(table["median"], table["q05"], table["q95"])]
        outcome_html = _table_html(table, ["arm", "outcome", "median [90% interval]", "units", "n", "n_events", "method"])
    else:
        outcome_html = "<p>No outcome could be computed from this result.</p>"
    comparisons = []
    ref = arms[0]
    for other in arms[1:]:
        try:
            cmp = compare_arms(outcomes, other, ref)
        except InputError as e:  # pragma: no cover - an outcome the comparison cannot take
            comparisons.append({"title": f"{other} vs {ref}", "table": f"<p>{html.escape(str(e))}</p>"})
            continue
        cols = [c for c in ("outcome", "p_a_better", "mcse", "p_a_strictly", "p_b_strictly", "p_undetermined", "n_pairs", "better") if c in cmp.columns]
        comparisons.append({"title": f"{other} (A) vs {ref} (B)", "table": _table_html(cmp, cols or None)})
    obs = _observed_table(observed)
    figures = []
    for var in ("psa", "tumor_volume", "resistant_fraction"):
        if var not in result.data_vars:
            continue
        if var == "resistant_fraction":
            fig = plots.plot_resistant_fraction(result, threshold=float(result.attrs.get("resistance_threshold", 0.5)))
        else:
            fig = plots.plot_trajectories(result, var, observed=obs, log_y=True)
        figures.append({"data": _png_b64(fig), "alt": f"{var} over time per arm",
                        "caption": f"{var}: median and 50 %/90 % bands over draws, per arm" + (" (points: observed)" if obs is not None and var != "resistant_fraction" else "")})
    check = None
    notes = [n for n in str(result.attrs.get("notes", "")).splitlines() if n.strip()]
    if obs is not None:
        notes.append("Observed points are the patient's recorded course under the treatment actually given, "
                     "which may differ from every arm; they show scale, not a test of an arm.")
    try:
        hashes = sorted(json.loads(result.attrs.get("patient_sha256", "{}") or "{}").items())
    except (TypeError, ValueError):
        hashes = []
    kind = str(result.attrs.get("twin_kind", "posterior"))
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    tpl = env.from_string(REPORT_TEMPLATE)
    return tpl.render(
        title=title,
        patient_id=result.attrs.get("patient_id", ""),
        scenario=result.attrs.get("scenario", ""),
        n_arms=len(arms),
        n_draws=result.sizes["draw"],
        twin_kind=kind,
        horizon=f"{float(result['time'].values[-1]):g}",
        kind_note=("These are prior predictions: the twin has not been calibrated on this patient's "
                   "measurements yet, so the bands show what the population priors allow.") if kind == "prior" else "",
        outcome_table=_markup(outcome_html),
        comparisons=[{"title": c["title"], "table": _markup(c["table"])} for c in comparisons],
        figures=figures,
        check=_markup(check) if check else None,
        notes=notes,
        versions=result.attrs.get("versions", ""),
        seed=result.attrs.get("seed", ""),
        scenario_file=result.attrs.get("scenario_file", ""),
        scenario_sha256=result.attrs.get("scenario_sha256", ""),
        patient_source=result.attrs.get("patient_source", ""),
        patient_hashes=hashes,
        model=result.attrs.get("model", ""),
    )


def _markup(s: str):
    from markupsafe import Markup

    return Markup(s)  # built above from escaped cells only


def write_report(result, outdir_or_path, *, observed=None, title: str = "What-if scenarios: treatment comparison") -> Path:
    """Write one self-contained HTML report of ``result`` (a scenario result Dataset or a
    folder/``.nc`` file from :func:`scenarios.run.save_result`).

    ``outdir_or_path``: a ``.html`` file, or a folder (the report is ``report.html`` in it).
    ``observed``: a Patient (or measurements table) whose data are drawn on the pictures.
    Written atomically; returns the path.
    """
    from twin._atomic import atomic_write_text

    from .run import load_result

    if not hasattr(result, "data_vars"):
        result = load_result(result)
    path = Path(outdir_or_path)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path / "report.html"
    atomic_write_text(path, render_report(result, observed=observed, title=title))
    return path
