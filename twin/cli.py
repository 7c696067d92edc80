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
    from .demo import run_demo

    return run_demo(output=Path(args.output), seed=args.seed, n_draws=args.draws)


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
    d.add_argument("--draws", type=int, default=100, help="prior draws to simulate (default 100)")
    d.set_defaults(func=_cmd_demo)
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
