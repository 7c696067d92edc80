"""Benchmark `scenarios.run.run_scenario` (a script; not collected by pytest).

    .venv/bin/python tests/benchmarks/bench_scenarios.py [--twin calibrated|prior-pathway]
        [--draws 1000] [--days 730] [--patients 100] [--trial-draws 20] [--skip-trial]
        [--profile] [--threads N] [--engine compiled|simulate] [--no-carry] [--no-cache]

Twins (``--twin``):

* ``calibrated`` (default): what ``twin calibrate`` writes and ``twin simulate`` /
  ``twin demo`` run, the reduced model of decision D12
  (``calibration.calibrate.default_model(patient)``: cells, resistant clone, effect
  compartments ``E_<drug>``, PSA; no pathway states). (a) calibrates the patient with
  ``calibrate(patient, default_model(patient), method="map", draws=--draws, chains=1,
  seed=0)`` (MAP + Laplace) as untimed setup, cached as a ``.twin.nc`` file under the
  system temp dir (``twin-bench/``) keyed by the twin version, a hash of the ``twin`` and
  ``calibration`` sources and the patient's hash (``--no-cache`` recalibrates), and runs
  ``twin.with_drugs(scenario_drugs(scenario))`` as the demo does. (b) uses prior twins of the
  reduced model (``prior_twin(p, default_model(p) + the scenario's drugs)``, i.e. draws of
  ``model.priors_for(p)``): calibrating 100 patients is not part of the timed trial and would
  take ~100 s each; one model object is shared by the patients whose models are identical
  (same ``model.spec()``), so ``run_trial`` batches them.
* ``prior-pathway``: the numbers before, prior twins of the 19-node androgen-receptor pathway
  model (``scenarios.run.model_for_scenario(scenario)``).

(a) One patient (the bundled prostate patient ``twin.datasets.load_patient_example()``),
the library scenario ``adt_continuous_vs_intermittent_vs_adaptive`` (3 arms: continuous
ADT = a fixed protocol; Bruchovsky intermittent and Zhang adaptive = policies deciding per
draw at every 4-weekly visit), ``--draws`` draws (posterior, or prior draws
``scenarios.run.prior_twin`` with seed 1) over ``--days`` days. Wall seconds per stage:
loading, model, draws, each arm (from the runner's progress calls), outcome table. The
calibration (or reading its cached file) is set-up: printed, not counted in the total.

(b) A virtual trial: ``--patients`` patients of the bundled Bruchovsky cohort
(``twin.datasets.load_bruchovsky()``, 67 real patients; past 67 the cohort is reused in order
with another prior seed, so patient ``k`` is cohort member ``k mod 67`` with seed ``k``),
``--trial-draws`` prior draws each, same scenario, arms and horizon; total wall seconds.
By default the patients go through ``scenarios.run.run_trial``, which batches twins with the
same model and the same doses into one run (here all of them: the ADT doses are in mg);
``--trial-loop`` times one ``run_scenario`` per patient instead.

``--profile`` runs (a) under cProfile and prints the top 25 functions by cumulative and by
own time. Goal on the 2-core development machine: (a) <= 2 s, (b) <= 2 min.

Engine (``scenarios.run._ENGINE``): ``compiled`` (default) integrates each arm, and each visit
interval of an adaptive arm, with one compiled call for all draws (members in parallel over
numba's threads: ``--threads``, default ``NUMBA_NUM_THREADS``, i.e. all cores);
``--engine simulate`` is the reference path (one ``twin.simulate`` call per dose history and
visit interval). ``--no-carry`` restarts the step size at every dose as ``simulate`` does
(``scenarios.run._CARRY_STEP = False``). ``--baseline``: the code before the compiled engine
(the simulate path with the vector field as traced, ``twin.compiled._HOIST = False``). The header line prints the machine load; on the
shared machine compare timings only within one run or at similar load.

The last line is ``BENCH scenarios seconds=<(a) seconds> trial_seconds=<(b) seconds>``
(``trial_seconds=nan`` with ``--skip-trial``).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

SCENARIO = "adt_continuous_vs_intermittent_vs_adaptive"


def _stage(name: str, t0: float, rows: list) -> float:
    dt = time.perf_counter() - t0
    rows.append((name, dt))
    print(f"  {name:<44s} {dt:9.2f} s", flush=True)
    return time.perf_counter()


ROOT = Path(__file__).resolve().parents[2]


def _code_key() -> str:
    """The twin version and a hash of the ``twin`` and ``calibration`` sources: a calibration
    cached under another key is stale."""
    import twin

    h = hashlib.sha256(str(twin.__version__).encode())
    for pkg in ("twin", "calibration"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            h.update(str(f.relative_to(ROOT)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def calibrated_twin(patient, n_draws: int, *, cache: bool = True):
    """``calibrate(patient, default_model(patient), method="map", draws=n_draws, chains=1,
    seed=0)``, read from / written to ``<tempdir>/twin-bench/`` (keyed by :func:`_code_key`
    and the patient's hash) unless ``cache`` is False. Returns ``(twin, how)``."""
    from calibration.calibrate import calibrate, default_model
    from twin.twin import Twin, patient_hash

    key = f"{_code_key()}-{patient_hash(patient)[:12]}"
    path = Path(tempfile.gettempdir()) / "twin-bench" / f"{patient.id}-map-d{n_draws}-s0-{key}.twin.nc"
    if cache and path.exists():
        try:
            return Twin.load(path), f"cached {path}"
        except Exception as exc:  # noqa: BLE001 -- a damaged cache file: recalibrate
            print(f"  (cache {path} unreadable: {exc}; recalibrating)", flush=True)
    tw = calibrate(patient, default_model(patient), method="map", draws=n_draws, chains=1, seed=0, progress=False)
    if cache:
        tw.save(path)
    return tw, f"calibrated{f', saved {path}' if cache else ''}"


def _reduced_model(patient, drugs, shared: dict):
    """``default_model(patient).with_drugs(drugs)``, one object per distinct ``spec()`` (so
    ``run_trial`` batches the patients that share it)."""
    import json

    from calibration.calibrate import default_model

    m = default_model(patient).with_drugs(drugs)
    return shared.setdefault(json.dumps(m.spec(), sort_keys=True, default=str), m)


def one_patient(n_draws: int, days: float, *, kind: str = "calibrated", profile: bool = False, cache: bool = True) -> float:
    import twin
    from scenarios import Scenario, library_path
    from scenarios.run import model_for_scenario, outcome_table, prior_twin, run_scenario, scenario_drugs

    rows: list = []
    start = t = time.perf_counter()
    what = "posterior draws (MAP + Laplace) of the calibrated reduced-model twin" if kind == "calibrated" else "prior draws of the pathway model"
    print(f"(a) one patient, {SCENARIO}, {n_draws} {what} x {days:g} days", flush=True)
    patient = twin.datasets.load_patient_example()
    scenario = Scenario.from_toml(library_path(SCENARIO))
    t = _stage("load patient + scenario", t, rows)
    setup = 0.0
    if kind == "calibrated":
        t_setup = time.perf_counter()
        cal, how = calibrated_twin(patient, n_draws, cache=cache)
        setup = time.perf_counter() - t_setup
        print(f"  {'calibration (set-up, not counted)':<44s} {setup:9.2f} s  {how}", flush=True)
        t = time.perf_counter()
        tw = cal.with_drugs(scenario_drugs(scenario))
        model = tw.model
        t = _stage(f"twin + scenario drugs ({len(model.state_names)} states: {', '.join(model.state_names)})", t, rows)
    else:
        model = model_for_scenario(scenario)
        t = _stage(f"model ({len(model.state_names)} states)", t, rows)
        tw = prior_twin(patient, model, n_draws, seed=1)
        t = _stage("prior draws", t, rows)
    marks: dict[str, float] = {}
    last = [time.perf_counter()]
    groups: dict[str, int] = {}

    def progress(p):
        now = time.perf_counter()
        for arm in str(p["arm"]).split(","):
            marks[arm] = marks.get(arm, 0.0) + (now - last[0]) / max(1, len(str(p["arm"]).split(",")))
        msg = str(p.get("message", ""))
        if "distinct dose histories" in msg:
            groups[p["arm"]] = max(groups.get(p["arm"], 0), int(msg.rsplit(",", 1)[1].split()[0]))
        last[0] = now

    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t_run = time.perf_counter()
    last[0] = t_run
    result = run_scenario(tw, scenario, horizon=days, progress=progress)
    if prof is not None:
        prof.disable()
    for arm, s in marks.items():
        extra = f" (up to {groups[arm]} distinct dose histories per visit)" if arm in groups else ""
        print(f"    arm {arm:<40s} {s:9.2f} s{extra}", flush=True)
    t = _stage("run_scenario (all arms)", t_run, rows)
    table = outcome_table(result)
    t = _stage(f"outcome table ({len(table)} rows)", t, rows)
    total = time.perf_counter() - start - setup
    n_fail = int((result["status"].values != 0).sum())
    print(f"  total {total:.2f} s; failed arm x draw: {n_fail}", flush=True)
    if prof is not None:
        import pstats

        for key in ("cumulative", "tottime"):
            print(f"\n  cProfile, top 25 by {key}:")
            pstats.Stats(prof, stream=sys.stdout).sort_stats(key).print_stats(25)
    return total


def trial(n_patients: int, n_draws: int, days: float, *, kind: str = "calibrated", loop: bool = False) -> float:
    import twin
    from scenarios import Scenario, library_path
    from scenarios.run import model_for_scenario, outcome_table, prior_twin, run_scenario, run_trial, scenario_drugs

    how = "one run_scenario per patient" if loop else "scenarios.run.run_trial (patients batched)"
    what = "reduced-model (default_model) prior twins" if kind == "calibrated" else "pathway-model prior twins"
    print(f"(b) virtual trial: {n_patients} Bruchovsky patients x {n_draws} prior draws x {days:g} days, {SCENARIO}; {what}; {how}", flush=True)
    start = t = time.perf_counter()
    cohort = twin.datasets.load_bruchovsky()
    ids = sorted(cohort.ids)
    scenario = Scenario.from_toml(library_path(SCENARIO))
    patients = [cohort[ids[k % len(ids)]] for k in range(n_patients)]
    if kind == "calibrated":
        shared: dict = {}
        drugs = scenario_drugs(scenario)
        twins = [prior_twin(p, _reduced_model(p, drugs, shared), n_draws, seed=k) for k, p in enumerate(patients)]
        models = f"{len(shared)} distinct reduced model(s)"
    else:
        model = model_for_scenario(scenario)
        twins = [prior_twin(p, model, n_draws, seed=k) for k, p in enumerate(patients)]
        models = "1 pathway model"
    t = _stage(f"cohort + {n_patients} prior twins ({models})", t, [])
    if loop:
        per = []
        for k, tw in enumerate(twins):
            t1 = time.perf_counter()
            outcome_table(run_scenario(tw, scenario, horizon=days))
            per.append(time.perf_counter() - t1)
            if k < 3 or (k + 1) % 10 == 0:
                print(f"  patient {k + 1:3d}/{n_patients} ({tw.patient.id}): {per[-1]:.2f} s; elapsed {time.perf_counter() - start:.1f} s", flush=True)
        print(f"  per patient median {np.median(per):.2f} s, max {np.max(per):.2f} s", flush=True)
    else:
        results = run_trial(twins, scenario, horizon=days)
        t = _stage(f"run_trial ({max(r.attrs['trial_batch_size'] for r in results)} patients per batch)", t, [])
        for r in results:
            outcome_table(r)
        t = _stage("outcome tables", t, [])
    total = time.perf_counter() - start
    print(f"  total {total:.2f} s", flush=True)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--twin", choices=("calibrated", "prior-pathway"), default="calibrated",
                    help="calibrated: the MAP-calibrated reduced-model twin (D12), (b) reduced-model prior twins (default); "
                         "prior-pathway: prior twins of the pathway model (the numbers before)")
    ap.add_argument("--no-cache", action="store_true", help="--twin calibrated: recalibrate, do not read or write the cached twin file")
    ap.add_argument("--draws", type=int, default=1000, help="draws of (a): posterior or prior (default 1000)")
    ap.add_argument("--days", type=float, default=730.0, help="horizon [day] of (a) and (b) (default 730)")
    ap.add_argument("--patients", type=int, default=100, help="patients of the trial (b) (default 100)")
    ap.add_argument("--trial-draws", type=int, default=20, help="prior draws per trial patient (default 20)")
    ap.add_argument("--skip-trial", action="store_true", help="run (a) only")
    ap.add_argument("--trial-loop", action="store_true", help="(b) as one run_scenario per patient instead of run_trial")
    ap.add_argument("--profile", action="store_true", help="cProfile (a): top 25 functions")
    ap.add_argument("--threads", type=int, default=None, help="numba threads of the compiled engine (default NUMBA_NUM_THREADS)")
    ap.add_argument("--engine", choices=("compiled", "simulate"), default="compiled", help="scenarios.run._ENGINE (default compiled)")
    ap.add_argument("--no-carry", action="store_true", help="compiled engine: restart the step size at every dose (as simulate)")
    ap.add_argument("--baseline", action="store_true",
                    help="the code before issue 5 item 10: --engine simulate with the vector field not hoisted (twin.compiled._HOIST = False)")
    args = ap.parse_args(argv)
    import numba
    import torch

    import scenarios.run as runner

    if args.baseline:
        import twin.compiled

        twin.compiled._HOIST = False
        args.engine = "simulate"
    runner._ENGINE = args.engine
    runner._CARRY_STEP = not args.no_carry
    if args.threads:
        numba.set_num_threads(int(args.threads))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; engine {args.engine}{' (baseline)' if args.baseline else ''}"
          f"{'' if args.engine == 'simulate' else f' ({numba.get_num_threads()} numba threads, step carry {runner._CARRY_STEP})'}; "
          f"twin {args.twin}; machine: {_machine()}", flush=True)
    a = one_patient(args.draws, args.days, kind=args.twin, profile=args.profile, cache=not args.no_cache)
    b = float("nan") if args.skip_trial else trial(args.patients, args.trial_draws, args.days, kind=args.twin, loop=args.trial_loop)
    print(f"machine at the end: {_machine()}", flush=True)
    print(f"BENCH scenarios seconds={a:.3f} trial_seconds={b:.3f}", flush=True)
    return 0


def _machine() -> str:
    import os
    import platform

    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        load = "?"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, load average {load}"


if __name__ == "__main__":
    raise SystemExit(main())
