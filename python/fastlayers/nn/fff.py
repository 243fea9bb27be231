# SPDX-License-Identifier: Apache-2.0
"""Fast feedforward modules: drop-in replacements for a transformer MLP (``in -> out``).

* :class:`UltraFastFeedForward`: UltraFastBERT's tree of single neurons; a token visits
  ``depth + 1`` of the ``2^(depth+1) - 1`` neurons, in training and inference alike (the kernel runs
  both ways).
* :class:`FastFeedForward`: the FFF paper's tree of node neurons over ``2^depth`` leaf
  feedforwards; training mixes every leaf (soft routing), inference descends to one leaf per token.

Tie rule (a logit of exactly 0 goes left) and layouts: :mod:`fastlayers.reference.fff`.
"""

from __future__ import annotations

import math

import torch

from fastlayers import _ext, ops
from fastlayers._dtypes import FLOATING
from fastlayers.ops._common import (
    check_module_input,
    check_positive_ints,
    check_tensor,
    no_dispatch_modes,
)
from fastlayers.ops.fff import HardInferPlan, UltraInferPlan, fff_hard_infer, ultrafast_ff_infer
from fastlayers.reference import fff as ref
from fastlayers.reference.fff import ACTIVATIONS


def _weights_key(tensors, activation: str) -> tuple:
    """What an inference plan was validated for: each weight's data pointer, dtype and shape (None
    for an absent one), and the activation. A change to any of them builds a new plan (in-place
    changes need none: the kernels read the weights themselves)."""
    return (
        *(None if t is None else (t.data_ptr(), t.dtype, t.shape) for t in tensors),
        activation,
    )


def _kernel_dtype(x: torch.Tensor, module: str, weight: torch.Tensor) -> bool:
    """The kernels take fp32/fp16/bf16; a float64 module runs the reference (warned once)."""
    check_tensor(x, "x")
    if x.dtype in FLOATING or not x.is_floating_point():
        return True  # non-floating input: the op raises its TypeError
    if weight.dtype != x.dtype:
        raise TypeError(f"x must have the module's dtype {weight.dtype}, got {x.dtype}")
    _ext.warn_once(
        f"{module}-{x.dtype}",
        f"fastlayers.{module}: no kernel for {x.dtype}; running the PyTorch reference",
    )
    return False


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def _check_depth(depth, max_depth: int) -> None:
    if not isinstance(depth, int) or isinstance(depth, bool) or not 0 <= depth <= max_depth:
        raise ValueError(f"depth must be an int in [0, {max_depth}], got {depth!r}")


def _check_probability(name: str, v) -> None:
    if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v!r}")


def _leaf_histogram(leaf: torch.Tensor, n_leaves: int) -> torch.Tensor:
    return torch.bincount(leaf.reshape(-1).long(), minlength=n_leaves)


class UltraFastFeedForward(torch.nn.Module):
    """UltraFastBERT feedforward: ``y = sum over the visited neurons of act(w_in[n].x + b_in[n]) *
    w_out[n]``, descending ``node -> 2 node + 1 + (logit > 0)`` for ``depth + 1`` levels.

    Parameters ``w_in [n, in]``, ``w_out [n, out]`` (row per neuron: ``w_out`` is the transpose of
    an ``nn.Linear(n, out)`` weight) and, with ``bias=True``, ``b_in [n]``. Gradients reach only the
    visited rows (the hard path is not differentiable), as in UltraFastBERT's training code.
    Initialisation: ``w_in``, ``b_in`` uniform in ``±1/sqrt(in)``; ``w_out`` uniform in
    ``±1/sqrt(depth + 1)`` (a token sums ``depth + 1`` rows).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int,
        activation: str = "gelu",
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_ints(in_features=in_features, out_features=out_features)
        _check_depth(depth, 30)
        _check_activation(activation)
        self.in_features, self.out_features, self.depth = in_features, out_features, depth
        self.activation = activation
        n = 2 ** (depth + 1) - 1
        kw = {"device": device, "dtype": dtype}
        self.w_in = torch.nn.Parameter(torch.empty(n, in_features, **kw))
        self.w_out = torch.nn.Parameter(torch.empty(n, out_features, **kw))
        self.b_in = torch.nn.Parameter(torch.empty(n, **kw)) if bias else None
        self._infer_plan: UltraInferPlan | None = None  # validated weights for inference calls
        self.reset_parameters()

    @property
    def n_nodes(self) -> int:
        return self.w_in.shape[0]

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        torch.nn.init.uniform_(self.w_in, -bound, bound)
        if self.b_in is not None:
            torch.nn.init.uniform_(self.b_in, -bound, bound)
        out_bound = 1.0 / math.sqrt(self.depth + 1)
        torch.nn.init.uniform_(self.w_out, -out_bound, out_bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and no_dispatch_modes():  # inference: the lean CPU route
            params = self._parameters  # the dict itself: attribute lookups cost ~1 us each
            w_in, w_out, b_in = params["w_in"], params["w_out"], params.get("b_in")
            # _weights_key's fields, written out: half the cost of the generic form (~1 us of a
            # ~10 us batch-1 call)
            key = (
                w_in.data_ptr(), w_in.dtype, w_in.shape, w_out.data_ptr(), w_out.dtype,
                w_out.shape, None if b_in is None else (b_in.data_ptr(), b_in.dtype, b_in.shape),
                self.activation,
            )  # fmt: skip
            plan = self._infer_plan
            if plan is None or plan.key != key:
                plan = self._infer_plan = UltraInferPlan(key, w_in, b_in, w_out, self.activation)
            y = ultrafast_ff_infer(x, plan)
            if y is not None:  # same values as the op's route below
                return y
        return self.forward_with_path(x)[0]

    def forward_with_path(self, x: torch.Tensor):
        """``(y, path [..., depth+1] int32, preact [..., depth+1] float32)``."""
        if not _kernel_dtype(x, "UltraFastFeedForward", self.w_in):
            return ref.ultrafast_ff(x, self.w_in, self.w_out, self.b_in, self.activation)
        return ops.ultrafast_ff(x, self.w_in, self.w_out, self.b_in, self.activation)

    @torch.no_grad()
    def leaf_usage(self, x: torch.Tensor) -> torch.Tensor:
        """How many tokens of ``x`` end at each of the ``2^depth`` last-level neurons (int64)."""
        path = self.forward_with_path(x)[1]
        first = 2**self.depth - 1
        return _leaf_histogram(path[..., -1] - first, 2**self.depth)

    @classmethod
    def from_ultrafastbert(
        cls, linear_in: torch.nn.Linear, linear_out: torch.nn.Linear, activation: str = "gelu"
    ) -> UltraFastFeedForward:
        """From UltraFastBERT's training layers: ``linear_in = nn.Linear(in, n)`` (its bias becomes
        ``b_in``) and ``linear_out = nn.Linear(n, out, bias=False)``."""
        n, d_in = linear_in.weight.shape
        depth = ref.tree_depth(n, "linear_in.weight")
        if linear_out.weight.shape[1] != n:
            raise ValueError(
                f"linear_out must take {n} inputs (linear_in's outputs), "
                f"got {linear_out.weight.shape[1]}"
            )
        if linear_out.bias is not None:
            raise ValueError("linear_out must have no bias (UltraFastBERT's output layer has none)")
        w = linear_in.weight
        m = cls(
            d_in,
            linear_out.weight.shape[0],
            depth,
            activation,
            bias=linear_in.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            m.w_in.copy_(w)
            m.w_out.copy_(linear_out.weight.t())
            if linear_in.bias is not None:
                m.b_in.copy_(linear_in.bias)
        return m

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"depth={self.depth}, activation={self.activation!r}, bias={self.b_in is not None}"
        )


class FastFeedForward(torch.nn.Module):
    """Fast feedforward network (Belcak & Wattenhofer), with the optional master leaf and load
    balancing of Charalampopoulos et al.

    ``2^depth - 1`` node neurons (``node_weight [N, in]``, ``node_bias [N]``) route each token to
    one of ``2^depth`` leaves; leaf ``j`` is
    ``act(x @ leaf_w1[j] + leaf_b1[j]) @ leaf_w2[j] + leaf_b2[j]`` (``leaf_w1 [L, in, width]``,
    ``leaf_w2 [L, width, out]``). With ``master_leaf=True`` an always-on leaf (``master_w1``, ...)
    is added to the output.

    * ``train()``: the soft mixture (every leaf weighted by the product of the node probabilities
      along its path), with region leak (each decision flipped with probability ``region_leak``)
      and dropout on the leaf hidden units. After a training forward, :meth:`hardening_loss` and
      :meth:`load_balancing_loss` return the auxiliary losses to add to the objective.
    * ``eval()``: hard descent, one leaf per token (the kernel). It equals the training form with
      hard decisions and no leak or dropout.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int,
        leaf_width: int,
        activation: str = "gelu",
        dropout: float = 0.0,
        region_leak: float = 0.0,
        master_leaf: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_ints(
            in_features=in_features, out_features=out_features, leaf_width=leaf_width
        )
        _check_depth(depth, 20)
        _check_activation(activation)
        _check_probability("dropout", dropout)
        _check_probability("region_leak", region_leak)
        if dropout == 1.0:
            raise ValueError("dropout must be < 1")
        self.in_features, self.out_features = in_features, out_features
        self.depth, self.leaf_width, self.activation = depth, leaf_width, activation
        self.dropout, self.region_leak = float(dropout), float(region_leak)
        n_nodes, n_leaves = 2**depth - 1, 2**depth
        kw = {"device": device, "dtype": dtype}
        self.node_weight = torch.nn.Parameter(torch.empty(n_nodes, in_features, **kw))
        self.node_bias = torch.nn.Parameter(torch.empty(n_nodes, **kw))
        self.leaf_w1 = torch.nn.Parameter(torch.empty(n_leaves, in_features, leaf_width, **kw))
        self.leaf_b1 = torch.nn.Parameter(torch.empty(n_leaves, leaf_width, **kw))
        self.leaf_w2 = torch.nn.Parameter(torch.empty(n_leaves, leaf_width, out_features, **kw))
        self.leaf_b2 = torch.nn.Parameter(torch.empty(n_leaves, out_features, **kw))
        self._infer_plan: HardInferPlan | None = None  # validated weights for inference calls
        if master_leaf:
            self.master_w1 = torch.nn.Parameter(torch.empty(in_features, leaf_width, **kw))
            self.master_b1 = torch.nn.Parameter(torch.empty(leaf_width, **kw))
            self.master_w2 = torch.nn.Parameter(torch.empty(leaf_width, out_features, **kw))
            self.master_b2 = torch.nn.Parameter(torch.empty(out_features, **kw))
        else:
            self.master_w1 = self.master_b1 = self.master_w2 = self.master_b2 = None
        self._node_p: torch.Tensor | None = None
        self._mixture: torch.Tensor | None = None
        self.reset_parameters()

    @property
    def n_leaves(self) -> int:
        return self.leaf_w1.shape[0]

    @property
    def master_leaf(self) -> bool:
        return self.master_w1 is not None

    def reset_parameters(self) -> None:
        """The ``fastfeedforward`` package's initialisation: uniform in ``±1/sqrt(in)`` for the
        nodes and the first leaf layer, ``±1/sqrt(leaf_width)`` for the second."""
        b_in, b_leaf = 1.0 / math.sqrt(self.in_features), 1.0 / math.sqrt(self.leaf_width)
        for t in (self.node_weight, self.node_bias, self.leaf_w1, self.leaf_b1, self.master_w1):
            if t is not None:
                torch.nn.init.uniform_(t, -b_in, b_in)
        if self.master_b1 is not None:
            torch.nn.init.uniform_(self.master_b1, -b_in, b_in)
        for t in (self.leaf_w2, self.leaf_b2, self.master_w2, self.master_b2):
            if t is not None:
                torch.nn.init.uniform_(t, -b_leaf, b_leaf)

    def _leaf_params(self):
        return (
            self.node_weight,
            self.node_bias,
            self.leaf_w1,
            self.leaf_b1,
            self.leaf_w2,
            self.leaf_b2,
        )

    _PARAM_NAMES = ("node_weight", "node_bias", "leaf_w1", "leaf_b1", "leaf_w2", "leaf_b2")

    def _infer(self, x: torch.Tensor):
        """Inference without autograd (CPU and CUDA): the lean route (weights validated once per
        change); None where it does not apply."""
        found = self._parameters
        params = tuple(found[n] for n in self._PARAM_NAMES)
        key = _weights_key(params, self.activation)
        plan = self._infer_plan
        if plan is None or plan.key != key:
            plan = self._infer_plan = HardInferPlan(key, params, self.activation)
        return fff_hard_infer(x, plan)

    def _hard(self, x: torch.Tensor):
        if not _kernel_dtype(x, "FastFeedForward", self.node_weight):
            return ref.fff_hard(x, *self._leaf_params(), self.activation)
        return ops.fff_hard(x, *self._leaf_params(), self.activation)

    def _master(self, x: torch.Tensor) -> torch.Tensor:
        act = ref.activation_fn(self.activation)
        h = act(x @ self.master_w1 + self.master_b1)
        if self.training and self.dropout > 0.0:
            h = torch.nn.functional.dropout(h, self.dropout)
        return h @ self.master_w2 + self.master_b2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            check_module_input(x, self.in_features, self.node_weight)
            y, self._node_p, self._mixture = ref.fff_soft(
                x,
                *self._leaf_params(),
                self.activation,
                region_leak=self.region_leak,
                dropout=self.dropout,
            )
        else:
            y = self._infer(x) if not torch.is_grad_enabled() and no_dispatch_modes() else None
            if y is None:
                y = self._hard(x)[0]
        if self.master_leaf:
            y = y + self._master(x)
        return y

    def __getstate__(self):
        """Copies and pickles leave out the last training forward's node probabilities and leaf
        mixture (part of that forward's autograd graph: ``copy.deepcopy`` refused the module,
        as for EMA weights or a model copy, after any training step); a copy's
        :meth:`hardening_loss` asks for a forward of its own."""
        state = self.__dict__.copy()
        state["_node_p"] = state["_mixture"] = None
        return state

    def _last(self, what: str) -> torch.Tensor:
        t = self._node_p if what == "node_p" else self._mixture
        if t is None:
            raise RuntimeError("run a forward pass in train() mode first")
        return t

    def hardening_loss(self) -> torch.Tensor:
        """Mean entropy of the node decisions of the last training forward (push them to 0 or 1)."""
        return ref.hardening_loss(self._last("node_p"))

    def load_balancing_loss(self) -> torch.Tensor:
        """Leaf usage of the last training forward against uniform (1 when balanced)."""
        return ref.load_balancing_loss(self._last("mixture"))

    @torch.no_grad()
    def leaf_usage(self, x: torch.Tensor) -> torch.Tensor:
        """How many tokens of ``x`` the hard descent sends to each leaf (int64, ``[2^depth]``)."""
        leaf = self._hard(x)[1]
        return _leaf_histogram(leaf, self.n_leaves)

    @classmethod
    def from_fastfeedforward(cls, m) -> FastFeedForward:
        """Exact conversion of a ``fastfeedforward.FFF`` (0.2.x). The output matches the package's
        hard-decision training path, leaf output bias included (its ``eval_forward`` drops that
        bias, a bug we do not copy). A node logit of exactly 0 goes left here, as in that path."""
        act = m.activation
        if isinstance(act, torch.nn.ReLU):
            name = "relu"
        elif isinstance(act, torch.nn.SiLU):
            name = "silu"
        elif isinstance(act, torch.nn.GELU):
            name = "gelu_tanh" if act.approximate == "tanh" else "gelu"
        else:
            raise ValueError(
                f"fastfeedforward.FFF activation {type(act).__name__} is not supported "
                f"(supported: ReLU, GELU, SiLU)"
            )
        if getattr(m, "train_hardened", False):
            raise ValueError("fastfeedforward.FFF(train_hardened=True) is not supported")
        w = m.node_weights
        out = cls(
            int(m.input_width),
            int(m.output_width),
            int(m.depth.item()),
            int(m.leaf_width),
            activation=name,
            dropout=float(m.dropout),
            region_leak=float(m.region_leak),
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            out.node_weight.copy_(m.node_weights)
            out.node_bias.copy_(m.node_biases.reshape(-1))
            out.leaf_w1.copy_(m.w1s)
            out.leaf_b1.copy_(m.b1s)
            out.leaf_w2.copy_(m.w2s)
            out.leaf_b2.copy_(m.b2s)
        out.train(m.training)
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"depth={self.depth}, leaf_width={self.leaf_width}, activation={self.activation!r}, "
            f"dropout={self.dropout}, region_leak={self.region_leak}, "
            f"master_leaf={self.master_leaf}"
        )
