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
        self = cls(graph, drugs, mechs, growth, bool(persisters), bool(pathway), pkd, (), nodes)
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
        return cls.from_graph(graph, drugs=spec["drugs"], mechanisms=mechs, growth=spec["growth"], persisters=spec["persisters"], pathway=spec["pathway"], drug_params=drug_params)

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
        if not self.pathway or self.graph is None:
            return None
        return self.graph.biomarkers().get("psa")

    @property
    def has_psa(self) -> bool:
        return self.psa_node is not None

    @property
    def state_names(self) -> tuple[str, ...]:
        """``x_<clone>_<node>`` (pathway activities), ``N_<compartment>`` [cells], ``psa``."""
        xs = tuple(f"x_{c}_{n}" for c in self.clones for n in self._nodes)
        ns = tuple(f"N_{c}" for c in self.compartments)
        return xs + ns + (("psa",) if self.has_psa else ())

    @property
    def state_units(self) -> dict[str, str]:
        u = {}
        for s in self.state_names:
            u[s] = "1" if s.startswith("x_") else ("cells" if s.startswith("N_") else "ng/mL")
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
        """Default priors shifted by the patient's omics."""
        from .omics import omics_priors

        return self.default_priors(omics_priors(patient.omics, self.graph))

    # ------------------------------------------------------------------ torch pieces
    def _tensors(self):
        """Constant structure tensors (cached per model)."""
        import torch

        cache = self.__dict__.get("_cache")
        if cache is not None:
            return cache
        N = len(self._nodes)
        idx = {n: i for i, n in enumerate(self._nodes)}
        W = np.zeros((N, N))
        src = np.ones(N, dtype=bool)
        if self.pathway:
            for n in self._nodes:
                for s, sign in self.graph.inputs(n):
                    e = self.graph.edge(s, n)
                    W[idx[n], idx[s]] = sign * (e.weight if e.weight is not None else 1.0)
                    src[idx[n]] = False
        td = self.targeted_drugs
        T = np.zeros((len(td), N))
        for k, d in enumerate(td):
            for n in self.targets(d):
                if n in idx:
                    T[k, idx[n]] = 1.0
        C = len(self.clones)
        # S[c, k]: does clone c keep the full inhibition of targeted drug k (1) or blunted (mech)
        M = np.zeros((C, len(self.drugs)))  # membership of drug in clone c's mechanism
        for c, m in enumerate(self.mechanisms, start=1):
            for j, d in enumerate(self.drugs):
                if d in {x.lower() for x in m.drugs}:
                    M[c, j] = 1.0
        def _avg(n, ids):
            a = np.zeros(n)
            if ids:
                a[ids] = 1.0 / (len(ids) * X_REF)
            return a

        prol = [idx[n] for n in (self.graph.phenotype_nodes("proliferation") if self.pathway else []) if n in idx]
        death = [idx[n] for n in (self.graph.phenotype_nodes("death") if self.pathway else []) if n in idx]
        t = lambda a: torch.as_tensor(a, dtype=torch.float64)
        cache = {
            "W": t(W), "WT": t(W.T.copy()), "T": t(T), "single_target": bool((T.sum(0) <= 1).all()),
            "prol_avg": t(_avg(N, prol)), "death_avg": t(_avg(N, death)), "M": t(M), "prol": prol, "death": death,
            "targeted": [self.drugs.index(d) for d in td], "cyto": [self.drugs.index(d) for d in self.cytotoxic_drugs],
            "psa": idx.get(self.psa_node) if self.has_psa else None,
        }
        object.__setattr__(self, "_cache", cache)
        return cache

    def parameter_tensors(self, params: Mapping[str, Any], batch: int | None = None, *, stacked: bool = False) -> dict:
        """Complete a parameter dict with defaults, as float64 torch tensors of shape (B,).
        Unknown names raise (with close matches). ``stacked`` adds ``_basal`` and ``_cap``
        (B, n_nodes), which the vector field then uses instead of stacking per call
        (do not use with gradients w.r.t. the per-node parameters)."""
        import torch

        names = set(self.parameter_names)
        bad = [k for k in params if k not in names and not k.startswith("_")]
        if bad:
            raise InputError(f"TwinModel: unknown parameter(s) {bad}.{close_matches(bad[0], list(names))}")
        out = {}
        B = batch
        for k, v in params.items():
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
        if stacked and self._nodes:
            out["_basal"] = torch.stack([out[f"basal_{n}"] for n in self._nodes], dim=-1)
            out["_cap"] = torch.sigmoid(torch.stack([out[f"logcap_{n}"] for n in self._nodes], dim=-1))
        return out

    def _clone_inhibition(self, params, exposure):
        """(B, C, n_drugs): inhibition seen by each signalling clone (blunted in R_k)."""
        import torch

        cache = self._tensors()
        B = exposure.shape[0]
        if not self.mechanisms:
            return exposure[:, None, :]
        blunt = torch.stack([torch.zeros(B, dtype=torch.float64)] + [params[f"blunt_{_ident(m.name)}"] for m in self.mechanisms], dim=-1)  # (B, C)
        return exposure[:, None, :] * (1.0 - blunt[:, :, None] * cache["M"][None, :, :])

    def _pathway_target(self, x, params, inh):
        """f(x): x (B, C, N), inh (B, C, n_drugs) -> (B, C, N)."""
        import torch

        cache = self._tensors()
        basal = params.get("_basal")
        if basal is None:
            basal = torch.stack([params[f"basal_{n}"] for n in self._nodes], dim=-1)  # (B, N)
        cap = params.get("_cap")
        if cap is None:
            cap = torch.sigmoid(torch.stack([params[f"logcap_{n}"] for n in self._nodes], dim=-1))
        B, C, N = x.shape
        u = torch.matmul((x / X_REF - 1.0).reshape(B * C, N), cache["WT"]).reshape(B, C, N)
        z = torch.addcmul(basal[:, None, :], params["w"][:, None, None], u)
        f = cap[:, None, :] * torch.sigmoid(z)
        tg = cache["targeted"]
        if not tg:
            return f
        if cache["single_target"]:  # each node hit by at most one drug: prod_d (1 - I_d T_di) = 1 - I @ T
            it = inh[:, :, tg] if len(tg) < inh.shape[-1] else inh
            return f * (1.0 - torch.matmul(it.reshape(B * C, len(tg)), cache["T"]).reshape(B, C, N))
        for k, j in enumerate(tg):
            f = f * (1.0 - inh[:, :, j:j + 1] * cache["T"][k][None, None, :])
        return f

    def _growth_terms(self, y, params, exposure):
        """Pieces of the cell dynamics shared by :meth:`vector_field` and :meth:`clone_rates`:
        pathway activities x (B, C, N) or None, proliferation and death phenotypes (B, C),
        the growth factor g (B,) (logistic 1 - N/K or Gompertz log(K/N)), the direct kill
        (B, C) and the per-clone inhibition (B, C, n_drugs)."""
        import torch

        cache = self._tensors()
        B = y.shape[0]
        C, N = len(self.clones), len(self._nodes)
        inh = self._clone_inhibition(params, exposure)  # (B, C, nd)
        x = None
        if self.pathway:
            x = y[:, : C * N].reshape(B, C, N)
            prol = torch.matmul(x, cache["prol_avg"]) if cache["prol"] else torch.ones((B, C), dtype=torch.float64)
            dth = torch.matmul(x, cache["death_avg"]) if cache["death"] else torch.ones((B, C), dtype=torch.float64)
        else:
            prol = torch.ones((B, C), dtype=torch.float64)
            for j in cache["targeted"]:
                prol = prol * (1.0 - inh[:, :, j])
            dth = torch.ones((B, C), dtype=torch.float64)
        Ntot = y[:, C * N: C * N + len(self.compartments)].sum(-1)
        K = params["K"]
        if self.growth == "logistic":
            g = 1.0 - Ntot / K
        else:
            g = torch.log(K / Ntot.clamp_min(1e-300))
        kill = torch.zeros((B, C), dtype=torch.float64)
        for j in cache["cyto"]:
            kill = kill + params[f"kill_{_ident(self.drugs[j])}"][:, None] * inh[:, :, j]
        return x, prol, dth, g, kill, inh

    def clone_rates(self, y, params: Mapping[str, Any], exposure=None):
        """Per-cell division and loss rates [1/day] of every signalling clone, (B, C) each.

        division = r_max x proliferation x max(g, 0); loss = d_max x death + direct kill
        + r_max x proliferation x max(-g, 0) (crowding beyond the carrying capacity acts as
        loss). ``division - loss`` is the clone's net per-capita growth without the neural
        residual and the persister exchange. Used to drive stochastic resistance emergence
        (:func:`twin.resistance.acquired_resistance`). Accepts numpy or torch inputs.
        """
        import torch

        y = torch.as_tensor(y, dtype=torch.float64)
        p = self.parameter_tensors(params, batch=y.shape[0])
        nd = len(self.drugs)
        exposure = torch.zeros((y.shape[0], nd), dtype=torch.float64) if exposure is None or nd == 0 else torch.as_tensor(exposure, dtype=torch.float64)
        with torch.no_grad():
            _, prol, dth, g, kill, _ = self._growth_terms(y, p, exposure)
            base = p["r_max"][:, None] * prol
            division = base * g.clamp_min(0.0)[:, None]
            loss = p["d_max"][:, None] * dth + kill + base * (-g).clamp_min(0.0)[:, None]
        return division, loss

    def vector_field(self, t, y, params: Mapping[str, Any], exposure):
        """dy/dt, batched: y (B, n_states), params name -> (B,), exposure (B, n_drugs) =
        target inhibition I_d(t) in [0, 1] of each drug of ``self.drugs`` (from analytic PK).

        ``t`` is unused (the model is autonomous given the exposure) but kept for the
        ODE-solver signature. float64 torch; differentiable with respect to ``y`` and ``params``.
        """
        import torch

        cache = self._tensors()
        B = y.shape[0]
        C, N = len(self.clones), len(self._nodes)
        nd = len(self.drugs)
        if exposure is None or nd == 0:
            exposure = torch.zeros((B, nd), dtype=torch.float64)
        x, prol, dth, g, kill, inh = self._growth_terms(y, params, exposure)
        parts = []
        if self.pathway:
            f = self._pathway_target(x, params, inh)
            parts.append(((f - x) / params["tau"][:, None, None]).reshape(B, C * N))
        off = C * N
        ncomp = len(self.compartments)
        cells = y[:, off: off + ncomp]
        Nc = cells[:, :C]
        Ntot = cells.sum(-1)
        dN = (params["r_max"][:, None] * prol * g[:, None] - params["d_max"][:, None] * dth - kill) * Nc
        if self.residual is not None:  # neural residual: + eps N_c on every signalling clone
            index = self.__dict__.get("_residual_index")
            if index is None:  # e.g. after dataclasses.replace: bind once
                index = self.residual.bind(self)
                object.__setattr__(self, "_residual_index", index)
            node_idx, drug_idx = index
            dN = dN + self.residual(y[:, node_idx], Ntot, exposure[:, drug_idx])[:, None] * Nc
        if self.persisters:
            P = cells[:, C]
            itot = 1.0 - torch.prod(1.0 - exposure, dim=-1) if nd else torch.zeros(B, dtype=torch.float64)
            flow = params["alpha_p"] * itot * Nc[:, 0] - params["beta_p"] * P
            dN = torch.cat([(dN[:, 0] - flow)[:, None], dN[:, 1:]], dim=-1)
            dP = flow + params["r_p"] * g * P
            parts.append(torch.cat([dN, dP[:, None]], dim=-1))
        else:
            parts.append(dN)
        if self.has_psa:
            xp = x[:, :, cache["psa"]] / X_REF  # (B, C)
            prod = (xp * Nc).sum(-1) + (cells[:, C] if self.persisters else 0.0)
            psa = y[:, -1]
            parts.append((params["psa_prod"] * prod / PSA_CELL_SCALE - params["psa_clear"] * psa)[:, None])
        return torch.cat(parts, dim=-1)

    def initial_state(self, params: Mapping[str, Any], *, iterations: int = 400):
        """y0 (B, n_states): pathway at its untreated quasi-steady state (damped fixed-point
        iteration, at most ``iterations`` steps x += (f(x) - x) / 2, stopped when
        converged to 1e-15), cells N0 split into resistant fractions, no persisters, PSA at the
        steady state of its production/clearance."""
        import torch

        p = self.parameter_tensors(params)
        B = p["r_max"].shape[0]
        C, N = len(self.clones), len(self._nodes)
        parts = []
        x = None
        if self.pathway:
            inh = torch.zeros((B, C, len(self.drugs)), dtype=torch.float64)
            x = torch.full((B, C, N), X_REF, dtype=torch.float64)
            with torch.no_grad():
                for _ in range(iterations):
                    dx = 0.5 * (self._pathway_target(x, p, inh) - x)
                    x = x + dx
                    if float(dx.abs().max()) < 1e-15:
                        break
            parts.append(x.reshape(B, C * N))
        fr = [p[f"frac_{_ident(m.name)}"] for m in self.mechanisms]
        total = p["N0"]
        rs = [total * f for f in fr]
        s = total * (1.0 - sum(fr)) if fr else total
        cells = [s] + rs + ([torch.zeros(B, dtype=torch.float64)] if self.persisters else [])
        cells = torch.stack(cells, dim=-1)
        parts.append(cells)
        if self.has_psa:
            cache = self._tensors()
            xp = x[:, :, cache["psa"]] / X_REF
            prod = (xp * cells[:, :C]).sum(-1)
            parts.append((p["psa_prod"] * prod / PSA_CELL_SCALE / p["psa_clear"])[:, None])
        return torch.cat(parts, dim=-1)

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
