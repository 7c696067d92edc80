"""Regenerate docs/validation/ (CSVs, figures, summary.json) and docs/validation.md: held-out validation of twins (issue #6).

    .venv/bin/python docs/validation/run_validation.py                 # full run (resumable)
    .venv/bin/python docs/validation/run_validation.py --residual      # ... plus the prostate twin + neural residual (cycles 2, 3)
    .venv/bin/python docs/validation/run_validation.py --residual --residual-cycles all
    .venv/bin/python docs/validation/run_validation.py --quick --outdir /tmp/val   # a few patients and PDXs
    .venv/bin/python docs/validation/run_validation.py --datasets pdxe_combo       # PDX combination arms from the monotherapies
    .venv/bin/python docs/validation/run_validation.py --summarize-only             # tables, figures, page only

Finished splits are kept under <outdir>/_work/ (one JSON file each) and skipped by the next run;
delete that folder to start again. The page is written from docs/validation/page_template.md
(docs/validation.md for the default --outdir, <outdir>/validation.md otherwise; see --page).
"""

import argparse
import os
import shlex
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calibration.validation import run_validation, summarize  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outdir", default=str(ROOT / "docs" / "validation"))
    ap.add_argument("--datasets", default="bruchovsky,pdxe,pdxe_combo", help="comma-separated: bruchovsky, pdxe, pdxe_combo (PDX combination arms from the monotherapies)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-patients", type=int, default=None)
    ap.add_argument("--max-pdx", type=int, default=None)
    ap.add_argument("--draws", type=int, default=None, help="posterior draws per twin (default: SETTINGS['draws'])")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; stop starting new splits after it")
    ap.add_argument("--residual", action="store_true", help="also run the prostate variant 'twin + neural residual'")
    ap.add_argument("--residual-cycles", default="2,3",
                    help="comma-separated forecast cycles for the residual variant, or 'all' (default 2,3: a residual split costs "
                         "up to ~1.5x a plain one, and all 152 prostate splits do not fit ~30 min on 2 workers)")
    ap.add_argument("--residual-epochs", type=int, default=None, help="training epochs of the residual (default: RESIDUAL_SETTINGS)")
    ap.add_argument("--page", default="auto", help="the Markdown page to write ('auto': docs/validation.md for the default outdir, "
                                                   "else <outdir>/validation.md; 'none': no page)")
    ap.add_argument("--summarize-only", action="store_true", help="rebuild tables, figures and the page from the finished splits")
    a = ap.parse_args(argv)
    ds = tuple(x for x in a.datasets.split(",") if x)
    page = None if a.page == "none" else a.page
    command = "run_validation.py " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None else argv))
    if a.summarize_only:
        s = summarize(a.outdir, datasets=ds, page=page)
    else:
        cycles = None if a.residual_cycles in (None, "", "all") else tuple(int(x) for x in a.residual_cycles.split(",") if x)
        rset = {"epochs": a.residual_epochs} if a.residual_epochs is not None else None
        s = run_validation(a.outdir, datasets=ds, quick=a.quick, n_workers=a.workers, seed=a.seed, max_patients=a.max_patients,
                           max_pdx=a.max_pdx, time_budget_s=a.time_budget, n_draws=a.draws, residual=a.residual, residual_cycles=cycles,
                           residual_settings=rset, page=page, command=command.strip())
    print(s["bench_line"])


if __name__ == "__main__":
    main()
