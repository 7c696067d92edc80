"""scenarios: treatment protocols and what-if scenarios on top of :mod:`twin`.

:mod:`scenarios.protocol` holds the treatment protocol language: typed steps
(:class:`Dose`, :class:`Rest`, :class:`Combination`, :class:`Sequence`, :class:`Switch`,
:class:`DoseReduction`) collected in a :class:`Protocol`, readable strings parsed into the
same steps (``Protocol.parse("docetaxel 75 mg/m2 iv over 1 hour every 3 weeks for 6 cycles")``),
and :meth:`Protocol.expand` into a :class:`twin.Regimen` for one patient.
See ``docs/how-to/write-a-protocol.md``.

:mod:`scenarios.outcomes` computes outcomes on a scenario result (time to progression by
RECIST 1.1 / PCWG3, time to and probability of resistance, burden AUC, doses);
:mod:`scenarios.compare` compares arms, runs virtual-trial Kaplan–Meier curves and checks a
twin against observed data; :mod:`scenarios.plots` draws them (matplotlib imported only there).
See ``docs/outcomes.md``.
"""

from . import compare, outcomes
from .policy import HOLD, TREAT, Bruchovsky, Continuous, DoseSkipping, Limited, Policy, PolicyState, RuleError, RulePolicy, Zhang, make_policy
from .scenario import LIBRARY, Arm, OutcomeSpec, Scenario, ScenarioError, library_path, policy_doses
from .run import PriorTwin, load_result, model_for_scenario, prior_twin, run_scenario, save_result
from .report import write_report
from .compare import compare_arms, predictive_check, prob_beats, virtual_trial
from .outcomes import check_result, standard_outcomes, summarize, time_to_progression, time_to_resistance

from .protocol import (
    CONDITIONS,
    EXAMPLES,
    Combination,
    Dose,
    DoseReduction,
    Expansion,
    Protocol,
    ProtocolError,
    Rest,
    Sequence,
    Switch,
    parse_step,
)

__all__ = [
    "PriorTwin",
    "load_result",
    "model_for_scenario",
    "prior_twin",
    "run_scenario",
    "save_result",
    "write_report",
    "HOLD",
    "LIBRARY",
    "TREAT",
    "Arm",
    "Bruchovsky",
    "Continuous",
    "DoseSkipping",
    "Limited",
    "OutcomeSpec",
    "Policy",
    "PolicyState",
    "RuleError",
    "RulePolicy",
    "Scenario",
    "ScenarioError",
    "Zhang",
    "library_path",
    "make_policy",
    "policy_doses",
    "check_result",
    "compare",
    "compare_arms",
    "outcomes",
    "predictive_check",
    "prob_beats",
    "standard_outcomes",
    "summarize",
    "time_to_progression",
    "time_to_resistance",
    "virtual_trial",
    "CONDITIONS",
    "EXAMPLES",
    "Combination",
    "Dose",
    "DoseReduction",
    "Expansion",
    "Protocol",
    "ProtocolError",
    "Rest",
    "Sequence",
    "Switch",
    "parse_step",
]
