"""Scenario files: the bundled library loads; every bad file gives a located message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scenarios.policy import Bruchovsky, Limited, RulePolicy, Zhang
from scenarios.protocol import Switch
from scenarios.scenario import LIBRARY, SCENARIO_EXAMPLE, Arm, OutcomeSpec, Scenario, ScenarioError, library_path
from twin.errors import InputError
from twin.io.records import Covariates

ROOT = Path(__file__).resolve().parents[1]
HOWTO = ROOT / "docs" / "how-to" / "write-a-scenario.md"
LIBRARY_FILES = sorted(LIBRARY.glob("*.toml"))


def test_library_has_the_three_scenarios():
    names = {p.stem for p in LIBRARY_FILES}
    assert {
        "adt_continuous_vs_intermittent_vs_adaptive",
        "braf_mek_combination_vs_mono_vs_sequential",
        "mtd_vs_metronomic",
    } <= names


@pytest.mark.parametrize("path", LIBRARY_FILES, ids=lambda p: p.stem)
def test_library_file_loads_and_expands(path):
    sc = Scenario.from_toml(path)
    assert sc.name == path.stem
    assert len(sc.arms) >= 2 and sc.visits[0] == 0 and sc.visits[-1] <= sc.horizon
    assert sc.outcomes.criteria
    cov = Covariates(weight=80, bsa=1.8)
    for arm in sc.arms:
        for proto in (arm.protocol, arm.treat, arm.background):
            if proto is not None:
                reg = proto.expand(cov, start=0, horizon=sc.horizon, arm=arm.name)
                assert len(reg) > 0
    assert library_path(path.stem) == path


def test_library_content():
    adt = Scenario.from_toml(library_path("adt_continuous_vs_intermittent_vs_adaptive"))
    assert adt.arm("intermittent").policy == Bruchovsky()
    lim = adt.arm("adaptive").policy
    assert isinstance(lim, Limited) and lim.policy == Zhang() and lim.min_holiday == 28
    assert adt.horizon == 4 * 365.25 and adt.visits[1] == 28
    braf = Scenario.from_toml(library_path("braf_mek_combination_vs_mono_vs_sequential"))
    assert braf.arm("dabrafenib_then_trametinib").switch_conditions == ("progression",)
    assert isinstance(braf.arm("dabrafenib_then_trametinib").protocol.steps[-1], Switch)
    mtd = Scenario.from_toml(library_path("mtd_vs_metronomic"))
    skip = mtd.arm("weekly_with_skipping").policy
    assert skip.max_cumulative_dose == {"paclitaxel": 2500.0} and skip.policy.below == 1000.0
    with pytest.raises(InputError, match="Did you mean 'mtd_vs_metronomic'"):
        library_path("mtd_vs_metronomics")


def test_docs_examples_load_and_name_the_library(tmp_path):
    text = HOWTO.read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    full = [b for b in blocks if "[scenario]" in b]
    assert len(full) >= 2
    for i, b in enumerate(full):
        p = tmp_path / f"doc{i}.toml"
        p.write_text(b, encoding="utf-8")
        Scenario.from_toml(p)
    for path in LIBRARY_FILES:
        assert path.name in text, f"{path.name} is not described in {HOWTO.name}"
    p = tmp_path / "example.toml"
    p.write_text(SCENARIO_EXAMPLE, encoding="utf-8")
    Scenario.from_toml(p)


def test_from_dict_and_typed_construction():
    sc = Scenario.from_dict({
        "scenario": {"name": "x", "horizon": 84, "visits": [0, "4 weeks", 56]},
        "arm": [{"name": "a", "policy": {"rule": "hold when psa < 0.5 * baseline"}, "treat": "leuprolide 7.5 mg im every 4 weeks"}],
    })
    assert sc.visits == (0.0, 28.0, 56.0) and isinstance(sc.arms[0].policy, RulePolicy)
    assert sc.seed == 0 and sc.replicates == 1 and sc.outcomes == OutcomeSpec()
    typed = Scenario("x", (Arm("a", policy="zhang", treat="leuprolide 7.5 mg im every 4 weeks"),), horizon="12 weeks",
                     visits="every 4 weeks")
    assert typed.visits == (0.0, 28.0, 56.0, 84.0)
    with pytest.raises(InputError, match="not both"):
        Arm("a", protocol="leuprolide 7.5 mg im every 4 weeks", policy="zhang")
    with pytest.raises(InputError, match="unique"):
        Scenario("x", (Arm("a", protocol="rest for 1 week"), Arm("A", protocol="rest for 1 week")), 10, [0])


HEAD = '[scenario]\nname = "s"\nhorizon = "1 year"\nvisits = "every 4 weeks"\n'
ARM = '\n[[arm]]\nname = "a"\nprotocol = "leuprolide 7.5 mg im every 4 weeks"\n'

# (file text, key path, file line (None: not checked), words in the message)
BAD = {
    "unknown_key_suggestion": (HEAD.replace("horizon", "horizn") + 'horizon = 10\n' + ARM,
                               "scenario.horizn", 3, ["unknown key 'horizn'", "Did you mean 'horizon'"]),
    "unknown_arm_key": (HEAD + ARM + 'protocl = "x"\n', "arm[1].protocl", 9, ["Did you mean 'protocol'"]),
    "unknown_top_table": (HEAD + ARM + '\n[outcome]\ncriteria = ["recist_sld"]\n', "outcome", 10,
                          ["Did you mean 'outcomes'"]),
    "bad_horizon_unit": (HEAD.replace('"1 year"', '"2 parsecs"') + ARM, "scenario.horizon", 3,
                         ["unknown time unit 'parsecs'"]),
    "horizon_in_months": (HEAD.replace('"1 year"', '"6 months"') + ARM, "scenario.horizon", 3, ["months differ"]),
    "negative_horizon": (HEAD.replace('"1 year"', '-5') + ARM, "scenario.horizon", 3, [">= 0 days"]),
    "bad_protocol_column": (HEAD + ARM.replace("every 4 weeks", "evry 4 weeks"), "arm[1].protocol", 8,
                            ["protocol line 1, column 22", "unknown frequency 'evry'", "Valid examples:", ":8:34"]),
    "unknown_drug_in_protocol": (HEAD + ARM.replace("leuprolide", "leuprolid"), "arm[1].protocol", 8,
                                 ["unknown drug 'leuprolid'", "Did you mean 'leuprolide'"]),
    "multiline_protocol_error": (HEAD + '\n[[arm]]\nname = "a"\nprotocol = """\nrest for 2 weeks\nleuprolide 7.5 mg im every 4 wekks\n"""\n',
                                 "arm[1].protocol", 10, ["protocol line 2", ":10:"]),
    "unknown_policy": (HEAD + '\n[[arm]]\nname = "a"\npolicy = "zang"\ntreat = "leuprolide 7.5 mg im every 4 weeks"\n',
                       "arm[1].policy", 8, ["unknown policy 'zang'", "Did you mean 'zhang'"]),
    "unknown_policy_option": (HEAD + '\n[[arm]]\nname = "a"\npolicy = {name = "bruchovsky", stop_belw = 4}\ntreat = "leuprolide 7.5 mg im every 4 weeks"\n',
                              "arm[1].policy", 8, ["Did you mean 'stop_below'"]),
    "rule_syntax_error": (HEAD + '\n[[arm]]\nname = "a"\npolicy = {rule = "treat when psa >= baseline; hold psa < 0.5 * baseline"}\ntreat = "leuprolide 7.5 mg im every 4 weeks"\n',
                          "arm[1].policy.rule", 8, ["rule line 1, column 34", "unexpected 'psa'", "'when'"]),
    "rule_unknown_observable": (HEAD + '\n[[arm]]\nname = "a"\ntreat = "leuprolide 7.5 mg im every 4 weeks"\n[arm.policy]\nrule = "hold when pas < 4 ng/mL"\n',
                                "arm[1].policy.rule", 10, ["Did you mean 'psa'", ":10:19"]),
    "missing_arms": (HEAD, "arm", None, ["no arms"]),
    "arm_table_not_array": (HEAD + '\n[arm]\nname = "a"\nprotocol = "rest for 1 week"\n', "arm", 6, ["[[arm]]"]),
    "duplicate_arm_names": (HEAD + ARM + ARM.replace('"a"', '"A"'), "arm[2].name", 11,
                            ["arm name 'A' is already used by arm[1]"]),
    "bad_visits_text": (HEAD.replace('"every 4 weeks"', '"monthly"') + ARM, "scenario.visits", 4, ["'every <duration>'"]),
    "visits_not_increasing": (HEAD.replace('"every 4 weeks"', '[0, 56, 28]') + ARM, "scenario.visits", 4, ["strictly increasing", "56 then 28"]),
    "visits_not_from_zero": (HEAD.replace('"every 4 weeks"', '[28, 56]') + ARM, "scenario.visits", 4, ["first visit must be at day 0"]),
    "visit_after_horizon": (HEAD.replace('"every 4 weeks"', '[0, "2 years"]') + ARM, "scenario.visits", 4, ["after the horizon"]),
    "protocol_and_policy": (HEAD + ARM + 'policy = "zhang"\ntreat = "leuprolide 7.5 mg im every 4 weeks"\n', "arm[1]", 6, ["not both"]),
    "policy_without_treat": (HEAD + '\n[[arm]]\nname = "a"\npolicy = "zhang"\n', "arm[1].policy", 8, ["needs treat"]),
    "treat_with_switch": (HEAD + '\n[[arm]]\nname = "a"\npolicy = "zhang"\ntreat = "dabrafenib 150 mg oral BID until progression then switch to trametinib 2 mg oral daily"\n',
                          "arm[1].treat", 9, ["must not switch"]),
    "limits_on_protocol_arm": (HEAD + ARM + 'limits = {max_duration = "1 year"}\n', "arm[1].limits", 9, ['policy = "continuous"']),
    "unknown_limit": (HEAD + '\n[[arm]]\nname = "a"\npolicy = "zhang"\ntreat = "leuprolide 7.5 mg im every 4 weeks"\nlimits = {min_holliday = "4 weeks"}\n',
                      "arm[1].limits", 10, ["Did you mean 'min_holiday'"]),
    "unknown_criterion": (HEAD + ARM + '\n[outcomes]\ncriteria = ["recist_sdl"]\n', "outcomes.criteria", 11, ["Did you mean 'recist_sld'"]),
    "bad_resistance_threshold": (HEAD + ARM + '\n[outcomes]\nresistance_threshold = 1.5\n', "outcomes.resistance_threshold", 11, ["between 0 and 1"]),
    "switch_without_criterion": (HEAD + '\n[[arm]]\nname = "a"\nprotocol = "dabrafenib 150 mg oral BID until progression then switch to trametinib 2 mg oral daily"\n',
                                 "arm[1].protocol", 8, ["switches at progression", "criteria"]),
    "bad_seed": (HEAD + 'seed = -1\n' + ARM, "scenario.seed", 5, ["whole number >= 0"]),
    "bad_mutation_rate": (HEAD + 'mutation_rate = 2.0\n' + ARM, "scenario.mutation_rate", 5, ["in [0, 1]"]),
    "invalid_toml": (HEAD + ARM + 'name = "b"\n', "", 9, ["not valid TOML"]),
    "missing_scenario_table": (ARM, "scenario", None, ["missing [scenario] table"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scenario_file_is_located(tmp_path, case):
    text, key, line, words = BAD[case]
    path = tmp_path / f"{case}.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError) as e:
        Scenario.from_toml(path)
    err = e.value
    msg = str(err)
    assert str(path) in msg
    keys = [p.key for p in err.problems]
    assert key in keys, f"{case}: key {key!r} not among {keys}\n{msg}"
    prob = err.problems[keys.index(key)]
    if line is not None:
        assert prob.line == line, f"{case}: line {prob.line} != {line}\n{msg}"
    for w in words:
        assert w in msg, f"{case}: {w!r} not in\n{msg}"
    assert "A valid scenario file looks like:" in msg


def test_every_problem_is_reported_at_once(tmp_path):
    text = HEAD.replace('"1 year"', '"1 eon"') + ARM.replace("leuprolide", "leuprolid") + ARM + '\n[outcomes]\ncriteria = ["psa"]\n'
    path = tmp_path / "many.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScenarioError) as e:
        Scenario.from_toml(path)
    keys = [p.key for p in e.value.problems]
    assert {"scenario.horizon", "arm[1].protocol", "arm[2].name", "outcomes.criteria"} <= set(keys)
    assert "4 problem(s)" in str(e.value) or f"{len(keys)} problem(s)" in str(e.value)


def test_missing_file_and_dict_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        Scenario.from_toml(tmp_path / "nope.toml")
    with pytest.raises(ScenarioError, match=r"<dict>.*\[scenario.horizon\]: missing horizon"):
        Scenario.from_dict({"scenario": {"name": "x", "visits": [0]}, "arm": [{"name": "a", "protocol": "rest for 1 week"}]})


def test_mutation_rate_key(tmp_path):
    path = tmp_path / "mu.toml"
    path.write_text(HEAD + "replicates = 50\nmutation_rate = 1e-9\n" + ARM, encoding="utf-8")
    sc = Scenario.from_toml(path)
    assert sc.mutation_rate == 1e-9 and sc.replicates == 50
    assert Scenario.from_toml(LIBRARY / "mtd_vs_metronomic.toml").mutation_rate == 1e-7
    with pytest.raises(InputError, match="mutation_rate"):
        Scenario(name="x", arms=(Arm("a", protocol="rest for 1 week"),), horizon=7, visits=[0], mutation_rate=-1)
