"""The ``twin`` command line: a thin layer over the Python API.

Exit codes: 0 success, 1 a problem with the user's input (a message, no traceback;
``--verbose`` adds it), 2 wrong usage of the command itself.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import InputError, ProblemList, TwinError

__all__ = ["main"]


def _print_problems(problems: ProblemList, path: str, *, quiet_notes: bool = False) -> None:
    errors, warnings, notes = problems.errors, problems.warnings, problems.notes
    shown = [p for p in problems if not (quiet_notes and p.severity == "note")]
    for p in shown:
        print(p.format())
    status = "INVALID" if errors else "OK"
    print(f"{path}: {status} ({len(errors)} error(s), {len(warnings)} warning(s), {len(notes)} note(s))")


def _cmd_validate(args) -> int:
    from .io import read_patient

    bad = 0
    for path in args.paths:
        p = Path(path)
        targets = [p]
        if p.is_dir() and not (p / "patient.toml").exists():
            inside = sorted(x for x in p.iterdir() if (x.is_dir() and (x / "patient.toml").exists()) or x.suffix.lower() in (".json", ".yaml", ".yml"))
            if inside:  # a cohort folder; otherwise the loader reports the missing patient.toml
                targets = inside
        for t in targets:
            patient, problems = read_patient(t)
            _print_problems(problems, str(t), quiet_notes=args.quiet)
            bad += patient is None
    return 1 if bad else 0


def _cmd_demo(args) -> int:
    """The whole chain on a bundled real patient: calibrate (MAP + Laplace) -> the scenario
    library's ADT arms across the posterior draws -> HTML report (twin imports calibration
    and scenarios only here, lazily)."""
    import time
    import warnings

    from calibration.calibrate import calibrate
    from calibration.report import calibration_text
    from scenarios.report import write_report
    from scenarios.run import outcome_table, run_scenario, save_result, scenario_drugs
    from scenarios.scenario import Scenario, library_path

    from . import datasets
    from .demo import patient_summary

    out = Path(args.output)
    t_all = time.perf_counter()
    patient = datasets.load_patient_example()
    print("twin demo: calibrate a twin of a real patient, then ask what-if questions\n")
    print("1. The patient (Bruchovsky et al. intermittent androgen deprivation trial, bundled)\n")
    print(patient_summary(patient))
    print(f"\n2. Calibrating the twin (MAP + Laplace approximation, {args.draws} draws; `twin calibrate --method nuts` is the reference)\n", flush=True)
    t0 = time.perf_counter()
    twin = calibrate(patient, method="map", draws=args.draws, chains=1, seed=args.seed, progress=False, map_starts=args.map_starts)
    twin_path = twin.save(out / f"{patient.id}.twin.nc")
    print(calibration_text(twin))
    print(f"   twin file: {twin_path} ({time.perf_counter() - t0:.1f} s)")
    scen_path = library_path("adt_continuous_vs_intermittent_vs_adaptive")
    scenario = Scenario.from_toml(scen_path)
    print(f"\n3. What if? Scenario {scenario.name!r}: " + ", ".join(a.name for a in scenario.arms) + f" over {scenario.horizon:g} days, every posterior draw\n", flush=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_scenario(twin.with_drugs(scenario_drugs(scenario)), scenario, seed=args.seed, scenario_path=scen_path)
    files = save_result(result, out / "scenario")
    _print_table(outcome_table(result))
    print(f"   simulated {twin.n_draws} draws x {len(scenario.arms)} arms in {time.perf_counter() - t0:.1f} s; results: {files['trajectories']}")
    report = write_report(result, out / "report.html", observed=patient, title=f"Twin of patient {patient.id}: continuous vs intermittent vs adaptive ADT")
    print(f"\n4. Report: {report}\n\nWhole chain in {time.perf_counter() - t_all:.1f} s.")
    return 0


def _load_patient_or_exit(path: str):
    from .io import read_patient

    p = Path(path)
    if p.suffix.lower() == ".nc":
        raise InputError(f"{path}: this is a twin file (.nc); give the patient file or folder here (twin files go where a TWIN is asked for)")
    if not p.exists():
        raise InputError(f"patient {path!r} does not exist; give a patient folder (with patient.toml) or a .json/.yaml file")
    patient, problems = read_patient(p)
    if patient is None:
        for pr in problems.errors:
            print(pr.format(), file=sys.stderr)
        raise InputError(f"{path}: the patient file has {len(problems.errors)} error(s) (listed above); `twin validate {path}` shows them all")
    return patient


def _parse_days(text: str | None):
    if text is None:
        return None
    from scenarios.policy import parse_duration

    try:
        value: float | str = float(text)
    except ValueError:
        value = text
    return parse_duration(value, "--horizon")


def _progress_printer():
    """(callback, close): a rich progress bar on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        try:
            from rich.progress import Progress

            bar = Progress(transient=True)
            bar.start()
            tasks: dict[str, int] = {}

            def cb(info):
                arm = str(info.get("arm"))
                if arm not in tasks:
                    tasks[arm] = bar.add_task(arm, total=info.get("steps", 1))
                bar.update(tasks[arm], completed=info.get("step", 0), description=str(info.get("message", arm))[:70])

            return cb, bar.stop
        except ImportError:  # pragma: no cover
            pass

    def plain(info):
        print(f"  {info.get('message', '')}", file=sys.stderr, flush=True)

    return plain, lambda: None


def _print_table(df) -> None:
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:  # pragma: no cover
        print(df.to_string(index=False))
        return
    t = Table(title="Outcomes: median [90% interval] over draws")
    for c in ("arm", "outcome", "median [90% interval]", "units"):
        t.add_column(c)

    def f(x):
        x = float(x)
        return "—" if x != x else ("∞" if x == float("inf") else f"{x:.3g}")

    for _, r in df.iterrows():
        t.add_row(*(escape(x) for x in (str(r["arm"]), str(r["outcome"]), f"{f(r['median'])} [{f(r['q05'])}, {f(r['q95'])}]", str(r["units"]))))
    Console(width=120).print(t)


def _cmd_simulate(args) -> int:
    import time

    from scenarios.run import model_for_scenario, outcome_table, prior_twin, run_scenario, save_result
    from scenarios.scenario import Scenario

    scen_path = Path(args.scenario)
    if not scen_path.is_file():
        raise InputError(f"scenario file {args.scenario!r} does not exist")
    scenario = Scenario.from_toml(scen_path)
    horizon = _parse_days(args.horizon)
    if args.draws < 1:
        raise InputError(f"--draws {args.draws}: give at least 1 draw")
    seed = scenario.seed if args.seed is None else args.seed
    if Path(args.patient).suffix.lower() == ".nc":
        from scenarios.run import scenario_drugs

        from .twin import Twin

        twin = Twin.load(args.patient).with_drugs(scenario_drugs(scenario)).thinned(args.draws, seed=seed)
        patient, kind = twin.patient, f"{twin.n_draws} posterior draws ({twin.method})"
    else:
        patient = _load_patient_or_exit(args.patient)
        twin = prior_twin(patient, model_for_scenario(scenario), args.draws, seed=seed)
        kind = f"{args.draws} prior draws"
    print(f"twin simulate: patient {patient.id}, scenario {scenario.name!r} ({len(scenario.arms)} arms), "
          f"{kind}, horizon {horizon if horizon is not None else scenario.horizon:g} days", flush=True)
    cb, close = _progress_printer()
    t0 = time.perf_counter()
    try:
        result = run_scenario(twin, scenario, seed=seed, progress=cb, horizon=horizon, scenario_path=scen_path)
    finally:
        close()
    files = save_result(result, args.output)
    failed = int((result["status"].values != 0).sum())
    print(f"simulated in {time.perf_counter() - t0:.1f} s ({failed} failed draw-arm runs)")
    for line in str(result.attrs.get("notes", "")).splitlines():
        if line.strip():
            print(f"note: {line}")
    _print_table(outcome_table(result))
    print(f"wrote {files['trajectories']} and {files['outcomes']}")
    return 0


def _cmd_compare(args) -> int:
    from scenarios.report import write_report
    from scenarios.run import load_result

    result = load_result(args.results)
    observed = _load_patient_or_exit(args.observed) if args.observed else None
    out = Path(args.output) if args.output else Path(args.results) / "report.html"
    path = write_report(result, out, observed=observed, title=args.title)
    print(f"wrote {path}")
    return 0


def _cmd_calibrate(args) -> int:
    from calibration.calibrate import calibrate
    from calibration.report import print_calibration

    patient = _load_patient_or_exit(args.patient)
    out = Path(args.output)
    if out.suffix.lower() != ".nc":
        raise InputError(f"-o {args.output}: the twin file must end in .nc (e.g. {patient.id}.twin.nc)")
    print(f"twin calibrate: patient {patient.id}, method {args.method}, {args.chains} chain(s) x {args.draws} draws, seed {args.seed}", flush=True)
    twin = calibrate(patient, method=args.method, draws=args.draws, chains=args.chains, tune=args.tune, seed=args.seed,
                     progress=not args.quiet and sys.stderr.isatty(), map_starts=args.map_starts)
    path = twin.save(out)
    print_calibration(twin)
    print(f"wrote {path}")
    return 0 if twin.diagnostics.get("passed") else 3


def _cmd_calibrate_cohort(args) -> int:
    from calibration.cohort import calibrate_cohort

    run = calibrate_cohort(args.cohort, None, args.output, method=args.method, draws=args.draws, chains=args.chains, seed=args.seed,
                           scheduler=args.scheduler, n_workers=args.workers, progress=not args.quiet, hierarchical=args.hierarchical)
    print(run.summary().to_string())
    print(f"{len(run.ok)} twin(s) in {run.outdir} ({len(run.failed)} failed, {len(run.skipped)} already done)")
    return 0 if not run.failed else 3


def _cmd_update(args) -> int:
    from calibration.report import print_calibration
    from calibration.update import update_twin

    from .twin import Twin

    twin = Twin.load(args.twin)
    patient = _load_patient_or_exit(args.patient)
    new = update_twin(twin, patient, seed=args.seed, progress=not args.quiet and sys.stderr.isatty())
    path = new.save(args.output)
    print_calibration(new)
    print(f"wrote {path}")
    return 0 if new.diagnostics.get("passed") else 3


def _cmd_train_residual(args) -> int:
    from calibration.residual import train_cohort_residual

    path = train_cohort_residual(args.cohort, args.output, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(f"wrote {path}")
    return 0


def _cmd_validate_cohort(args) -> int:
    from calibration.validation import run_validation, summarize

    datasets = tuple(d.strip() for d in args.datasets.split(",") if d.strip())
    if args.summarize_only:
        res = summarize(args.output, datasets=datasets)
    else:
        res = run_validation(args.output, datasets=datasets, quick=args.quick, n_workers=args.workers, seed=args.seed,
                             max_patients=args.max_patients, max_pdx=args.max_pdx, time_budget_s=args.time_budget)
    line = res.get("bench_line") if isinstance(res, dict) else None
    if line:
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="twin", description="Patient digital twins for oncology: calibrate, simulate what-if treatments, compare.")
    parser.add_argument("--version", action="version", version=f"twin {__version__}")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    v = sub.add_parser("validate", help="check patient files and print every problem with file, row and field")
    v.add_argument("paths", nargs="+", metavar="PATH", help="patient folder, .json/.yaml file, or a folder of them")
    v.add_argument("-q", "--quiet", action="store_true", help="hide notes about normalisations")
    v.set_defaults(func=_cmd_validate)

    d = sub.add_parser("demo", help="run the demonstration on a bundled real patient")
    d.add_argument("-o", "--output", default="demo-output", help="folder for the demo's outputs (default: demo-output)")
    d.add_argument("--seed", type=int, default=2026, help="random seed (default 2026)")
    d.add_argument("--draws", type=int, default=20, help="posterior draws of the twin to simulate (default 20)")
    d.add_argument("--map-starts", type=int, default=1, help="L-BFGS starts of the MAP search (default 1: from the prior medians)")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("simulate", help="simulate the arms of a scenario file for a patient's twin across its draws")
    s.add_argument("patient", metavar="PATIENT", help="patient folder or .json/.yaml file (its prior twin is simulated; calibrated .twin.nc files arrive with `twin calibrate`)")
    s.add_argument("scenario", metavar="SCENARIO", help="scenario file (.toml)")
    s.add_argument("-o", "--output", required=True, help="folder for trajectories.nc and outcomes.csv")
    s.add_argument("--draws", type=int, default=50, help="prior draws to simulate (default 50)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default: the scenario's seed)")
    s.add_argument("--horizon", default=None, help="cut the scenario short: days or a duration such as '12 weeks' (default: the scenario's horizon)")
    s.set_defaults(func=_cmd_simulate)

    c = sub.add_parser("compare", help="write an HTML report comparing the arms of a simulated scenario")
    c.add_argument("results", metavar="RESULTS", help="folder written by `twin simulate` (or its trajectories.nc)")
    c.add_argument("--observed", metavar="PATIENT", default=None, help="patient whose measurements are drawn on the pictures")
    c.add_argument("-o", "--output", default=None, help="report file (.html) or folder (default: RESULTS/report.html)")
    c.add_argument("--title", default="What-if scenarios: treatment comparison", help="title of the report")
    c.set_defaults(func=_cmd_compare)

    k = sub.add_parser("calibrate", help="calibrate a twin (Bayesian posterior) from a patient file")
    k.add_argument("patient", metavar="PATIENT", help="patient folder or .json/.yaml file")
    k.add_argument("-o", "--output", required=True, help="twin file to write (.nc)")
    k.add_argument("--method", choices=["nuts", "advi", "map"], default="nuts", help="nuts (reference, default), advi (quick look) or map (MAP + Laplace)")
    k.add_argument("--draws", type=int, default=1000, help="posterior draws per chain (default 1000)")
    k.add_argument("--chains", type=int, default=4, help="chains (default 4)")
    k.add_argument("--tune", type=int, default=None, help="NUTS warm-up iterations per chain (default: = draws)")
    k.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    k.add_argument("--map-starts", type=int, default=4, help="--method map: L-BFGS starts, the best optimum wins (default 4)")
    k.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    k.set_defaults(func=_cmd_calibrate)

    h = sub.add_parser("calibrate-cohort", help="calibrate every patient of a folder on Dask (resumable)")
    h.add_argument("cohort", metavar="DIR", help="folder of patient folders or .json/.yaml files")
    h.add_argument("-o", "--output", required=True, help="folder for the twin files and cohort.json")
    h.add_argument("--method", choices=["nuts", "advi", "map"], default="nuts", help="calibration method (default nuts)")
    h.add_argument("--draws", type=int, default=1000, help="posterior draws per chain (default 1000)")
    h.add_argument("--chains", type=int, default=4, help="chains (default 4)")
    h.add_argument("--seed", type=int, default=0, help="cohort seed; each patient's seed derives from it and the patient id")
    h.add_argument("--scheduler", default=None, help="address of a running Dask scheduler (default: a local cluster); 'sync' runs in this process")
    h.add_argument("--workers", type=int, default=None, help="workers of the local cluster (default: min(2, cores))")
    h.add_argument("--hierarchical", action="store_true", help="one joint posterior with partial pooling of growth and PSA parameters (in this process)")
    h.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    h.set_defaults(func=_cmd_calibrate_cohort)

    u = sub.add_parser("update", help="update a twin with the new measurements of its patient file")
    u.add_argument("twin", metavar="TWIN", help="twin file (.nc) written by twin calibrate")
    u.add_argument("patient", metavar="PATIENT", help="the patient file with the new visits")
    u.add_argument("-o", "--output", required=True, help="updated twin file (.nc)")
    u.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    u.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=_cmd_update)

    vc = sub.add_parser("validate-cohort", help="forecast held-out visits and arms of the bundled cohorts against baselines (docs/validation.md)")
    vc.add_argument("-o", "--output", default="docs/validation", help="folder for the CSVs, figures and summary.json (default docs/validation)")
    vc.add_argument("--datasets", default="bruchovsky,pdxe,pdxe_combo", help="comma-separated: bruchovsky, pdxe, pdxe_combo (PDX combination arms from the monotherapies)")
    vc.add_argument("--quick", action="store_true", help="8 prostate patients and 5 PDXs")
    vc.add_argument("--workers", type=int, default=2, help="Dask workers (default 2)")
    vc.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    vc.add_argument("--max-patients", type=int, default=None, help="cap on prostate patients")
    vc.add_argument("--max-pdx", type=int, default=None, help="cap on PDX tumours")
    vc.add_argument("--time-budget", type=float, default=None, help="seconds; no new split starts after it (a rerun resumes)")
    vc.add_argument("--summarize-only", action="store_true", help="rebuild the tables and figures from the finished splits")
    vc.set_defaults(func=_cmd_validate_cohort)

    r = sub.add_parser("train-residual", help="fit the shared neural-residual weights on a training cohort")
    r.add_argument("cohort", metavar="COHORT", help="folder of calibrated twin files (.twin.nc, e.g. from calibrate-cohort)")
    r.add_argument("-o", "--output", required=True, help="residual file to write (.pt)")
    r.add_argument("--epochs", type=int, default=200, help="optimisation epochs (default 200)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    r.set_defaults(func=_cmd_train_residual)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (InputError, FileExistsError, FileNotFoundError) as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except TwinError as exc:  # pragma: no cover - internal errors we raise on purpose
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
