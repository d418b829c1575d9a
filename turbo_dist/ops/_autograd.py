"""Autograd helpers shared by the ops and the features above them."""
import functools

import torch


class _NoSecondDerivative(torch.autograd.Function):
    """The identity on the first `n` tensors (a first derivative computed by kernels without a derivative of their
    own); the rest are anchors (the op's inputs and incoming gradients that require grad) that tie the node into
    the graph, so that autograd.grad reaches it. Differentiating through it raises NotImplementedError naming the
    op (what once_differentiable's DelayedError does, with our error type, and also where the incoming gradient
    does not require grad)."""

    @staticmethod
    def forward(ctx, what, n, *tensors):
        ctx.what = what
        return tuple(t.clone() for t in tensors[:n])  # new tensors: no alias of an input leaves this node

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(
            f"{ctx.what}: second derivatives (differentiating a gradient taken with create_graph=True through it) "
            "are not supported; its backward kernels are not differentiable")


def first_order_only(what):
    """Decorator for an autograd.Function's backward whose kernels have no derivative of their own. A plain backward
    runs as before. In a backward with create_graph=True (grad mode on) it runs under no_grad and its gradients come
    out through _NoSecondDerivative: a later backward that differentiates through them (a gradient penalty on this
    op's inputs, a Hessian-vector product) raises NotImplementedError naming `what`, on every rank that reaches it
    alike, instead of silently using a gradient that lacks its own derivative (torch's once_differentiable lets that
    through when the incoming gradients do not require grad, e.g. autograd.grad(o.sum(), q, create_graph=True)).
    A create_graph backward whose later derivatives do not pass through this op (a penalty on another layer's
    gradient) works and is exact, where the backward can tie the refusal into the graph: an incoming gradient or a
    saved tensor (an input, an output) that requires grad; an op with neither refuses the create_graph backward
    itself."""
    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            anchors = [t for t in (*grads, *getattr(ctx, "saved_tensors", ()))
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            if not anchors and any(getattr(ctx, "needs_input_grad", ())):
                # nothing of the graph to tie the refusal to (a node on new leaves would be skipped by an
                # autograd.grad that does not ask for them, dropping this op's part silently): refuse now
                raise NotImplementedError(
                    f"{what}: second derivatives (a backward with create_graph=True through it) are not supported; "
                    "its backward kernels are not differentiable")
            with torch.no_grad():
                out = backward(ctx, *grads)
            single = not isinstance(out, tuple)
            outs = list((out,) if single else out)
            idx = [i for i, t in enumerate(outs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if not idx:
                return out
            firsts = [outs[i] for i in idx]
            for i, t in zip(idx, _NoSecondDerivative.apply(what, len(idx), *firsts, *anchors)):
                outs[i] = t
            return outs[0] if single else tuple(outs)
        return run
    return wrap
