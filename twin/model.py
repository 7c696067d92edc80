"""`TwinModel`: the default patient twin (pathway layer + tumour compartments + observables).

A :class:`TwinModel` is a *declaration*: named states, named parameters with units,
transforms and default priors, and one vector field written once in torch (float64),
batched over a leading batch dimension. It holds no solver state; integration happens
only in :func:`twin.simulate.simulate`. The equations are documented in ``docs/model.md``.

>>> from twin.graph import load_pathway
>>> m = TwinModel.from_graph(load_pathway("mapk_pi3k"), drugs=["dabrafenib", "trametinib"])
>>> m.state_names[-1]
'N_S'

torch is imported inside the methods that need it, so importing this module is light.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .errors import InputError, close_matches

__all__ = ["TwinModel", "Mechanism", "X_REF", "CELL_VOLUME_MM3", "PSA_CELL_SCALE"]

#: reference activity: with all inputs at X_REF, capacity 0.5 and basal 0, a node sits at X_REF.
X_REF = 0.25
#: tumour volume per cell [mm3/cell] (1e9 cells ~ 1 cm3 = 1000 mm3).
CELL_VOLUME_MM3 = 1e-6
#: PSA production is given per 1e9 cells.
PSA_CELL_SCALE = 1e9
#: offset of the capacity logit: cap = sigmoid(logcap); logcap = 0 -> cap = 0.5.
_GROWTH = ("logistic", "gompertz")
_LN10 = math.log(10.0)


def _mean_scaled(values):
    """sum(values) / (len * X_REF): the mean activity of phenotype nodes relative to X_REF."""
    acc = values[0]
    for v in values[1:]:
        acc = acc + v
    return acc / (len(values) * X_REF)


def _ident(name: str) -> str:
    s = re.sub(r"[^0-9a-zA-Z_]", "_", str(name)).strip("_")
    if not s or s[0].isdigit():
        s = "m_" + s
    return s


@dataclass(frozen=True)
class Mechanism:
    """A resistance mechanism: a resistant clone whose inhibition by ``drugs`` is blunted."""

    name: str
    drugs: tuple[str, ...]
    reference: str = ""


def _mechanism(spec) -> Mechanism:
    if isinstance(spec, Mechanism):
        return spec
    if isinstance(spec, str):
        from .omics import rules

        hits = [r for r in rules().get("resistance", []) if r["mechanism"] == spec]
        if not hits:
            known = sorted({r["mechanism"] for r in rules().get("resistance", [])})
            raise InputError(
                f"TwinModel: unknown resistance mechanism {spec!r}; expected one of {known} "
                f"or a (name, [drugs]) pair.{close_matches(spec, known)}"
            )
        drugs = sorted({d for r in hits for d in r["drugs"]})
        return Mechanism(spec, tuple(drugs), "; ".join(r.get("reference", "") for r in hits))
    if isinstance(spec, Mapping):
        return Mechanism(str(spec["name"]), tuple(spec.get("drugs", ())), spec.get("reference", ""))
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return Mechanism(str(spec[0]), tuple(spec[1]))
    raise InputError(f"TwinModel: a mechanism must be a name, a (name, [drugs]) pair or a Mechanism; received {spec!r}")


@dataclass(frozen=True)
class _Param:
    name: str
    default: float
    unit: str
    transform: str  # "log", "logit" or "identity" (the unconstrained scale)
    bounds: tuple[float, float]
    prior: tuple[str, dict]
    description: str


def _lognormal(median: float, sigma: float) -> tuple[str, dict]:
    return ("lognormal", {"mu": math.log(median), "sigma": float(sigma)})


#: Priors of the cell kinetics of tumours growing in patients: human solid tumours double in
#: months (volume doubling times mostly 50-500 days; Friberg & Mattson 1997 J Surg Oncol 65:284),
#: xenografts in days (the model's defaults, r_max 0.1/day, d_max 0.07/day). Medians 0.02 and
#: 0.015/day (net 0.005/day, doubling ~140 days), one log-unit wide. Decision D20.
HUMAN_KINETICS = {"r_max": _lognormal(0.02, 1.0), "d_max": _lognormal(0.015, 1.0)}


@dataclass(frozen=True, eq=False)
class TwinModel:
    """The default twin: signalling graph, drugs, tumour clones and observation functions.

    Build with :meth:`from_graph`. Attributes are plain data (no solver state).
    """

    graph: Any
    drugs: tuple[str, ...]
    mechanisms: tuple[Mechanism, ...]
    growth: str = "logistic"
    persisters: bool = False
    pathway: bool = True
    drug_pk: dict = field(default_factory=dict)
    _params: tuple = ()
    _nodes: tuple = ()
    #: optional :class:`~twin.residual.NeuralResidual` (``None``: the mechanistic model exactly);
    #: set with :meth:`with_residual`, removed with :meth:`without_residual`.
    residual: Any = None
    #: drug effects act through effect compartments ``E_<drug>`` (hysteresis; Sheiner et al.
    #: 1979): dE/dt = k (I - E), k = ``ke_on`` while I > E, ``ke_off`` otherwise.
    effect_delay: tuple = ()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_graph(
        cls,
        graph,
        *,
        drugs: Sequence[str] = (),
        mechanisms: Iterable = (),
        growth: str = "logistic",
        persisters: bool = False,
        pathway: bool = True,
        drug_params: Mapping[str, Any] | None = None,
        effect_delay: bool | Sequence[str] = False,
    ) -> "TwinModel":
        """Compose a model.

        Parameters
        ----------
        graph : :class:`~twin.graph.PathwayGraph` (may be ``None`` with ``pathway=False``).
        drugs : drug names (catalogue names); each drug is either *targeted* (it has
            targets among the graph's nodes: multiplicative inhibition of those nodes) or
            *cytotoxic* (no target in the graph: direct kill with an Emax term).
        mechanisms : resistance mechanisms, each a name of ``twin/data/omics_rules.toml``
            (e.g. ``"mek_mutation"``), a ``(name, [drugs])`` pair or a :class:`Mechanism`;
            one resistant clone each.
        growth : ``"logistic"`` or ``"gompertz"`` (shared carrying capacity ``K``).
        persisters : add a drug-tolerant persister compartment ``P``.
        pathway : ``False`` gives the reduced model without pathway states (proliferation
            and death at their reference rates; targeted drugs inhibit proliferation).
        drug_params : drug -> ``(PKParams, Potency)`` overriding the catalogue's PK.
        effect_delay : ``True`` (every drug) or a list of drugs acting through effect
            compartments ``E_<drug>`` (one state per such drug, 0 at the start): dE/dt = k (I - E) with the onset rate ``ke_on`` while the
            target inhibition I exceeds E and the offset rate ``ke_off`` otherwise; the cells
            (and PSA production) see E instead of I. Models delayed onset and slow recovery of
            the drug effect, e.g. testosterone recovery over months after a GnRH-agonist depot
            ends (``docs/model.md``, "Effect compartments").
        """
        from .drugs import lookup_drug

        if growth not in _GROWTH:
            raise InputError(f"TwinModel: growth must be one of {list(_GROWTH)}, received {growth!r}")
        if pathway and graph is None:
            raise InputError("TwinModel: a pathway graph is required unless pathway=False")
        drugs = tuple(dict.fromkeys(str(d).lower() for d in drugs))
        drug_params = {str(k).lower(): v for k, v in dict(drug_params or {}).items()}
        pkd = {}
        for d in drugs:
            if d in drug_params:
                pkd[d] = tuple(drug_params[d])
                continue
            cat = lookup_drug(d)
            if cat is None or cat.pk is None or cat.pk.potency() is None:
                raise InputError(
                    f"TwinModel: drug {d!r} has no PK/potency in twin's catalogue; fix: pass "
                    f"drug_params={{{d!r}: (PKParams(...), Potency(...))}}"
                )
            pkd[d] = (cat.pk.params(), cat.pk.potency())
        mechs = tuple(_mechanism(m) for m in mechanisms)
        names = [_ident(m.name) for m in mechs]
        if len(set(names)) != len(names):
            raise InputError(f"TwinModel: mechanism names must be unique, received {names}")
        nodes = tuple(graph.nodes) if (pathway and graph is not None) else ()
        if effect_delay is True:
            delayed = drugs
        elif not effect_delay:
            delayed = ()
        else:
            delayed = tuple(dict.fromkeys(str(d).lower() for d in ([effect_delay] if isinstance(effect_delay, str) else effect_delay)))
            bad = [d for d in delayed if d not in drugs]
            if bad:
                raise InputError(f"TwinModel: effect_delay names {bad}, which are not among the model's drugs {list(drugs)}; "
                                 f"fix: give True (every drug) or a subset of drugs")
            delayed = tuple(d for d in drugs if d in delayed)  # the model's drug order
        self = cls(graph, drugs, mechs, growth, bool(persisters), bool(pathway), pkd, (), nodes, None, delayed)
        object.__setattr__(self, "_params", tuple(self._build_params()))
        return self

    # ------------------------------------------------------------------ specification, files
    def spec(self) -> dict:
        """The model as plain, JSON-serialisable data: the graph (its JSON document), drugs
        with the PK/potency values actually used, mechanisms, growth, persisters, pathway.
        :meth:`from_spec` rebuilds an identical model (the neural residual is saved beside
        it by :meth:`save`)."""
        import dataclasses

        def num(v):
            return None if v is None else float(v)

        return {
            "format": "twin-model",
            "version": 1,
            "graph": self.graph.to_dict() if self.graph is not None else None,
            "drugs": list(self.drugs),
            "drug_pk": {
                d: {"pk": {k: num(getattr(pk, k)) for k in ("cl", "v", "q", "v2", "ka", "f")}, "potency": {k: num(getattr(pot, k)) for k in ("ic50", "hill", "imax")}}
                for d, (pk, pot) in self.drug_pk.items()
            },
            "mechanisms": [dataclasses.asdict(m) | {"drugs": list(m.drugs)} for m in self.mechanisms],
            "growth": self.growth,
            "persisters": self.persisters,
            "pathway": self.pathway,
            "effect_delay": list(self.effect_delay),
        }

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> "TwinModel":
        """Rebuild a model from :meth:`spec` output (e.g. read from a twin file)."""
        from .graph import graph_from_dict
        from .pk import Potency, PKParams

        if spec.get("format") != "twin-model" or spec.get("version") != 1:
            raise InputError(f"not a twin model specification (format {spec.get('format')!r}, version {spec.get('version')!r}); expected format 'twin-model', version 1")
        graph = graph_from_dict(spec["graph"], source="model specification") if spec.get("graph") else None
        drug_params = {d: (PKParams(**v["pk"]), Potency(**v["potency"])) for d, v in spec.get("drug_pk", {}).items()}
        mechs = [Mechanism(m["name"], tuple(m["drugs"]), m.get("reference", "")) for m in spec.get("mechanisms", [])]
        return cls.from_graph(graph, drugs=spec["drugs"], mechanisms=mechs, growth=spec["growth"], persisters=spec["persisters"], pathway=spec["pathway"], drug_params=drug_params,
                               effect_delay=list(spec.get("effect_delay") or []))

    def save(self, path) -> "Path":
        """Write ``path`` (JSON specification) and, with a neural residual, its weights beside
        it (``<stem>.residual.pt`` + ``.json``, see :meth:`NeuralResidual.save`). Atomic."""
        import json
        from pathlib import Path

        from ._atomic import atomic_write_text

        path = Path(path)
        spec = self.spec()
        if self.residual is not None:
            res_base = path.with_name(path.stem + ".residual")
            self.residual.save(res_base)
            spec["residual"] = res_base.name
        atomic_write_text(path, json.dumps(spec, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "TwinModel":
        """Read a model written by :meth:`save` (and its residual, if one was saved)."""
        import json
        from pathlib import Path

        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"{path}: cannot read the model specification ({exc}); expected a JSON file written by TwinModel.save") from None
        model = cls.from_spec(spec)
        if spec.get("residual"):
            from .residual import NeuralResidual

            name = Path(spec["residual"]).name  # never follow a path out of the folder
            model = model.with_residual(NeuralResidual.load(path.with_name(name)))
        return model

    # ------------------------------------------------------------------ neural residual
    def with_residual(self, residual) -> "TwinModel":
        """A copy of this model whose vector field adds the bounded neural term
        ``eps(t) N_c`` to dN_c/dt of every signalling clone (``twin/residual.py``,
        ``docs/model.md`` "Neural residual"). ``None`` gives :meth:`without_residual`."""
        import dataclasses

        if residual is None:
            return self.without_residual()
        index = residual.bind(self)  # validates nodes, drugs and dtype
        new = dataclasses.replace(self, residual=residual)
        object.__setattr__(new, "_residual_index", index)
        return new

    def with_drugs(self, drugs) -> "TwinModel":
        """This model plus ``drugs`` (catalogue names; same graph, growth, mechanisms and
        residual). Returns ``self`` when every drug is already known. What applied to *every*
        drug of this model applies to the new ones too: effect compartments when all drugs had
        one, and a resistance mechanism that blunted all drugs blunts the new ones (parameters
        keep their names, so posterior draws carry over)."""
        import dataclasses

        extra = [str(d).lower() for d in drugs if str(d).lower() not in self.drugs]
        if not extra:
            return self
        everything = set(self.drugs)
        delayed = list(self.effect_delay) + (extra if self.drugs and set(self.effect_delay) == everything else [])
        mechs = [dataclasses.replace(m, drugs=tuple(m.drugs) + tuple(extra)) if self.drugs and {d.lower() for d in m.drugs} >= everything else m
                 for m in self.mechanisms]
        new = TwinModel.from_graph(self.graph, drugs=list(self.drugs) + extra, mechanisms=mechs, growth=self.growth,
                                   persisters=self.persisters, pathway=self.pathway, drug_params=self.drug_pk,
                                   effect_delay=delayed)
        return new.with_residual(self.residual) if self.residual is not None else new

    def without_residual(self) -> "TwinModel":
        """The mechanistic model (this model without its neural residual)."""
        import dataclasses

        return self if self.residual is None else dataclasses.replace(self, residual=None)

    # ------------------------------------------------------------------ structure
    @property
    def nodes(self) -> tuple[str, ...]:
        return self._nodes

    @property
    def clones(self) -> tuple[str, ...]:
        """Signalling clones (each with its own pathway state): ``S`` and ``R_<mechanism>``."""
        return ("S",) + tuple(f"R_{_ident(m.name)}" for m in self.mechanisms)

    @property
    def compartments(self) -> tuple[str, ...]:
        """Cell-number compartments: the clones, then ``P`` when persisters are on."""
        return self.clones + (("P",) if self.persisters else ())

    def targets(self, drug: str) -> list[str]:
        if not self.pathway or self.graph is None:
            from .drugs import lookup_drug

            return ["<targeted>"] if (lookup_drug(drug) is None or "chemotherapy" not in lookup_drug(drug).drug_class) else []
        return [t for t in self.graph.targets_of(drug) if t in self._nodes]

    @property
    def targeted_drugs(self) -> tuple[str, ...]:
        return tuple(d for d in self.drugs if self.targets(d))

    @property
    def cytotoxic_drugs(self) -> tuple[str, ...]:
        return tuple(d for d in self.drugs if not self.targets(d))

    @property
    def psa_node(self) -> str | None:
        if self.graph is None:
            return None
        cache = self.__dict__.get("_psa_node", False)
        if cache is False:
            cache = self.graph.biomarkers().get("psa")
            object.__setattr__(self, "_psa_node", cache)
        return cache

    @property
    def has_psa(self) -> bool:
        return self.psa_node is not None

    @property
    def state_names(self) -> tuple[str, ...]:
        """``x_<clone>_<node>`` (pathway activities), ``N_<compartment>`` [cells], ``E_<drug>``
        (effect compartments, with ``effect_delay``), ``psa``."""
        xs = tuple(f"x_{c}_{n}" for c in self.clones for n in self._nodes)
        ns = tuple(f"N_{c}" for c in self.compartments)
        es = tuple(f"E_{_ident(d)}" for d in self.effect_delay)
        return xs + ns + es + (("psa",) if self.has_psa else ())

    @property
    def state_units(self) -> dict[str, str]:
        u = {}
        for s in self.state_names:
            u[s] = "1" if s.startswith(("x_", "E_")) else ("cells" if s.startswith("N_") else "ng/mL")
        return u

    @property
    def observable_names(self) -> tuple[str, ...]:
        return ("tumor_volume", "sld", "total_cells") + (("psa",) if self.has_psa else ())

    @property
    def observable_units(self) -> dict[str, str]:
        return {"tumor_volume": "mm3", "sld": "mm", "total_cells": "cells", "psa": "ng/mL"}

    # ------------------------------------------------------------------ parameters
    def _build_params(self) -> list[_Param]:
        P = []
        add = P.append
        add(_Param("r_max", 0.1, "1/day", "log", (1e-6, 10.0), _lognormal(0.1, 0.7), "proliferation rate at reference proliferation activity"))
        add(_Param("d_max", 0.07, "1/day", "log", (1e-6, 10.0), _lognormal(0.07, 0.7), "death rate at reference death activity"))
        add(_Param("K", 1e12, "cells", "log", (1e3, 1e15), _lognormal(1e12, 1.0), "shared carrying capacity"))
        add(_Param("N0", 1e9, "cells", "log", (1.0, 1e14), _lognormal(1e9, 1.5), "initial total tumour cells"))
        if self.pathway:
            add(_Param("tau", 0.1, "day", "log", (1e-4, 10.0), _lognormal(0.1, 0.5), "pathway relaxation time (all nodes)"))
            add(_Param("w", 1.5, "1", "log", (1e-3, 50.0), _lognormal(1.5, 0.3), "edge weight scale (times the graph's edge weight), per unit of normalised activity x/X_REF"))
        for m in self.mechanisms:
            k = _ident(m.name)
            add(_Param(f"frac_{k}", 1e-4, "1", "logit", (1e-12, 0.999), _lognormal(1e-4, 1.5 * math.log(10)), f"initial fraction of the {m.name} resistant clone"))
            add(_Param(f"blunt_{k}", 0.9, "1", "logit", (0.0, 1.0), ("beta", {"alpha": 9.0, "beta": 1.0}), f"fraction of inhibition by {', '.join(m.drugs) or 'its drugs'} lost in the {m.name} clone"))
        if self.persisters:
            add(_Param("alpha_p", 0.05, "1/day", "log", (0.0, 10.0), _lognormal(0.05, 1.0), "S -> P switching rate per unit total inhibition"))
            add(_Param("beta_p", 0.02, "1/day", "log", (0.0, 10.0), _lognormal(0.02, 1.0), "P -> S reversion rate"))
            add(_Param("r_p", 0.005, "1/day", "log", (0.0, 1.0), _lognormal(0.005, 1.0), "persister net growth rate (times the capacity factor)"))
        for d in self.cytotoxic_drugs:
            add(_Param(f"kill_{_ident(d)}", 0.3, "1/day", "log", (0.0, 100.0), _lognormal(0.3, 1.0), f"maximal kill rate of {d} (Emax, EC50 = the drug's IC50)"))
        if self.effect_delay:
            add(_Param("ke_on", 0.1, "1/day", "log", (1e-4, 100.0), _lognormal(0.1, 1.0), "onset rate of the drug effect (effect compartment, while the inhibition exceeds it)"))
            add(_Param("ke_off", 0.02, "1/day", "log", (1e-4, 100.0), _lognormal(0.02, 1.0), "offset (recovery) rate of the drug effect after exposure falls"))
        if self.has_psa:
            add(_Param("psa_prod", 2.5, "ng/mL/day per 1e9 cells", "log", (0.0, 1e6), _lognormal(2.5, 1.5), "PSA production at reference PSA-node activity"))
            add(_Param("psa_clear", 0.25, "1/day", "log", (1e-3, 10.0), _lognormal(0.25, 0.3), "PSA clearance rate (half-life ~2.8 days)"))
        for n in self._nodes:
            add(_Param(f"basal_{n}", 0.0, "logit", "identity", (-math.inf, math.inf), ("normal", {"mu": 0.0, "sigma": 1.0}), f"basal activity (logit) of {n}"))
            add(_Param(f"logcap_{n}", 0.0, "logit", "identity", (-math.inf, math.inf), ("normal", {"mu": 0.0, "sigma": 0.5}), f"capacity (logit; cap = sigmoid) of {n}"))
        return P

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self._params)

    def _p(self, name: str) -> _Param:
        for p in self._params:
            if p.name == name:
                return p
        raise InputError(f"TwinModel: unknown parameter {name!r}.{close_matches(name, list(self.parameter_names))}")

    @property
    def parameter_units(self) -> dict[str, str]:
        return {p.name: p.unit for p in self._params}

    @property
    def transforms(self) -> dict[str, str]:
        """Unconstrained scale of each parameter: ``log``, ``logit`` or ``identity``."""
        return {p.name: p.transform for p in self._params}

    @property
    def bounds(self) -> dict[str, tuple[float, float]]:
        return {p.name: p.bounds for p in self._params}

    def describe(self) -> dict[str, str]:
        return {p.name: p.description for p in self._params}

    def default_values(self) -> dict[str, float]:
        """Typical values (the prior medians) of every parameter."""
        return {p.name: p.default for p in self._params}

    def free_parameter_names(self, omics_priors=None) -> tuple[str, ...]:
        """A modest set to calibrate: global and clone parameters, plus basal/capacity of the
        nodes that are drug targets or carry an omics effect. The others keep their defaults."""
        keep_nodes = set()
        for d in self.targeted_drugs:
            keep_nodes.update(self.targets(d))
        if omics_priors is not None:
            t = omics_priors.node_table()
            keep_nodes.update(t["node"].tolist() if len(t) else [])
        out = []
        for p in self._params:
            if p.name.startswith(("basal_", "logcap_")):
                if p.name.split("_", 1)[1] not in keep_nodes:
                    continue
            out.append(p.name)
        return tuple(out)

    def default_priors(self, omics_priors=None) -> dict[str, tuple[str, dict]]:
        """name -> (distribution, params), plain data. Distributions: ``normal(mu, sigma)``,
        ``lognormal(mu, sigma)`` (of the log), ``beta(alpha, beta)``.

        With ``omics_priors`` (:class:`~twin.omics.OmicsPriors`): node ``basal_logit`` shifts
        move ``basal_<node>``, ``log_capacity`` shifts move ``logcap_<node>`` (means add,
        variances add), and resistance priors set ``frac_<mechanism>``.
        """
        pri = {p.name: (p.prior[0], dict(p.prior[1])) for p in self._params}
        if omics_priors is None:
            return pri
        t = omics_priors.node_table()
        for _, row in t.iterrows() if len(t) else ():
            key = {"basal_logit": "basal_", "log_capacity": "logcap_"}.get(row["quantity"])
            name = f"{key}{row['node']}" if key else None
            if name in pri:
                dist, par = pri[name]
                pri[name] = ("normal", {"mu": par["mu"] + float(row["mean"]), "sigma": math.sqrt(par["sigma"] ** 2 + float(row["sd"]) ** 2)})
        by_mech = {_ident(r.mechanism): r for r in omics_priors.resistance}
        generic = next((r for r in omics_priors.resistance if r.alpha is None), None)
        for m in self.mechanisms:
            k = _ident(m.name)
            r = by_mech.get(k, generic)
            if r is None:
                continue
            if r.alpha is not None:
                pri[f"frac_{k}"] = ("beta", {"alpha": float(r.alpha), "beta": float(r.beta)})
            else:
                pri[f"frac_{k}"] = ("lognormal", {"mu": r.log10_mean * math.log(10), "sigma": r.log10_sd * math.log(10)})
        return pri

    def priors_for(self, patient) -> dict[str, tuple[str, dict]]:
        """Default priors shifted by the patient's omics; for a tumour growing in a patient
        (covariate ``species = "human"``) the proliferation and death rates get the human
        kinetics priors :data:`HUMAN_KINETICS` (the defaults describe xenografts)."""
        from .omics import omics_priors

        pri = self.default_priors(omics_priors(patient.omics, self.graph))
        if str(getattr(getattr(patient, "covariates", None), "species", "human")).lower() == "human":
            pri.update({k: (v[0], dict(v[1])) for k, v in HUMAN_KINETICS.items() if k in pri})
        return pri

    # ------------------------------------------------------------------ the one definition
    def _structure(self) -> dict:
        """Plain-Python structure of the equations (cached per model): each node's inputs
        ``[(source index, signed edge weight)]``, the targeted drugs hitting each node, the
        phenotype nodes, the drugs blunted in each clone, the PSA node's index."""
        cache = self.__dict__.get("_struct")
        if cache is not None:
            return cache
        idx = {n: i for i, n in enumerate(self._nodes)}
        inputs = [[] for _ in self._nodes]
        if self.pathway:
            for n in self._nodes:
                for s, sign in self.graph.inputs(n):
                    e = self.graph.edge(s, n)
                    inputs[idx[n]].append((idx[s], float(sign * (e.weight if e.weight is not None else 1.0))))
        hit = [[] for _ in self._nodes]
        targeted = [self.drugs.index(d) for d in self.targeted_drugs]
        if self.pathway:
            for j in targeted:
                for n in self.targets(self.drugs[j]):
                    if n in idx:
                        hit[idx[n]].append(j)
        blunted = [frozenset()] + [
            frozenset(j for j, d in enumerate(self.drugs) if d in {x.lower() for x in m.drugs}) for m in self.mechanisms
        ]
        prol = [idx[n] for n in (self.graph.phenotype_nodes("proliferation") if self.pathway else []) if n in idx]
        death = [idx[n] for n in (self.graph.phenotype_nodes("death") if self.pathway else []) if n in idx]
        cache = {
            "inputs": inputs, "hit": hit, "targeted": targeted, "cyto": [self.drugs.index(d) for d in self.cytotoxic_drugs],
            "blunted": blunted, "prol": prol, "death": death,
            "psa": idx.get(self.psa_node) if (self.has_psa and self.pathway) else None,
            "delayed": [self.drugs.index(d) for d in self.effect_delay],
        }
        object.__setattr__(self, "_struct", cache)
        return cache

    def _pathway_f(self, xc, p, inhc, xp):
        """Target activities f_n of one clone's nodes (elementwise): ``sigmoid(logcap_n) *
        sigmoid(basal_n + w * sum_s W_ns (x_s / X_REF - 1)) * prod_{d hits n} (1 - I_cd)``."""
        st = self._structure()
        out = []
        rel = {}
        for n, name in enumerate(self._nodes):
            acc = None
            for s, wt in st["inputs"][n]:
                if s not in rel:
                    rel[s] = xc[s] / X_REF - 1.0
                acc = wt * rel[s] if acc is None else acc + wt * rel[s]
            z = p[f"basal_{name}"] if acc is None else p[f"basal_{name}"] + p["w"] * acc
            f = xp.sigmoid(p[f"logcap_{name}"]) * xp.sigmoid(z)
            for j in st["hit"][n]:
                f = f * (1.0 - inhc[j])
            out.append(f)
        return out

    def _terms(self, y, p, u, xp) -> dict:
        """Pieces of the cell dynamics (elementwise; y, u sequences of states and drug
        inhibitions I_d in [0, 1]; p name -> value): per clone c the inhibition ``inh[c][d]``
        (blunted by the clone's mechanism), pathway activities ``x[c]``, proliferation
        ``prol[c]`` and death ``death[c]`` phenotypes, direct kill ``kill[c]`` [1/day]; the
        growth factor ``g`` (logistic 1 - N/K or Gompertz log(K/N)), ``cells`` and ``Ntot``."""
        st = self._structure()
        C, N = len(self.clones), len(self._nodes)
        nd = len(self.drugs)
        if self.effect_delay:  # the cells see the effect compartments of the delayed drugs
            off = C * N + len(self.compartments)
            u = list(u[:nd])
            for i, j in enumerate(st["delayed"]):
                u[j] = y[off + i]
        inh = []
        for c in range(C):
            if c == 0:
                inh.append(list(u[:nd]))
            else:
                b = p[f"blunt_{_ident(self.mechanisms[c - 1].name)}"]
                inh.append([u[j] * (1.0 - b) if j in st["blunted"][c] else u[j] for j in range(nd)])
        x = [list(y[c * N:(c + 1) * N]) for c in range(C)] if self.pathway else None
        prol, death = [], []
        for c in range(C):
            if self.pathway:
                pr = _mean_scaled([x[c][i] for i in st["prol"]]) if st["prol"] else 1.0
                de = _mean_scaled([x[c][i] for i in st["death"]]) if st["death"] else 1.0
            else:
                pr = 1.0
                for j in st["targeted"]:
                    pr = pr * (1.0 - inh[c][j])
                de = 1.0
            prol.append(pr)
            death.append(de)
        cells = list(y[C * N: C * N + len(self.compartments)])
        Ntot = cells[0]
        for v in cells[1:]:
            Ntot = Ntot + v
        K = p["K"]
        g = 1.0 - Ntot / K if self.growth == "logistic" else xp.log(K / xp.maximum(Ntot, 1e-300))
        kill = []
        for c in range(C):
            k = 0.0
            for j in st["cyto"]:
                k = k + p[f"kill_{_ident(self.drugs[j])}"] * inh[c][j]
            kill.append(k)
        return {"inh": inh, "x": x, "prol": prol, "death": death, "cells": cells, "Ntot": Ntot, "g": g, "kill": kill}

    def equations(self, t, y, p: Mapping[str, Any], u, xp) -> list:
        """THE vector field of the twin, written once, elementwise (``docs/model.md``).

        ``y`` : sequence of the ``n_states`` states (:attr:`state_names` order); ``p`` : name ->
        value of every parameter; ``u`` : sequence of the drugs' target inhibitions
        ``I_d(t)`` in [0, 1] (:attr:`drugs` order, from analytic PK); ``xp`` : an array
        namespace of :mod:`twin._xp` (numpy, torch or PyTensor). Returns ``dy/dt`` as a list.

        ``twin.simulate`` evaluates it with torch tensors (:meth:`vector_field`);
        ``calibration`` evaluates it on symbolic scalars to derive exact Jacobians and
        compiled code. ``t`` is unused (the model is autonomous given the exposure).
        """
        st = self._structure()
        C, N = len(self.clones), len(self._nodes)
        nd = len(self.drugs)
        tm = self._terms(y, p, u, xp)
        out = []
        if self.pathway:
            for c in range(C):
                f = self._pathway_f(tm["x"][c], p, tm["inh"][c], xp)
                out += [(f[n] - tm["x"][c][n]) / p["tau"] for n in range(N)]
        cells, g = tm["cells"], tm["g"]
        dN = [(p["r_max"] * tm["prol"][c] * g - p["d_max"] * tm["death"][c] - tm["kill"][c]) * cells[c] for c in range(C)]
        if self.residual is not None:  # neural residual: + eps N_c on every signalling clone
            node_idx, drug_idx = self._residual_binding()
            feats = [y[i] / X_REF - 1.0 for i in node_idx]
            feats.append((xp.log(xp.maximum(tm["Ntot"], 1.0)) / _LN10 - self.residual.burden_center) / self.residual.burden_scale)
            feats += [u[j] for j in drug_idx]
            eps = xp.mlp(self.residual, feats)
            dN = [d + eps * cells[c] for c, d in enumerate(dN)]
        if self.persisters:
            P = cells[C]
            keep = 1.0
            for j in range(nd):
                keep = keep * (1.0 - u[j])
            flow = p["alpha_p"] * (1.0 - keep) * cells[0] - p["beta_p"] * P
            dN[0] = dN[0] - flow
            dN.append(flow + p["r_p"] * g * P)
        out += dN
        if self.effect_delay:
            off = C * N + len(self.compartments)
            for i, j in enumerate(st["delayed"]):
                e = y[off + i]
                out.append(xp.where(u[j] > e, p["ke_on"], p["ke_off"]) * (u[j] - e))
        if self.has_psa:
            prod = 0.0
            for c in range(C):
                act = tm["x"][c][st["psa"]] / X_REF if self.pathway else tm["prol"][c]
                prod = prod + act * cells[c]
            if self.persisters:
                prod = prod + cells[C]
            out.append(p["psa_prod"] * prod / PSA_CELL_SCALE - p["psa_clear"] * y[-1])
        return out

    def _residual_binding(self):
        index = self.__dict__.get("_residual_index")
        if index is None:  # e.g. after dataclasses.replace: bind once
            index = self.residual.bind(self)
            object.__setattr__(self, "_residual_index", index)
        return index

    # ------------------------------------------------------------------ torch evaluation
    def parameter_tensors(self, params: Mapping[str, Any], batch: int | None = None, *, stacked: bool = False) -> dict:
        """Complete a parameter dict with defaults, as float64 torch tensors of shape (B,).
        Unknown names raise (with close matches). (``stacked`` is accepted for backward
        compatibility and ignored.)"""
        import torch

        names = set(self.parameter_names)
        bad = [k for k in params if k not in names and not k.startswith("_")]
        if bad:
            raise InputError(f"TwinModel: unknown parameter(s) {bad}.{close_matches(bad[0], list(names))}")
        out = {}
        B = batch
        for k, v in params.items():
            if k.startswith("_"):
                continue
            tv = v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v, dtype=np.float64))
            out[k] = tv.to(torch.float64)
            if tv.ndim:
                B = tv.shape[0] if B is None else B
        B = 1 if B is None else B
        for k, v in list(out.items()):
            if v.ndim == 0:
                out[k] = v.expand(B)
        for p in self._params:
            if p.name not in out:
                out[p.name] = torch.full((B,), float(p.default), dtype=torch.float64)
        return out

    def _columns(self, y, exposure):
        import torch

        y = torch.as_tensor(y, dtype=torch.float64)
        B = y.shape[0]
        nd = len(self.drugs)
        if exposure is None or nd == 0:
            u = [torch.zeros(B, dtype=torch.float64)] * nd
        else:
            u = list(torch.as_tensor(exposure, dtype=torch.float64).unbind(-1))
        return y, list(y.unbind(-1)), u

    @staticmethod
    def _stack(values, B):
        import torch

        cols = [v if isinstance(v, torch.Tensor) and v.ndim == 1 else torch.full((B,), float(v), dtype=torch.float64) if not isinstance(v, torch.Tensor) else v.expand(B) for v in values]
        return torch.stack(cols, dim=-1)

    def clone_rates(self, y, params: Mapping[str, Any], exposure=None):
        """Per-cell division and loss rates [1/day] of every signalling clone, (B, C) each.

        division = r_max x proliferation x max(g, 0); loss = d_max x death + direct kill
        + r_max x proliferation x max(-g, 0) (crowding beyond the carrying capacity acts as
        loss). ``division - loss`` is the clone's net per-capita growth without the neural
        residual and the persister exchange. Used to drive stochastic resistance emergence
        (:func:`twin.resistance.acquired_resistance`). Accepts numpy or torch inputs.
        """
        import torch

        from ._xp import torch_namespace

        y, ys, u = self._columns(y, exposure)
        B = y.shape[0]
        p = self.parameter_tensors(params, batch=B)
        with torch.no_grad():
            tm = self._terms(ys, p, u, torch_namespace())
            g = tm["g"]
            div, loss = [], []
            for c in range(len(self.clones)):
                base = p["r_max"] * tm["prol"][c]
                div.append(base * g.clamp_min(0.0))
                loss.append(p["d_max"] * tm["death"][c] + tm["kill"][c] + base * (-g).clamp_min(0.0))
        return self._stack(div, B), self._stack(loss, B)

    def vector_field(self, t, y, params: Mapping[str, Any], exposure):
        """dy/dt, batched: y (B, n_states), params name -> (B,), exposure (B, n_drugs) =
        target inhibition I_d(t) in [0, 1] of each drug of ``self.drugs`` (from analytic PK).

        :meth:`equations` evaluated on torch columns (float64; differentiable with respect to
        ``y``, ``params`` and the residual's weights).
        """
        from ._xp import torch_namespace

        y, ys, u = self._columns(y, exposure)
        return self._stack(self.equations(t, ys, params, u, torch_namespace()), y.shape[0])

    def initial_state_values(self, p: Mapping[str, Any], xp, *, x=None) -> list:
        """y0 elementwise (the reduced model, or with the pathway activities ``x[c][n]`` given):
        cells ``N0`` split into the resistant fractions, no persisters, PSA at the steady state
        of its untreated production/clearance. Used by :meth:`initial_state` and calibration."""
        st = self._structure()
        C = len(self.clones)
        out = []
        if self.pathway:
            if x is None:
                raise InputError("initial_state_values: a pathway model needs its pathway activities x")
            for c in range(C):
                out += list(x[c])
        fr = [p[f"frac_{_ident(m.name)}"] for m in self.mechanisms]
        total = p["N0"]
        s = total
        for f in fr:
            s = s - total * f
        cells = [s] + [total * f for f in fr]
        out += cells
        if self.persisters:
            out.append(xp.zeros_like(total) if not isinstance(total, float) else 0.0)
        if self.effect_delay:
            out += [xp.zeros_like(total) if not isinstance(total, float) else 0.0 for _ in self.effect_delay]
        if self.has_psa:
            prod = 0.0
            for c in range(C):
                act = x[c][st["psa"]] / X_REF if self.pathway else 1.0
                prod = prod + act * cells[c]
            out.append(p["psa_prod"] * prod / PSA_CELL_SCALE / p["psa_clear"])
        return out

    def initial_state(self, params: Mapping[str, Any], *, iterations: int = 400):
        """y0 (B, n_states): pathway at its untreated quasi-steady state (damped fixed-point
        iteration, at most ``iterations`` steps x += (f(x) - x) / 2, stopped when
        converged to 1e-15), cells N0 split into resistant fractions, no persisters, PSA at the
        steady state of its production/clearance."""
        import torch

        from ._xp import torch_namespace

        xp = torch_namespace()
        p = self.parameter_tensors(params)
        B = p["r_max"].shape[0]
        C, N = len(self.clones), len(self._nodes)
        x = None
        if self.pathway:
            nd = len(self.drugs)
            zero = torch.zeros(B, dtype=torch.float64)
            inh = [[zero] * nd for _ in range(C)]
            x = [[torch.full((B,), X_REF, dtype=torch.float64) for _ in range(N)] for _ in range(C)]
            with torch.no_grad():
                for _ in range(iterations):
                    dmax = 0.0
                    for c in range(C):
                        f = self._pathway_f(x[c], p, inh[c], xp)
                        dx = [0.5 * (f[n] - x[c][n]) for n in range(N)]
                        x[c] = [x[c][n] + dx[n] for n in range(N)]
                        dmax = max(dmax, float(torch.stack(dx).abs().max()))
                    if dmax < 1e-15:
                        break
        return self._stack(self.initial_state_values(p, xp, x=x), B)

    # ------------------------------------------------------------------ observables
    def observe(self, y) -> dict:
        """Observables from states (..., n_states) numpy: tumor_volume [mm3] = cells x
        1e-6 mm3/cell, sld [mm] (sphere-equivalent diameter, :mod:`twin.observation`),
        total_cells [cells], psa [ng/mL] (the PSA state)."""
        y = np.asarray(y)
        C, N = len(self.clones), len(self._nodes)
        cells = y[..., C * N: C * N + len(self.compartments)].sum(-1)
        from .observation import observe_from_cells

        out = {"tumor_volume": cells * CELL_VOLUME_MM3, "sld": observe_from_cells(cells, "sld"), "total_cells": cells}
        if self.has_psa:
            out["psa"] = y[..., -1]
        return out

    def __repr__(self) -> str:
        return (f"TwinModel(graph={getattr(self.graph, 'name', None)!r}, drugs={list(self.drugs)}, "
                f"mechanisms={[m.name for m in self.mechanisms]}, growth={self.growth!r}, "
                f"persisters={self.persisters}, pathway={self.pathway}, states={len(self.state_names)}, "
                f"parameters={len(self.parameter_names)}"
                + (f", residual={self.residual.extra_repr()!r}" if self.residual is not None else "") + ")")
