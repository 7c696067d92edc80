"""Regenerate docs/validation/ (CSVs, figures, summary.json): held-out validation of twins (issue #6).

    .venv/bin/python docs/validation/run_validation.py                 # full run (resumable)
    .venv/bin/python docs/validation/run_validation.py --quick         # 8 prostate patients, 5 PDXs
    .venv/bin/python docs/validation/run_validation.py --max-pdx 20 --time-budget 4200

Finished splits are kept under docs/validation/_work/ (one JSON file each) and skipped by the
next run; delete that folder to start again. See docs/validation.md.
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from calibration.validation import run_validation, summarize  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outdir", default=str(ROOT / "docs" / "validation"))
    ap.add_argument("--datasets", default="bruchovsky,pdxe")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-patients", type=int, default=None)
    ap.add_argument("--max-pdx", type=int, default=None)
    ap.add_argument("--time-budget", type=float, default=None, help="seconds; stop starting new splits after it")
    ap.add_argument("--summarize-only", action="store_true", help="rebuild tables/figures from the finished splits")
    a = ap.parse_args(argv)
    ds = tuple(x for x in a.datasets.split(",") if x)
    if a.summarize_only:
        s = summarize(a.outdir, datasets=ds)
        from calibration.validation import results_markdown
        print(results_markdown(a.outdir))
    else:
        s = run_validation(a.outdir, datasets=ds, quick=a.quick, n_workers=a.workers, seed=a.seed,
                           max_patients=a.max_patients, max_pdx=a.max_pdx, time_budget_s=a.time_budget)
    print(s["bench_line"])


if __name__ == "__main__":
    main()
