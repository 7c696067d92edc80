"""Array namespaces for the ONE definition of the twin's vector field.

:meth:`twin.model.TwinModel.equations` is written elementwise against a namespace ``xp``
that offers a handful of primitives (``exp``, ``log``, ``sigmoid``, ``where``, ...). The same
code then runs

- with :data:`NUMPY` on arrays of any batch shape (reference values, tests);
- with :func:`torch_namespace` on float64 tensors of shape ``(B,)`` (``twin.simulate``,
  training of the neural residual with autograd);
- with :func:`pytensor_namespace` on symbolic PyTensor scalars, from which
  ``calibration`` derives exact Jacobians and generates compiled code.

Only elementwise operations are allowed: no reductions, no indexing into arrays, so that
the symbolic route sees scalar graphs. ``xp.mlp`` evaluates a :class:`~twin.residual.NeuralResidual`
(as a torch module under torch, unrolled into scalar sums with fixed weights otherwise).
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = ["NUMPY", "torch_namespace", "pytensor_namespace"]

LN10 = math.log(10.0)


def _mlp_weights(residual):
    """(weights, biases) of the residual's linear layers as numpy float64 (cached per module)."""
    import torch

    lin = [m for m in residual.net if isinstance(m, torch.nn.Linear)]
    return [(m.weight.detach().cpu().numpy().astype(np.float64), m.bias.detach().cpu().numpy().astype(np.float64)) for m in lin]


def _unrolled_mlp(xp, residual, feats):
    """eps_max * tanh(MLP(feats)) with scalar sums (numpy arrays or symbolic scalars)."""
    layers = _mlp_weights(residual)
    h = list(feats)
    for k, (W, b) in enumerate(layers):
        out = []
        for i in range(W.shape[0]):
            acc = float(b[i])
            for j in range(W.shape[1]):
                wij = float(W[i, j])
                if wij != 0.0:
                    acc = acc + wij * h[j]
            out.append(acc)
        if k < len(layers) - 1:
            act = residual.activation
            if act == "tanh":
                out = [xp.tanh(v) for v in out]
            elif act == "softplus":
                out = [xp.maximum(v, 0.0) + xp.log(1.0 + xp.exp(-xp.abs(v))) for v in out]
            else:  # silu
                out = [v * xp.sigmoid(v) for v in out]
        h = out
    return residual.eps_max * xp.tanh(h[0])


class _NumpyXP:
    name = "numpy"
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    sqrt = staticmethod(np.sqrt)
    abs = staticmethod(np.abs)
    tanh = staticmethod(np.tanh)
    maximum = staticmethod(np.maximum)
    minimum = staticmethod(np.minimum)

    @staticmethod
    def where(c, a, b):
        return np.where(c, a, b)

    @staticmethod
    def sigmoid(x):
        x = np.asarray(x, dtype=np.float64)
        e = np.exp(-np.abs(x))
        return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    @staticmethod
    def zeros_like(x):
        return np.zeros_like(np.asarray(x, dtype=np.float64))

    def mlp(self, residual, feats):
        return _unrolled_mlp(self, residual, feats)


class _TorchXP:
    name = "torch"

    def __init__(self):
        import torch

        self.torch = torch
        self.exp, self.log, self.sqrt, self.abs = torch.exp, torch.log, torch.sqrt, torch.abs
        self.tanh, self.sigmoid = torch.tanh, torch.sigmoid

    def _t(self, x):
        t = self.torch
        return x if isinstance(x, t.Tensor) else t.as_tensor(x, dtype=t.float64)

    def maximum(self, a, b):
        t = self.torch
        if isinstance(a, t.Tensor) and not isinstance(b, t.Tensor):
            return t.clamp_min(a, float(b))
        if isinstance(b, t.Tensor) and not isinstance(a, t.Tensor):
            return t.clamp_min(b, float(a))
        return t.maximum(self._t(a), self._t(b))

    def minimum(self, a, b):
        t = self.torch
        if isinstance(a, t.Tensor) and not isinstance(b, t.Tensor):
            return t.clamp_max(a, float(b))
        if isinstance(b, t.Tensor) and not isinstance(a, t.Tensor):
            return t.clamp_max(b, float(a))
        return t.minimum(self._t(a), self._t(b))

    def where(self, c, a, b):
        return self.torch.where(self._t(c), self._t(a), self._t(b))

    def zeros_like(self, x):
        return self.torch.zeros_like(self._t(x))

    def mlp(self, residual, feats):
        t = self.torch
        B = max((f.shape[0] for f in feats if isinstance(f, t.Tensor) and f.ndim), default=1)
        u = t.stack([f.expand(B) if isinstance(f, t.Tensor) else t.full((B,), float(f), dtype=t.float64) for f in feats], dim=-1)
        return residual.eps_max * t.tanh(residual.net(u)[:, 0])


class _PytensorXP:
    name = "pytensor"

    def __init__(self):
        import pytensor.tensor as pt

        self.pt = pt
        self.exp, self.log, self.sqrt, self.abs = pt.exp, pt.log, pt.sqrt, pt.abs
        self.tanh, self.sigmoid = pt.tanh, pt.sigmoid
        self.maximum, self.minimum = pt.maximum, pt.minimum

    def where(self, c, a, b):
        return self.pt.where(c, a, b)

    def zeros_like(self, x):
        return self.pt.zeros_like(x)

    def mlp(self, residual, feats):
        return _unrolled_mlp(self, residual, feats)


NUMPY = _NumpyXP()


@functools.lru_cache(maxsize=None)
def torch_namespace() -> _TorchXP:
    """The torch namespace (imports torch on first use)."""
    return _TorchXP()


@functools.lru_cache(maxsize=None)
def pytensor_namespace() -> _PytensorXP:
    """The PyTensor namespace (imports pytensor on first use)."""
    return _PytensorXP()
