"""The published format cannot go stale: the shipped JSON Schema, the example patient files,
the format reference and the tutorial are checked against the code.

- ``twin/schema/patient.schema.json`` equals ``twin.io.json_schema()``;
- ``docs/examples/patient-example.yaml`` validates against the schema and loads without
  errors; the example folder loads to the same patient;
- ``docs/patient-format.md`` lists every column, header key, observable (with its unit and
  aliases) and route that the code knows, and nothing else in its column tables;
- the Python blocks of ``docs/getting-started.md`` and ``docs/patient-format.md`` run;
- ``docs/reference/cli.md`` names every command and option of ``twin``;
- relative links and anchors in these pages resolve.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

import twin
from twin.io.records import (
    _ROUTE_ALIASES,
    ROUTES,
    TABLES,
    Covariates,
    DrugDeclaration,
    ObservableDeclaration,
    PatientHeader,
    json_schema,
)
from twin.observables import OBSERVABLES
from twin.units import conversion_factor

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCHEMA_FILE = ROOT / "twin" / "schema" / "patient.schema.json"
EXAMPLE_DIR = DOCS / "examples" / "patient-example"
EXAMPLE_YAML = DOCS / "examples" / "patient-example.yaml"
FORMAT_DOC = DOCS / "patient-format.md"
TUTORIAL = DOCS / "getting-started.md"
CLI_DOC = DOCS / "reference" / "cli.md"
OWN_PAGES = [DOCS / "index.md", FORMAT_DOC, TUTORIAL, CLI_DOC]
# Pages linked from the docs that other work is writing; a link to them may dangle until they land.
PENDING_TARGETS = {DOCS / "how-to", DOCS / "how-to" / "import-data.md", DOCS / "datasets.md"}

REGENERATE = "run `python -m twin.io._write_schema` to regenerate the shipped schema"


# -- helpers -------------------------------------------------------------------------------

def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def _headings(text: str) -> list[tuple[int, int, str]]:
    """(line index, level, title) of every Markdown heading outside fenced code."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^(#{1,6})\s+(.*?)\s*$", line)
        if m and not fenced:
            out.append((i, len(m.group(1)), m.group(2)))
    return out


def _section(text: str, needle: str, *, subsections: bool = False) -> str:
    """The lines under the one heading that contains ``needle`` (up to the next heading of the
    same or a higher level; with ``subsections=False``, up to any next heading)."""
    lines = text.splitlines()
    heads = _headings(text)
    found = [(k, h) for k, h in enumerate(heads) if needle in h[2]]
    assert len(found) == 1, f"docs/patient-format.md: expected one heading containing {needle!r}, found {[h[2] for _, h in found]}"
    k, (start, level, _) = found[0]
    end = len(lines)
    for i, lvl, _ in heads[k + 1 :]:
        if subsections and lvl > level:
            continue
        end = i
        break
    return "\n".join(lines[start + 1 : end])


def _table_rows(section: str) -> dict[str, list[str]]:
    """Rows of Markdown tables whose first cell is one `name`: name -> the row's cells."""
    rows = {}
    for line in section.splitlines():
        m = re.match(r"^\|\s*`([^`]+)`\s*\|", line)
        if m:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert m.group(1) not in rows, f"`{m.group(1)}` has two rows in one section"
            rows[m.group(1)] = cells
    return rows


def _backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _fenced_blocks(text: str, lang: str | None) -> list[str]:
    """Contents of fenced code blocks with the given info string (None: no info string)."""
    blocks, current, info = [], None, None
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                info = line[3:].strip() or None
                current = []
            else:
                if info == lang:
                    blocks.append("\n".join(current))
                current = None
            continue
        if current is not None:
            current.append(line)
    return blocks


@pytest.fixture(scope="module")
def format_doc() -> str:
    return _text(FORMAT_DOC)


# -- (a) the shipped JSON Schema -----------------------------------------------------------

def test_shipped_schema_equals_json_schema():
    assert SCHEMA_FILE.exists(), f"{SCHEMA_FILE.relative_to(ROOT)} is missing; {REGENERATE}"
    shipped = json.loads(_text(SCHEMA_FILE))
    current = json.loads(json.dumps(json_schema()))
    assert shipped == current, f"{SCHEMA_FILE.relative_to(ROOT)} is out of date with twin/io/records.py; {REGENERATE}"


def test_schema_script_check_and_write(tmp_path, capsys):
    from twin.io import _write_schema

    assert _write_schema.main(["--check"]) == 0, REGENERATE
    out = tmp_path / "patient.schema.json"
    assert _write_schema.main(["-o", str(out)]) == 0
    assert json.loads(_text(out)) == json.loads(_text(SCHEMA_FILE))
    out.write_text("{}", encoding="utf-8")
    assert _write_schema.main(["--check", "-o", str(out)]) == 1
    assert "python -m twin.io._write_schema" in capsys.readouterr().err


def test_schema_is_a_valid_json_schema():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(json.loads(_text(SCHEMA_FILE)))


def test_schema_ships_as_package_data():
    from importlib import resources

    text = resources.files("twin").joinpath("schema/patient.schema.json").read_text(encoding="utf-8")
    assert json.loads(text)["title"].startswith("twin patient file")


# -- (b), (c) the example patient ----------------------------------------------------------

def test_yaml_example_validates_against_the_schema():
    import jsonschema

    schema = json.loads(_text(SCHEMA_FILE))
    doc = yaml.safe_load(_text(EXAMPLE_YAML))
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, "docs/examples/patient-example.yaml does not match the JSON Schema:\n" + "\n".join(errors)


@pytest.mark.parametrize("path", [EXAMPLE_YAML, EXAMPLE_DIR], ids=["yaml", "folder"])
def test_example_loads_without_errors_or_warnings(path):
    patient, problems = twin.read_patient(path)
    bad = [p.format() for p in problems if p.severity != "note"]
    assert patient is not None and not bad, "\n".join(bad)


def test_example_folder_and_yaml_are_the_same_patient():
    folder = twin.load_patient(EXAMPLE_DIR)
    single = twin.load_patient(EXAMPLE_YAML)
    assert folder.id == single.id
    assert folder.covariates == single.covariates
    assert folder.time_origin == single.time_origin
    assert (folder.labels, folder.drugs, folder.observables) == (single.labels, single.drugs, single.observables)
    pd.testing.assert_frame_equal(folder.measurements, single.measurements)
    pd.testing.assert_frame_equal(folder.history.table, single.history.table)
    pd.testing.assert_frame_equal(folder.phases, single.phases)
    for layer in ("mutations", "copy_number", "expression", "protein"):
        pd.testing.assert_frame_equal(getattr(folder.omics, layer), getattr(single.omics, layer), obj=f"omics.{layer}")


def test_example_shows_what_the_format_doc_promises():
    """The example carries a censored PSA, dates, a daily drug via interval/count, a mg/m² IV
    infusion, a declared drug and observable, and three omics layers."""
    p = twin.load_patient(EXAMPLE_DIR)
    assert _text(EXAMPLE_DIR / "measurements.csv").count(",<0.1,") == 1
    psa = p.series("psa")
    censored = psa[psa["below_lloq"]]
    assert len(censored) == 1 and censored["lloq"].iloc[0] == pytest.approx(0.1) and censored["value"].isna().all()
    assert p.time_origin == "2019-02-25"
    h = p.history.table.set_index("drug")
    assert h.loc["abiraterone", "interval"] == 1 and h.loc["abiraterone", "count"] > 1 and h.loc["abiraterone", "route"] == "oral"
    assert h.loc["docetaxel", "route"] == "iv"
    assert h.loc["docetaxel", "duration"] == pytest.approx(1 / 24)
    assert h.loc["docetaxel", "amount"] == pytest.approx(75 * p.covariates.bsa)
    assert "prednisone" in p.drugs and "prednisone" in p.history.drugs
    assert "alp" in p.observed
    assert set(p.omics.layers) == {"mutations", "copy_number", "expression"}


def test_saved_json_matches_the_schema_and_loads_back(tmp_path):
    import jsonschema

    patient = twin.load_patient(EXAMPLE_DIR)
    out = twin.save_patient(patient, tmp_path / "p.json")
    jsonschema.validate(json.loads(_text(out)), json.loads(_text(SCHEMA_FILE)))
    again = twin.load_patient(out)
    pd.testing.assert_frame_equal(patient.measurements, again.measurements)
    pd.testing.assert_frame_equal(patient.history.table, again.history.table)


# -- (d) the format reference names everything the code knows ------------------------------

@pytest.mark.parametrize("table", list(TABLES))
def test_format_doc_lists_every_column(format_doc, table):
    model, fname = TABLES[table]
    rows = _table_rows(_section(format_doc, f"`{fname}`"))
    fields = list(model.model_fields)
    assert set(rows) == set(fields), (
        f"docs/patient-format.md, section `{fname}`: the column table lists {sorted(rows)}, "
        f"the code ({model.__name__}) has {fields}"
    )
    for name, f in model.model_fields.items():
        required = rows[name][3]
        if f.is_required():
            assert "**yes**" in required, f"`{fname}` column `{name}` is required in the code; the doc says {required!r}"
        else:
            assert "**yes**" not in required, f"`{fname}` column `{name}` is optional in the code; the doc says {required!r}"
    assert fname in format_doc


def test_format_doc_lists_header_keys(format_doc):
    header = _table_rows(_section(format_doc, "`patient.toml`"))
    expected = [f.alias or n for n, f in PatientHeader.model_fields.items()]
    assert set(header) == set(expected), f"patient.toml keys: doc {sorted(header)}, code {expected}"
    assert "**yes**" in header["id"][2]
    covariates = _table_rows(_section(format_doc, "Covariates"))
    assert set(covariates) == set(Covariates.model_fields)
    declared = _table_rows(_section(format_doc, "Declaring drugs and observables"))
    expected_decl = {f.alias or n for n, f in DrugDeclaration.model_fields.items()} | set(ObservableDeclaration.model_fields)
    assert set(declared) == expected_decl
    for name, f in ObservableDeclaration.model_fields.items():
        assert ("**yes**" in declared[name][2]) == f.is_required()
    for literal in ("male", "female", "other", "unknown", "human", "mouse", "rat", "on", "off"):
        assert f"`{literal}`" in format_doc


def test_format_doc_plausible_ranges_match_the_loader(format_doc):
    from twin.io.load import _PLAUSIBLE

    section = _section(format_doc, "Covariates")
    for species, ranges in _PLAUSIBLE.items():
        row = next((line for line in section.splitlines() if line.startswith(f"| {species} |")), None)
        assert row is not None, f"no plausible-range row for {species}"
        cells = [c.strip() for c in row.strip().strip("|").split("|")][1:]
        for key, cell in zip(("age", "weight", "height", "bsa"), cells):
            lo, hi = (float(x) for x in cell.split("–"))
            assert (lo, hi) == ranges[key], f"{species} {key}: doc {cell}, loader {ranges[key]}"


def test_format_doc_lists_every_observable_with_unit_and_aliases(format_doc):
    rows = _table_rows(_section(format_doc, "Canonical units of observables"))
    assert set(rows) == set(OBSERVABLES), f"observables: doc {sorted(rows)}, code {sorted(OBSERVABLES)}"
    for name, obs in OBSERVABLES.items():
        cells = rows[name]
        assert f"`{obs.unit}`" in cells[1], f"{name}: canonical unit {obs.unit!r} not in {cells[1]!r}"
        assert set(_backticked(cells[2])) == set(obs.aliases), f"{name}: aliases {obs.aliases} vs doc {cells[2]!r}"
        for unit in _backticked(cells[3]):
            conversion_factor(unit, obs.unit, molar_mass=obs.molar_mass)  # raises if the doc lists a unit twin cannot read


def test_format_doc_lists_routes_and_aliases(format_doc):
    for route in ROUTES:
        assert f"`{route}`" in format_doc, f"route {route!r} missing from docs/patient-format.md"
    for alias in _ROUTE_ALIASES:
        assert f"`{alias}`" in format_doc, f"route alias {alias!r} missing from docs/patient-format.md"


def test_format_doc_links_the_schema(format_doc):
    assert "(../twin/schema/patient.schema.json)" in format_doc
    assert "python -m twin.io._write_schema" in format_doc


# -- (e) the code in the docs runs ---------------------------------------------------------

@pytest.mark.parametrize("page", [TUTORIAL, FORMAT_DOC], ids=lambda p: p.name)
def test_python_blocks_in_docs_run(page, tmp_path, monkeypatch):
    blocks = _fenced_blocks(_text(page), "python")
    assert blocks, f"{page.name} has no ```python blocks"
    shutil.copytree(DOCS / "examples", tmp_path / "docs" / "examples")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks, start=1):
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(block, f"{page.name}, python block {i}", "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"{page.relative_to(ROOT)}: python block {i} failed: {type(exc).__name__}: {exc}\n{block}")


def test_tutorial_shows_the_real_validate_output(monkeypatch, capsys):
    """The output shown in the tutorial is what `twin validate` prints: the same summary line
    and the same problems (severity, file and field) in the same order. The wording of each
    message may evolve without breaking this test."""
    from twin.cli import main

    target = "docs/examples/patient-example"
    shown = [b for b in _fenced_blocks(_text(TUTORIAL), None) if b.strip().splitlines()[-1].startswith(f"{target}: ")]
    assert len(shown) == 1, "docs/getting-started.md should show the output of `twin validate docs/examples/patient-example`"
    monkeypatch.chdir(ROOT)
    assert main(["validate", target]) == 0
    actual = capsys.readouterr().out.strip().splitlines()
    doc = shown[0].strip().splitlines()
    where = re.compile(r"^(error|warning|note): ([^:]+):")
    located = lambda lines: [m.group(0) for m in map(where.match, lines) if m]  # noqa: E731
    hint = "update the `twin validate` output shown in docs/getting-started.md"
    assert doc[-1] == actual[-1], hint
    assert located(doc) == located(actual), hint


# -- the CLI reference ---------------------------------------------------------------------

def test_cli_doc_names_every_command_and_option():
    import argparse

    from twin.cli import build_parser

    doc = _text(CLI_DOC)
    parser = build_parser()
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if f"## `twin {name}`" not in doc:
                    missing.append(f"command `twin {name}`")
                for a in sub._actions:
                    missing += [f"`twin {name} {o}`" for o in a.option_strings if f"`{o}`" not in doc]
        else:
            missing += [f"option `{o}`" for o in action.option_strings if f"`{o}`" not in doc]
    assert not missing, "docs/reference/cli.md does not mention: " + ", ".join(missing)
    for status in ("`0`", "`1`", "`2`"):
        assert status in doc
    assert "python -m twin" in doc


@pytest.mark.parametrize("path", [EXAMPLE_DIR, EXAMPLE_YAML], ids=["folder", "yaml"])
def test_twin_validate_accepts_the_examples(path, capsys):
    from twin.cli import main

    assert main(["validate", "-q", str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK (0 error(s), 0 warning(s)" in out and "note:" not in out


# -- links ---------------------------------------------------------------------------------

@pytest.mark.parametrize("page", OWN_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_relative_links_and_anchors_resolve(page):
    text = _text(page)
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            if dest not in PENDING_TARGETS:
                broken.append(target)
            continue
        if anchor:
            assert dest.suffix == ".md", f"{page.name}: anchor on a non-Markdown target {target}"
            slugs = {_slug(h) for _, _, h in _headings(_text(dest))}
            if anchor not in slugs:
                broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"
