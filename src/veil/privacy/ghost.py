"""A fast clipped sum for models made of Linear and Conv layers ("ghost" engine).

The DP-SGD step needs each example's gradient *norm* and the *sum* of the clipped
gradients, not the per-example gradients themselves. This engine gets both from one
forward and one backward pass ("book-keeping", Bu et al. 2023): forward hooks keep
each layer's input ``a``; the backward pass asks autograd only for the gradients
``g`` of the layers' outputs (so no parameter gradient is ever computed); and every
weight's per-example gradient is a product of the two. Written with ``T`` positions
per example (``T = 1`` for a Linear on ``(B, in)`` inputs, the sequence length for
a Linear on ``(B, T, in)``, the number of output pixels for a convolution, whose
input is unfolded into patches), example ``i``'s weight gradient is ``g_i^T a_i``, so

- for ``T = 1`` its squared norm is ``|g_i|^2 |a_i|^2`` (the "ghost norm"; ``|g_i|^2``
  also serves the bias), and the clipped sum is one matrix product ``(c * g)^T a``
  with the clip factors ``c``, added in place to the caller's buffer;
- for ``T > 1`` the engine picks, per layer, the cheaper of two exact ways (both
  also spend ``T * in * out`` per example on one product): the ghost norm
  ``sum((a_i a_i^T) * (g_i g_i^T))`` (``T^2 (in + out)`` more per example) or the
  per-example gradient itself (``in * out`` more, in time and memory), as Opacus's
  "mixed ghost" clipping does; the clipped sum is then a matrix product or a
  weighted sum of the per-example gradients.

A bias's per-example gradient is ``g_i`` summed over positions. No second backward
pass through the network is needed: the step costs a plain forward and backward pass
plus these products (``benchmarks/dpsgd.py`` measures it; per-example gradients of
convolutions are built a cache-sized chunk of examples at a time).

A parameter shared by several layers, or a layer that runs more than once in a
forward pass, gets the sum of all its uses: their positions are stacked, which is
exact because the per-example gradient is then ``sum_u g_u^T a_u``. Frozen
parameters (``requires_grad=False``) get nothing.

Limits: every trainable parameter must be the weight or bias of a ``Linear``,
``Conv1d``, ``Conv2d`` or ``Conv3d`` (groups 1, numeric padding, zero padding mode),
and the model may not use one of those parameters outside the layer's own call (a
check on the autograd graph catches that every step). :func:`unsupported_reason` says
why a model does not qualify; ``engine="auto"`` in the DP-SGD step then uses the
``torch.func`` engine (:mod:`veil.privacy.grad_sample`), which handles any model.
Both give the same clipped sum up to float rounding (tests hold them to it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.conv import _ConvNd

from veil.errors import PrivacyError
from veil.privacy.grad_sample import LossFn, check_model, trainable_parameters

__all__ = [
    "GhostClipper",
    "GhostUnsupportedError",
    "clipped_sum",
    "supports",
    "unsupported_reason",
]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Adds a weight's clipped sum to a buffer shaped like the weight, given the clip
# factors (B,): finish(factors, buffer).
_Finish = Callable[[torch.Tensor, torch.Tensor], None]


class GhostUnsupportedError(PrivacyError):
    """The ghost engine cannot handle this model; the functional engine can."""


@dataclass(frozen=True)
class _Call:
    """One call of a layer in the forward pass: its input and its output, and their
    version counters then (an in-place change later would make both stale)."""

    module: nn.Module
    a: torch.Tensor
    out: torch.Tensor
    versions: tuple[int, int]


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the ghost engine cannot handle ``model``, or ``None`` if it can."""
    roles: dict[int, tuple[str, str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if not isinstance(module, _LAYERS):
                return (
                    f"trainable parameter {name}.{pname} belongs to a "
                    f"{type(module).__name__}, not a Linear or Conv layer"
                )
            role = (f"{type(module).__name__}.{pname}", f"{name}.{pname}")
            if roles.setdefault(id(p), role)[0] != role[0]:
                return (
                    f"parameter {name}.{pname} is shared with {roles[id(p)][1]} in a "
                    "different role"
                )
        if isinstance(module, _ConvNd) and (
            module.groups != 1
            or module.padding_mode != "zeros"
            or isinstance(module.padding, str)
        ):
            return (
                f"{type(module).__name__} {name} uses groups, string padding or a "
                "padding mode"
            )
    return None


def supports(model: nn.Module) -> bool:
    """Whether :func:`clipped_sum` can handle ``model``."""
    return unsupported_reason(model) is None


def clipped_sum(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    clip: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: LossFn = F.cross_entropy,
    *,
    out: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Sum over the batch of each example's gradient times its clip factor.

    Args:
        model: a model :func:`supports` accepts; ``loss_fn`` must average over the
            batch, and no layer may mix examples.
        x: inputs, shape ``(B, ...)``, ``B >= 1``.
        y: targets, shape ``(B, ...)``.
        clip: maps the per-example gradient norms, shape ``(B,)``, to clip factors.
        loss_fn: batch-mean loss, default cross-entropy.
        out: if given, one contiguous tensor per trainable parameter name, shaped
            like the parameter; the clipped sums are added to them in place (the
            DP-SGD step passes its noise here) and they are returned. Default: new
            tensors.

    Returns:
        ``(sums, norms, loss_sum)``: the clipped sum per trainable parameter name
        (shaped like the parameter), the per-example gradient norms ``(B,)``, and the
        summed loss (a scalar tensor).

    Raises:
        GhostUnsupportedError: the model does not qualify (see the module docstring).
    """
    return GhostClipper(model).clipped_sum(x, y, clip, loss_fn, out=out)


class GhostClipper:
    """:func:`clipped_sum` for one model, with the model's checks done once.

    The DP-SGD step (:class:`~veil.privacy.NoisyGradientStep`) makes one when it
    is set up and calls it on each physical micro-batch of every step. Checked when
    made: the model qualifies (:func:`unsupported_reason`) and has no BatchNorm;
    checked on every call: the autograd graph (in-place changes, parameters used
    outside their layer).

    Args:
        model: the model; its set of trainable parameters and layers must not
            change while this object is in use.

    Raises:
        GhostUnsupportedError: the model does not qualify.
    """

    def __init__(self, model: nn.Module) -> None:
        check_model(model)
        reason = unsupported_reason(model)
        if reason is not None:
            raise GhostUnsupportedError(
                f"the ghost engine cannot handle this model ({reason}); use "
                "engine='functional'"
            )
        self.model = model
        self.params = trainable_parameters(model)
        self._names = {id(p): n for n, p in self.params.items()}
        self._layers = [
            m
            for m in model.modules()
            if isinstance(m, _LAYERS)
            and any(id(p) in self._names for p in m.parameters())
        ]

    def clipped_sum(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        clip: Callable[[torch.Tensor], torch.Tensor],
        loss_fn: LossFn = F.cross_entropy,
        *,
        out: dict[str, torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """:func:`clipped_sum` on this model."""
        total, calls = _forward(self.model, self._layers, x, y, loss_fn)
        _check_in_place(calls)
        _check_outside_uses(total, calls, self._names)
        out_grads = torch.autograd.grad(
            total, [c.out for c in calls], allow_unused=True
        )
        with torch.no_grad():
            weights, biases = _uses(calls, out_grads)

            # Per-example squared norms, parameter by parameter.
            sq = torch.zeros(len(x), dtype=_norm_dtype(out_grads))
            finishers = {pid: _weight_part(uses, sq) for pid, uses in weights.items()}
            rows = {pid: _bias_rows(uses, sq) for pid, uses in biases.items()}
            norms = sq.sqrt_()
            factors = clip(norms)

            # Clipped sums, added to ``out`` when given.
            sums = out if out is not None else {}
            for name, p in self.params.items():
                if name not in sums:
                    sums[name] = torch.zeros_like(
                        p, memory_format=torch.contiguous_format
                    )
                if id(p) in finishers:
                    finishers[id(p)](factors, sums[name])
                elif id(p) in rows:  # a bias: (B, out)^T (B,)
                    sums[name].addmv_(rows[id(p)].T, factors)
                # else unused in this forward pass: its gradient is zero
        return sums, norms, total.detach()


def _forward(
    model: nn.Module,
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn,
) -> tuple[torch.Tensor, list[_Call]]:
    """The summed loss, and every call of one of ``layers`` that tracks gradients."""
    calls: list[_Call] = []

    def hook(
        module: nn.Module,
        args: tuple[torch.Tensor, ...],
        kwargs: dict[str, torch.Tensor],
        out: torch.Tensor,
    ) -> None:
        if out.requires_grad:  # not under torch.no_grad
            a = args[0] if args else next(iter(kwargs.values()))
            calls.append(_Call(module, a, out, (a._version, out._version)))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.enable_grad():
            total = loss_fn(model(x), y) * len(x)
    finally:
        for h in handles:
            h.remove()
    return total, calls


def _check_in_place(calls: list[_Call]) -> None:
    """Refuse a forward pass that changed a layer's input or output in place after
    the layer ran (``ReLU(inplace=True)``, say): the engine would read stale values."""
    for c in calls:
        if (c.a._version, c.out._version) != c.versions:
            raise GhostUnsupportedError(
                f"the input or output of a {type(c.module).__name__} layer is "
                "modified in place later in the forward pass (e.g. "
                "ReLU(inplace=True)), which the ghost engine cannot follow; use "
                "inplace=False or engine='functional'"
            )


def _check_outside_uses(
    total: torch.Tensor, calls: list[_Call], names: dict[int, str]
) -> None:
    """Refuse a trainable parameter that the loss uses outside a recorded layer call.

    Walks the autograd graph from the loss, jumping over each recorded call (from its
    output straight to its input), and fails on any trainable parameter it still
    reaches: that use would be missing from the clipped sum.
    """
    jumps: dict[object, list[object]] = {}
    for c in calls:
        jumps.setdefault(c.out.grad_fn, []).append(c.a.grad_fn)
    stack: list[object] = [total.grad_fn]
    seen: set[object] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in jumps:
            stack.extend(jumps[node])
            continue
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) in names:
            raise GhostUnsupportedError(
                f"trainable parameter {names[id(variable)]} is used outside its "
                "layer's forward call, which the ghost engine cannot see; use "
                "engine='functional'"
            )
        stack.extend(f for f, _ in node.next_functions)  # type: ignore[attr-defined]


class _Use:
    """One use of a weight: its output gradients ``g`` ``(B, T, out)``, a way to get
    the matching inputs ``(n, T, in)`` of any slice of the examples, and ``in``.

    A Linear layer on a ``(B, in)`` input (``T = 1``, the MLP case) also keeps its
    input and output gradient as the 2-D ``a2`` ``(B, in)`` and ``g2`` ``(B, out)``,
    which the engine then uses directly (fewer tensor operations per step).
    """

    __slots__ = ("_g", "_row_sq", "a2", "g2", "inputs", "width")

    def __init__(
        self,
        g: torch.Tensor | None,
        inputs: Callable[[slice], torch.Tensor],
        width: int,
        a2: torch.Tensor | None = None,
        g2: torch.Tensor | None = None,
    ) -> None:
        self._g, self.inputs, self.width, self.a2, self.g2 = g, inputs, width, a2, g2
        self._row_sq: torch.Tensor | None = None

    @property
    def g(self) -> torch.Tensor:
        """The output gradients as ``(B, T, out)``."""
        if self._g is None:
            assert self.g2 is not None
            self._g = self.g2.unsqueeze(1)
        return self._g

    def rows(self) -> torch.Tensor:
        """The output gradients summed over positions, ``(B, out)``."""
        if self.g2 is not None:
            return self.g2
        return self.g[:, 0] if self.g.shape[1] == 1 else self.g.sum(dim=1)

    def row_sq(self) -> torch.Tensor:
        """Squared norms of :meth:`rows`, ``(B,)``; computed once, shared by the
        layer's weight (when ``T = 1``) and its bias."""
        if self._row_sq is None:
            self._row_sq = _sq_rows(self.rows())
        return self._row_sq


def _uses(
    calls: list[_Call], out_grads: tuple[torch.Tensor | None, ...]
) -> tuple[dict[int, list[_Use]], dict[int, list[_Use]]]:
    """Each trainable weight's and each trainable bias's uses, keyed by parameter
    id."""
    weights: dict[int, list[_Use]] = {}
    biases: dict[int, list[_Use]] = {}
    for call, g in zip(calls, out_grads, strict=True):
        if g is None:
            continue
        use = _use(call.module, call.a, g)
        w, b = call.module.weight, call.module.bias
        if isinstance(w, torch.Tensor) and w.requires_grad:
            weights.setdefault(id(w), []).append(use)
        if isinstance(b, torch.Tensor) and b.requires_grad:
            biases.setdefault(id(b), []).append(use)
    return weights, biases


def _bias_rows(uses: list[_Use], sq: torch.Tensor) -> torch.Tensor:
    """A bias's per-example gradients ``(B, out)`` (its uses' output gradients summed
    over uses and positions); their squared norms are added to ``sq``."""
    if len(uses) == 1:
        sq += uses[0].row_sq()
        return uses[0].rows()
    row = torch.stack([u.rows() for u in uses]).sum(dim=0)
    sq += _sq_rows(row)
    return row


def _use(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> _Use:
    """A layer call's output gradients and inputs as positions (``a`` is read under
    ``torch.no_grad``, so it needs no detaching)."""
    if isinstance(module, nn.Linear):
        if a.dim() == 2:
            return _Use(None, lambda rows: a[rows].unsqueeze(1), a.shape[1], a, g)
        a3 = a.reshape(len(a), -1, a.shape[-1])
        g3 = g.reshape(len(g), -1, g.shape[-1])
        return _Use(g3, a3.__getitem__, a.shape[-1])
    assert isinstance(module, _ConvNd)
    conv = module
    return _Use(
        g.flatten(2).transpose(1, 2),
        lambda rows: _patches(conv, a[rows]),
        module.weight[0].numel(),
    )


def _patches(module: _ConvNd, a: torch.Tensor) -> torch.Tensor:
    """The convolution's input patches, ``(B, positions, kernel * in_channels)``.

    Each patch is laid out kernel position first, channel last (channels-last), which
    :func:`_as_parameter` undoes; built with one strided copy instead of ``unfold``.
    """
    n = a.dim() - 2
    padding = cast(tuple[int, ...], module.padding)  # numeric: checked up front
    pad = [p for p in reversed(padding) for _ in (0, 1)]
    if any(pad):
        a = F.pad(a, pad)
    a = a.movedim(1, -1).contiguous()  # (B, *spatial, C)
    spatial = a.shape[1:-1]
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    out = [
        (spatial[d] - dilation[d] * (kernel[d] - 1) - 1) // stride[d] + 1
        for d in range(n)
    ]
    st = a.stride()
    view = a.as_strided(
        (len(a), *out, *kernel, a.shape[-1]),
        (
            st[0],
            *(st[1 + d] * stride[d] for d in range(n)),
            *(st[1 + d] * dilation[d] for d in range(n)),
            st[-1],
        ),
    )
    return view.reshape(len(a), math.prod(out), -1)


# Examples per chunk when per-example gradients are built: inputs of about this many
# elements are unfolded and multiplied while they are still in cache.
_CHUNK_ELEMENTS = 2**18


def _weight_part(uses: list[_Use], sq: torch.Tensor) -> _Finish:
    """Add a weight's per-example squared norms to ``sq`` ``(B,)``, all its uses
    together, and say how to add its clipped sum to a buffer from the clip
    factors."""
    use = uses[0]
    if len(uses) == 1 and use.a2 is not None and use.g2 is not None:
        # A Linear layer on (B, in): ghost norm |a_i|^2 |g_i|^2, one matrix product.
        a2, g2 = use.a2, use.g2
        sq.addcmul_(_sq_rows(a2), use.row_sq())
        return lambda c, out: _add_product(out, (g2 * c[:, None]).T, a2)
    g = use.g if len(uses) == 1 else torch.cat([u.g for u in uses], 1)

    def inputs(rows: slice) -> torch.Tensor:
        if len(uses) == 1:
            return uses[0].inputs(rows)
        return torch.cat([u.inputs(rows) for u in uses], 1)

    b, t, o = g.shape
    k = uses[0].width
    if t == 1:  # ghost norm |a_i|^2 |g_i|^2, then one matrix product
        a2, g2 = inputs(slice(None))[:, 0], g[:, 0]
        sq.addcmul_(_sq_rows(a2), use.row_sq())
        return lambda c, out: _add_product(out, (g2 * c[:, None]).T, a2)
    if t * t * (k + o) < k * o:  # ghost norm through the Gram matrices
        a = inputs(slice(None))
        gram = torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
        sq += gram.sum(dim=(1, 2))
        return lambda c, out: _add_product(
            out, (g * c[:, None, None]).reshape(b * t, o).T, a.reshape(b * t, k)
        )
    per_example = torch.empty(b, o, k, dtype=g.dtype)
    step = max(1, _CHUNK_ELEMENTS // (t * k))
    for start in range(0, b, step):
        rows = slice(start, start + step)
        torch.bmm(g[rows].transpose(1, 2), inputs(rows), out=per_example[rows])
    sq += _sq_rows(per_example.flatten(1))
    return lambda c, out: _add_product(out, per_example.view(b, o * k).T, c)


def _add_product(out: torch.Tensor, m: torch.Tensor, v: torch.Tensor) -> None:
    """``out += m @ v`` for a weight's buffer ``out``, where ``m @ v`` is its
    ``(out, in)`` sum (or that sum flattened, for a vector ``v``), in place for a
    Linear weight, through the channels-last layout for a convolution's."""
    if out.dim() == 2:
        if v.dim() == 1:
            out.view(-1).addmv_(m, v)
        else:
            out.addmm_(m, v)
        return
    summed = m @ v
    out.add_(_as_parameter(summed.view(out.shape[0], -1), out))


def _norm_dtype(out_grads: tuple[torch.Tensor | None, ...]) -> torch.dtype:
    """The dtype of the output gradients (all alike), float32 if there are none."""
    return next((g.dtype for g in out_grads if g is not None), torch.float32)


def _as_parameter(summed: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A weight's ``(out, in)`` sum in the parameter's shape (undoing the
    channels-last patch layout for convolutions)."""
    if p.dim() == 2:
        return summed
    kernel = p.shape[2:]
    moved = summed.reshape(p.shape[0], *kernel, p.shape[1])
    return moved.movedim(-1, 1).contiguous()


def _sq_rows(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each row of a 2-D tensor, shape ``(B,)``."""
    return torch.linalg.vector_norm(t, dim=1).square()
