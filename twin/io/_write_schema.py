"""Regenerate the shipped JSON Schema of the patient file format.

The schema is derived from the pydantic records (:func:`twin.io.records.json_schema`);
this script writes it to ``twin/schema/patient.schema.json`` so it ships with the
package and can be linked from the docs. A test fails when the shipped file is stale.

Usage::

    python -m twin.io._write_schema          # write the file
    python -m twin.io._write_schema --check  # exit 1 if the shipped file is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .records import json_schema

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schema" / "patient.schema.json"


def schema_text() -> str:
    """The schema as the shipped file holds it (stable key order, trailing newline)."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m twin.io._write_schema", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the shipped schema differs from json_schema()")
    parser.add_argument("-o", "--output", type=Path, default=SCHEMA_PATH, help=f"where to write (default: {SCHEMA_PATH})")
    args = parser.parse_args(argv)
    text = schema_text()
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else None
        if current is None or json.loads(current) != json.loads(text):
            print(f"{args.output} is out of date; run: python -m twin.io._write_schema", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    from .._atomic import atomic_write_text

    atomic_write_text(args.output, text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
