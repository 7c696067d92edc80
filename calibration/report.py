"""Printed summary of a calibrated twin: posterior medians and 90% intervals with units,
then the diagnostics, loudly when they fail."""

from __future__ import annotations

import sys

import numpy as np

__all__ = ["print_calibration", "calibration_text"]


def _fmt(x: float) -> str:
    x = float(x)
    if x != x:
        return "—"
    return f"{x:.3g}"


def calibration_text(twin) -> str:
    """The summary as plain text (also what :func:`print_calibration` prints)."""
    d = twin.diagnostics
    lines = [f"Twin of patient {twin.patient.id} — {twin.method}, {twin.n_chains} chain(s), {twin.n_draws} draws, seed {twin.seed}"]
    tab = twin.summary()
    lines.append(f"  {'parameter':<22} {'median [90% interval]':<34} {'unit':<24} {'R-hat':>6} {'ESS':>7}")
    for name, r in tab.iterrows():
        if r.get("source", "calibrated") not in ("calibrated", "error model") or r["median"] != r["median"]:
            continue
        lines.append(f"  {name:<22} {_fmt(r['median']) + ' [' + _fmt(r['q05']) + ', ' + _fmt(r['q95']) + ']':<34} {str(r['unit']):<24} {_fmt(r['r_hat']):>6} {_fmt(r['ess_bulk']):>7}")
    held = [n for n, s in twin.parameter_source().items() if s != "calibrated"]
    if held:
        lines.append(f"  held fixed: {', '.join(held)}")
    keys = [("rhat_max", "max R-hat"), ("ess_bulk_min", "min bulk ESS"), ("ess_tail_min", "min tail ESS"), ("divergences", "divergences"),
            ("bfmi_min", "min energy BFMI"), ("ppc_coverage90", "observations in the 90% predictive interval")]
    diag = ", ".join(f"{label} {_fmt(d[k]) if k != 'ppc_coverage90' else format(d[k], '.0%')}" for k, label in keys if k in d)
    lines.append(f"Diagnostics: {diag}")
    for w in d.get("warnings", []):
        lines.append(f"  WARNING: {w}")
    if d.get("note"):
        lines.append(f"  note: {d['note']}")
    for n in d.get("data_notes", []):
        lines.append(f"  data: {n}")
    if d.get("passed"):
        lines.append("Diagnostics PASSED.")
    else:
        lines.append("!" * 78)
        lines.append("DIAGNOSTICS FAILED — do not use this twin's intervals before fixing:")
        for m in d.get("messages", []):
            lines.append(f"  - {m}")
        lines.append("!" * 78)
    if "wall_s" in d:
        lines.append(f"Wall time {d['wall_s']:.1f} s (model build {d.get('build_s', np.nan):.1f} s, sampling {d.get('sampling_s', np.nan):.1f} s).")
    return "\n".join(lines)


def print_calibration(twin, file=None) -> None:
    print(calibration_text(twin), file=file or sys.stdout)
