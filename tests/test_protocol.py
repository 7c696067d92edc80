"""The treatment protocol language (scenarios.protocol): golden strings, typed steps, expansion, errors.

The golden table ``GOLDEN`` maps each example string to the typed steps a user would build
by hand and to the exact dose events for a 70 kg, 1.8 m² patient. ``docs/how-to/write-a-protocol.md``
shows every golden string (checked here) and its Python blocks run here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scenarios import (
    EXAMPLES,
    Combination,
    Dose,
    DoseReduction,
    Protocol,
    ProtocolError,
    Rest,
    Sequence,
    Switch,
    parse_step,
)
from twin.errors import InputError
from twin.patient import Covariates

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "how-to" / "write-a-protocol.md"
COV = Covariates(weight=70.0, bsa=1.8)
#: capecitabine is not (yet) in the bundled drug catalogue: declared, as a patient file would.
EXTRA = ("capecitabine",)
H = 1.0 / 24.0


def _ev(drug, times, amount, route, duration=0.0):
    return [(drug, float(t), float(amount), route, float(duration)) for t in times]


# text -> (typed steps, expansion kwargs, expected events (drug, time, amount [mg], route, duration [day]))
GOLDEN = {
    "abiraterone 1000 mg oral daily for 12 weeks": (
        [Dose("abiraterone", 1000, "mg", "oral", every=1, for_days=84)],
        {},
        _ev("abiraterone", range(84), 1000, "oral"),
    ),
    "docetaxel 75 mg/m2 IV over 1 hour every 3 weeks for 6 cycles": (
        [Dose("docetaxel", 75, "mg/m2", "iv", every=21, cycles=6, infusion=1 / 24)],
        {},
        _ev("docetaxel", [0, 21, 42, 63, 84, 105], 135, "iv", H),
    ),
    "rest for 8 weeks": ([Rest(56)], {}, []),
    "capecitabine 1000 mg/m2 oral BID days 1-14 of a 21-day cycle for 4 cycles": (
        [Dose("capecitabine", 1000, "mg/m2", "oral", every=0.5, days_of_cycle=tuple(range(1, 15)), cycle_length=21, cycles=4)],
        {},
        _ev("capecitabine", [c * 21 + k * 0.5 for c in range(4) for k in range(28)], 1800, "oral"),
    ),
    "dabrafenib 150 mg oral BID + trametinib 2 mg oral daily for 24 weeks": (
        [Combination((Dose("dabrafenib", 150, "mg", "oral", every=0.5, for_days=168),
                      Dose("trametinib", 2, "mg", "oral", every=1, for_days=168)))],
        {},
        _ev("dabrafenib", np.arange(336) * 0.5, 150, "oral") + _ev("trametinib", range(168), 2, "oral"),
    ),
    "encorafenib 300 mg oral daily until progression then switch to trametinib 2 mg oral daily": (
        [Dose("encorafenib", 300, "mg", "oral", every=1),
         Switch(to=Dose("trametinib", 2, "mg", "oral", every=1), at="progression")],
        {"horizon": 100},
        _ev("encorafenib", range(100), 300, "oral"),
    ),
    "leuprolide 7.5 mg im every 4 weeks for 6 doses": (
        [Dose("leuprolide", 7.5, "mg", "im", every=28, doses=6)],
        {},
        _ev("leuprolide", [0, 28, 56, 84, 112, 140], 7.5, "im"),
    ),
    "cetuximab 400 mg/m2 iv over 2 hours once then 250 mg/m2 iv over 1 hour weekly for 8 weeks": (
        [Dose("cetuximab", 400, "mg/m2", "iv", infusion=2 / 24),
         Dose("cetuximab", 250, "mg/m2", "iv", every=7, for_days=56, infusion=1 / 24)],
        {},
        _ev("cetuximab", [0], 720, "iv", 2 * H) + _ev("cetuximab", range(7, 57, 7), 450, "iv", H),
    ),
    "reduce trametinib to 1.5 mg after 8 weeks": (
        [DoseReduction("trametinib", amount=1.5, unit="mg", after=56)],
        # a reduction alone gives nothing: expanded after the combination above
        {"context": "dabrafenib 150 mg oral BID + trametinib 2 mg oral daily for 24 weeks"},
        _ev("dabrafenib", np.arange(336) * 0.5, 150, "oral")
        + _ev("trametinib", range(56), 2, "oral") + _ev("trametinib", range(56, 168), 1.5, "oral"),
    ),
}


def _events(regimen) -> list[tuple]:
    ev = regimen.events()
    return sorted(zip(ev["drug"], ev["time"], ev["amount"], ev["route"], ev["duration"]))


def _expand(text: str, kw: dict):
    kw = dict(kw)
    context = kw.pop("context", None)
    full = f"{context}\n{text}" if context else text
    return Protocol.parse(full, drugs=EXTRA).expand(COV, **kw)


# -- the golden table ------------------------------------------------------------------------
def test_examples_are_the_golden_table():
    assert tuple(GOLDEN) == EXAMPLES


@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_string_parses_into_typed_steps(text):
    steps, _, _ = GOLDEN[text]
    assert Protocol.parse(text, drugs=EXTRA).steps == tuple(steps)
    assert Protocol.parse(text, drugs=EXTRA) == Protocol(steps, drugs=EXTRA)


@pytest.mark.parametrize("text", list(GOLDEN))
def test_golden_string_expands_to_exact_events(text):
    _, kw, expected = GOLDEN[text]
    got = _events(_expand(text, kw))
    expected = sorted(expected)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g[0] == e[0] and g[3] == e[3], (g, e)
        assert g[1] == pytest.approx(e[1], abs=1e-9) and g[2] == pytest.approx(e[2], rel=1e-12)
        assert g[4] == pytest.approx(e[4], abs=1e-12)


@pytest.mark.parametrize("text", list(GOLDEN))
def test_string_and_typed_forms_give_identical_regimens(text):
    steps, kw, _ = GOLDEN[text]
    kw = dict(kw)
    context = kw.pop("context", None)
    if context:
        steps = list(Protocol.parse(context).steps) + list(steps)
    typed = Protocol(steps, drugs=EXTRA).expand(COV, **kw)
    parsed = _expand(text, dict(GOLDEN[text][1]))
    pd.testing.assert_frame_equal(typed.table, parsed.table)


@pytest.mark.parametrize("text", list(GOLDEN))
def test_round_trip_str_parse(text):
    protocol = Protocol.parse(text, drugs=EXTRA)
    for step in protocol.steps:
        assert parse_step(str(step), drugs=EXTRA) == step, str(step)
    assert Protocol.parse(str(protocol), drugs=EXTRA) == protocol


ROUND_TRIP = [
    Dose("fluorouracil", 400, "mg/m2", "iv", every=14, for_days=84, infusion=46 / 24),
    Dose("erlotinib", 150, "mg", "oral", every=1 / 3, doses=9),
    Dose("gemcitabine", 1000, "mg/m2", "iv", days_of_cycle=(1, 8, 15), cycle_length=28, cycles=6, infusion=0.5 / 24),
    Dose("paclitaxel", 2.5, "mg/kg", "iv", every=7, for_days=10),
    Dose("enzalutamide", 160, "mg", "oral", every=0.25, days_of_cycle="1-5, 8-12", cycle_length=14, for_days=28),
    Rest(10),
    Rest(0.5),
    DoseReduction("docetaxel", factor=0.8, after=42),
    DoseReduction("docetaxel", amount=60, unit="mg/m2"),
    Switch(Combination((Dose("dabrafenib", 150, every=0.5), Dose("trametinib", 2, every=1))), at="resistance"),
    Sequence((Dose("docetaxel", 75, "mg/m2", "iv", every=21, cycles=2), Rest(14), Dose("abiraterone", 1000, every=1, for_days=28))),
    Combination((Dose("dabrafenib", 150, every=0.5, for_days=28), Dose("trametinib", 2, every=1, for_days=14))),
]


@pytest.mark.parametrize("step", ROUND_TRIP, ids=lambda s: str(s)[:40])
def test_round_trip_typed_steps(step):
    assert parse_step(str(step)) == step


# -- readable variants parse into the same steps ---------------------------------------------
@pytest.mark.parametrize(
    "text, step",
    [
        ("Tafinlar 150 mg po twice daily for 4 weeks", Dose("dabrafenib", 150, "mg", "oral", every=0.5, for_days=28)),
        ("docetaxel 0.075 g/m2 iv every 21 days for 2 cycles", Dose("docetaxel", 75, "mg/m2", "iv", every=21, cycles=2)),
        ("paclitaxel 3500 ug/kg iv weekly", Dose("paclitaxel", 3.5, "mg/kg", "iv", every=7)),
        ("abiraterone 1 g oral once daily for 84 days", Dose("abiraterone", 1000, "mg", "oral", every=1, for_days=84)),
        ("abiraterone 1000mg daily for 12 weeks", Dose("abiraterone", 1000, "mg", "oral", every=1, for_days=84)),
        ("paclitaxel 3.5 mg/kg intravenous over 30 minutes every 12 hours for 4 doses",
         Dose("paclitaxel", 3.5, "mg/kg", "iv", every=0.5, doses=4, infusion=30 / 1440)),
        ("5-fu 400 mg/m² iv day 1 of each 14-day cycle for 3 cycles",
         Dose("fluorouracil", 400, "mg/m2", "iv", days_of_cycle=(1,), cycle_length=14, cycles=3)),
        ("capecitabine 1000 mg/m2 oral b.i.d. days 1-14 of every 3-week cycle for 4 cycles",
         Dose("capecitabine", 1000, "mg/m2", "oral", every="BID", days_of_cycle="1-14", cycle_length=21, cycles=4)),
        ("reduce TRAMETINIB by 25% after 2 weeks", DoseReduction("trametinib", factor=0.75, after=14)),
        ("switch to trametinib 2 mg oral daily on progression", Switch(Dose("trametinib", 2, every="daily"))),
        ("leuprolide 22.5 mg im every 12 weeks", Dose("leuprolide", 22.5, "mg", "im", every="12 weeks")),
    ],
)
def test_readable_variants(text, step):
    assert parse_step(text, drugs=EXTRA) == step


def test_separators_comments_and_lines():
    text = """
    # induction
    docetaxel 75 mg/m2 iv over 1 hour every 3 weeks for 2 cycles   # two cycles
    rest for 2 weeks; abiraterone 1000 mg oral daily for 4 weeks then rest for 1 week
    """
    p = Protocol.parse(text)
    assert [type(s) for s in p.steps] == [Dose, Rest, Dose, Rest]
    ev = p.expand(COV).events()
    assert list(ev[ev.drug == "docetaxel"].time) == [0.0, 21.0]
    abi = ev[ev.drug == "abiraterone"].time
    assert abi.min() == 56.0 and abi.max() == 83.0 and len(abi) == 28  # 42 days of docetaxel + 14 rest


def test_mg_per_kg_and_notes():
    reg = Protocol.parse("paclitaxel 3.5 mg/kg iv weekly for 3 doses").expand(COV)
    ev = reg.events()
    assert list(ev.amount) == [245.0] * 3 and list(ev.time) == [0.0, 7.0, 14.0]
    assert "3.5 mg/kg x 70 kg" in ev.note.iloc[0]


def test_typed_defaults_synonyms_and_sugar():
    assert Dose("Tafinlar", 150, every="BID") == Dose("dabrafenib", 150, "mg", "oral", every=0.5)
    assert Dose("docetaxel", 75, "mg/m2", infusion="1 hour").route == "iv"  # catalogue standard route
    assert Dose("docetaxel", 75, "mg/m2", "iv", every="3 weeks", for_days="18 weeks").every == 21.0
    # 'daily on the listed days' is the same as once on each listed day
    assert Dose("capecitabine", 1, every=1, days_of_cycle="1-3", cycle_length=7, route="oral") == Dose(
        "capecitabine", 1, days_of_cycle=(1, 2, 3), cycle_length=7, route="oral"
    )


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: Dose("docetaxel", -75, "mg/m2"), "positive"),
        (lambda: Dose("docetaxel", 75, "ml"), "unit"),
        (lambda: Dose("docetaxel", 75, route="oral-ish"), "route"),
        (lambda: Dose("docetaxel", 75, every=21, for_days=84, cycles=4), "not for_days and cycles"),
        (lambda: Dose("docetaxel", 75, days_of_cycle="1-14"), "cycle_length"),
        (lambda: Dose("docetaxel", 75, days_of_cycle="1-30", cycle_length=21), "do not fit"),
        (lambda: Dose("docetaxel", 75, for_days=84), "single dose"),
        (lambda: Rest(0), "positive"),
        (lambda: DoseReduction("trametinib", factor=1.2), "between 0 and 1"),
        (lambda: DoseReduction("trametinib"), "either factor"),
        (lambda: Switch(Dose("trametinib", 2, every=1), at="progresion"), "Did you mean 'progression'"),
        (lambda: Combination((Dose("trametinib", 2, every=1),)), "at least two"),
        (lambda: Protocol([Dose("capecitabine", 1000, "mg/m2", "oral", every=0.5)]), "unknown drug 'capecitabine'"),
        (lambda: Protocol([Dose("abiraterone", 1000, every=1), Rest(7)]), "never starts"),
    ],
)
def test_typed_steps_validate(make, fragment):
    with pytest.raises(ProtocolError, match=re.escape(fragment)):
        make()


# -- errors ------------------------------------------------------------------------------------
BAD = [
    # text, line, column, token shown under the caret, fragments of the message
    ("docetaxol 75 mg/m2 iv every 3 weeks for 6 cycles", 1, 1, "docetaxol", ["unknown drug 'docetaxol'", "Did you mean 'docetaxel'"]),
    ("abiraterone 1000 oral daily for 12 weeks", 1, 13, "1000", ["no unit", "'1000 mg'"]),
    ("abiraterone 1000 mg oral hourly for 12 weeks", 1, 26, "hourly", ["unknown frequency 'hourly'", "BID"]),
    ("abiraterone 1000 mg oral daily for", 1, 36, None, ["ends after 'for'", "'for 12 weeks'"]),
    ("rest for\nabiraterone 1000 mg oral daily", 1, 9, None, ["the step ends after 'for'", "'for 12 weeks'"]),
    ("docetaxel -75 mg/m2 iv every 3 weeks for 6 cycles", 1, 11, "-75", ["positive", "-75"]),
    ("abiraterone 1000 mg oral daily for 12 weeks please", 1, 45, "please", ["unexpected 'please'"]),
    ("abiraterone 1000 mL oral daily for 12 weeks", 1, 18, "mL", ["not a dose unit"]),
    ("abiraterone 1000 mg oral for 12 weeks", 1, 26, "for", ["how often?"]),
    # pint reads 'cycles' as a dimensionless unit (like mg/kg): not a dose unit
    ("abiraterone 1000 cycles oral daily", 1, 18, "cycles", ["not a dose unit"]),
    ("abiraterone 1000 mg oral daily for 3 months", 1, 38, "months", ["months differ in length"]),
    ("encorafenib 300 mg oral daily until progresion then switch to trametinib 2 mg oral daily", 1, 37, "progresion",
     ["unknown condition", "Did you mean 'progression'"]),
    ("docetaxel 75 mg/m2 iv every 3 weeks for 2 cycles\n\nrest for 2 wekks", 3, 12, "wekks", ["unexpected 'wekks'", "time unit"]),
    ("250 mg/m2 iv weekly for 8 weeks", 1, 1, None, ["which drug?"]),
    ("abiraterone 1000 mg oral daily\nrest for 2 weeks", 2, 1, None, ["never starts"]),
    ("reduce trametinib by 120% after 8 weeks", 1, 22, "120", ["not between 0 and 100%"]),
]


@pytest.mark.parametrize("text, line, column, token, fragments", BAD, ids=[b[0][:30] for b in BAD])
def test_bad_strings_give_located_messages(text, line, column, token, fragments):
    with pytest.raises(ProtocolError) as info:
        Protocol.parse(text, drugs=EXTRA)
    err = info.value
    msg = str(err)
    assert isinstance(err, InputError)
    assert (err.line, err.column) == (line, column), msg
    assert f"protocol line {line}, column {column}:" in msg
    if token is not None:
        assert err.token == token
        assert "^" * len(token) in msg
    for fragment in fragments:
        assert fragment in msg, msg
    # ends with the valid examples
    assert msg.rstrip().endswith(EXAMPLES[-1])
    assert all(example in msg for example in EXAMPLES)


def test_empty_protocol():
    for text in ("", "   \n ; ", "# only a comment"):
        with pytest.raises(ProtocolError, match="empty"):
            Protocol.parse(text)


def test_mg_per_m2_without_bsa_is_located():
    p = Protocol.parse("rest for 1 week\ndocetaxel 75 mg/m2 iv every 3 weeks for 6 cycles")
    with pytest.raises(ProtocolError) as info:
        p.expand(Covariates(weight=70.0))
    msg = str(info.value)
    assert "line 2, column 1" in msg and "body-surface area" in msg and "Covariates(bsa=...)" in msg
    with pytest.raises(ProtocolError, match="weight"):
        Protocol.parse("paclitaxel 3.5 mg/kg iv weekly for 3 doses").expand(None)


def test_open_ended_step_needs_a_horizon():
    p = Protocol.parse("abiraterone 1000 mg oral daily")
    with pytest.raises(ProtocolError, match="horizon"):
        p.expand(COV)
    ev = p.expand(COV, start=10, horizon=20).events()
    assert list(ev.time) == [float(t) for t in range(10, 20)]


def test_horizon_cuts_finite_steps():
    ev = Protocol.parse(EXAMPLES[1]).expand(COV, horizon=50).events()
    assert list(ev.time) == [0.0, 21.0, 42.0]


def test_switch_stops_expansion_and_reports():
    x = Protocol.parse(EXAMPLES[5]).expansion(COV, horizon=30)
    assert len(x.regimen.events()) == 30
    assert x.pending == (Switch(Dose("trametinib", 2, "mg", "oral", every=1)),)
    assert "conditional" in x.message and "progression" in x.message
    assert "conditional, not expanded" in x.regimen.table.note.iloc[0]
    # the two spellings of a switch are the same steps
    assert Protocol.parse(EXAMPLES[5]) == Protocol.parse(
        "encorafenib 300 mg oral daily\nswitch to trametinib 2 mg oral daily at progression"
    )


def test_reductions_by_factor_and_errors():
    p = Protocol.parse("docetaxel 75 mg/m2 iv every 3 weeks for 4 cycles; reduce docetaxel by 20% after 6 weeks")
    ev = p.expand(COV).events()
    assert list(ev.amount) == pytest.approx([135, 135, 108, 108])
    assert "reduced by 20%" in ev.note.iloc[-1]
    with pytest.raises(ProtocolError, match="gives no trametinib"):
        Protocol.parse(EXAMPLES[-1]).expand(COV)
    with pytest.raises(ProtocolError, match="must lower the dose"):
        Protocol.parse("trametinib 2 mg oral daily for 4 weeks; reduce trametinib to 3 mg").expand(COV)


def test_loading_dose_then_rest():
    # a single dose followed by something other than the same drug takes no time
    ev = Protocol.parse("docetaxel 75 mg/m2 iv once; rest for 3 weeks; docetaxel 60 mg/m2 iv once").expand(COV).events()
    assert list(ev.time) == [0.0, 21.0] and list(ev.amount) == pytest.approx([135.0, 108.0])


def test_compact_regimen_rows():
    table = Protocol.parse(EXAMPLES[3], drugs=EXTRA).expand(COV).table
    assert list(table["count"]) == [28] * 4 and list(table["interval"]) == [0.5] * 4


def test_no_eval_or_exec():
    source = (ROOT / "scenarios" / "protocol.py").read_text(encoding="utf-8")
    assert not re.search(r"\b(eval|exec)\(", source)


# -- the how-to page ------------------------------------------------------------------------
def test_doc_shows_every_golden_string():
    doc = DOC.read_text(encoding="utf-8")
    missing = [t for t in GOLDEN if t not in doc]
    assert not missing, f"docs/how-to/write-a-protocol.md lacks the golden examples {missing}"


def test_doc_python_blocks_run():
    doc = DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert blocks
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - our own documentation
