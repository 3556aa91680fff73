"""Once-differentiable backward functions: a second derivative through our ops raises instead of being zero.

None of the ops registers an autograd formula for its backward kernel, so without this guard a
`torch.autograd.grad(..., create_graph=True)` through them returns first-order gradients that silently carry no
second-order terms (issue 8, item 3). `torch.autograd.function.once_differentiable` has the right idea, but its
error node hangs off detached copies, so differentiating again only says "appears to not have been used in the
graph"; here the node is connected to everything the first-order gradients depend on (the incoming gradients and
the saved inputs), so the second differentiation reaches it and gets a message naming the op.
"""

from __future__ import annotations

import functools

import torch


def double_backward_message(op: str) -> str:
    return (
        f"double backward is not supported by h3fusion_ext.{op} (its backward is once-differentiable); "
        f"use the plain-PyTorch h3fusion_ext.reference.{op} for higher-order gradients"
    )


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the first-order gradients, connected to their inputs; its backward raises."""

    @staticmethod
    def forward(ctx, op, num_outputs, *tensors):
        ctx.op = op
        ctx.num_inputs = len(tensors)
        return tuple(t.view_as(t) for t in tensors[:num_outputs])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(double_backward_message(ctx.op))


def once_differentiable(op: str):
    """Decorates a `register_autograd` backward(ctx, *grads) of the public op `op`.

    The backward runs without building a graph. When the caller asked for one (`create_graph=True`, i.e. grad mode
    is on during backward) and any incoming gradient or saved tensor requires grad, the returned gradients are
    passed through a node whose own backward raises `double backward is not supported by h3fusion_ext.<op>`.
    """

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            depends_on = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not depends_on:
                return outputs
            single = not isinstance(outputs, tuple)
            outs = (outputs,) if single else outputs
            present = [i for i, v in enumerate(outs) if v is not None]
            if not present:
                return outputs
            aliases = _NoDoubleBackward.apply(op, len(present), *[outs[i] for i in present], *depends_on)
            result = list(outs)
            for i, alias in zip(present, aliases, strict=True):
                result[i] = alias
            return result[0] if single else tuple(result)

        return wrapper

    return decorate


def check_no_forward_ad_or_func_grad(op: str, *tensors: torch.Tensor) -> None:
    """Raise a clear error under the autodiff modes our ops do not support, instead of a wrong or cryptic answer.

    Unsupported: the differentiating transforms of `torch.func` (grad, vjp, jacrev, jacfwd, jvp, hessian, ...; they
    would fail with "autograd.Function ... must override the setup_context staticmethod", and `jvp` would silently
    give zero tangents) and forward-mode AD (`torch.autograd.forward_ad`, whose tangent would silently be dropped).
    `torch.func.vmap` alone works (PyTorch's per-sample loop) and ordinary reverse-mode autograd is the supported
    way to differentiate. Cheap when nothing of this is active; skipped while torch.compile traces.
    """
    if torch.compiler.is_compiling():
        return
    if torch._C._are_functorch_transforms_active():
        stack = torch._C._functorch.get_interpreter_stack() or []
        differentiating = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
        if any(level.key() in differentiating for level in stack):
            raise RuntimeError(
                f"h3fusion_ext.{op} does not support the differentiating torch.func transforms (grad, vjp, jacrev, "
                f"jacfwd, jvp, hessian); only torch.func.vmap. Differentiate with ordinary autograd "
                f"(loss.backward() or torch.autograd.grad), or use the plain-PyTorch h3fusion_ext.reference.{op}"
            )
    if torch.autograd.forward_ad._current_level >= 0 and any(
        torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors if isinstance(t, torch.Tensor)
    ):
        raise RuntimeError(
            f"h3fusion_ext.{op} does not support forward-mode AD (torch.autograd.forward_ad dual tensors); use "
            f"reverse-mode autograd, or the plain-PyTorch h3fusion_ext.reference.{op}"
        )
