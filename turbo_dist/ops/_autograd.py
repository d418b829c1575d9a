"""Autograd helpers shared by the ops and the features above them."""
import functools

import torch


def first_order_only(what):
    """Decorator for an autograd.Function's backward whose kernels have no derivative of their own: a backward that
    would build a graph (create_graph=True with an input or an incoming gradient requiring grad: a gradient penalty,
    a Hessian-vector product) raises NotImplementedError naming `what`, before any kernel, instead of returning a
    first derivative that silently lacks its own (torch's once_differentiable lets that through when the incoming
    gradients do not require grad, e.g. autograd.grad(o.sum(), q, create_graph=True)). Runs under no_grad."""
    def wrap(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            if torch.is_grad_enabled():  # create_graph=True: the gradients would need a graph of their own
                if any(getattr(ctx, "needs_input_grad", ())) or \
                        any(isinstance(t, torch.Tensor) and t.requires_grad for t in grads):
                    raise NotImplementedError(
                        f"{what}: second derivatives (a backward with create_graph=True through it) are not "
                        "supported; its backward kernels are not differentiable")
            with torch.no_grad():
                return backward(ctx, *grads)
        return run
    return wrap
