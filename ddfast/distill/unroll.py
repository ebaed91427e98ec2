"""Differentiable unrolled SGD of a student network on the synthetic set: MTT's and BPTT's inner loop.

Step t trains the student (``torch.func.functional_call`` of a model on a list of parameters) on a
batch of synthetic images, augmented by a DSA draw when DSA is on:

    theta_{t+1} = theta_t - lr * g_t,    g_t = grad_theta CE(f(theta_t, aug_t(X[b_t])), y[b_t])

and the final parameters theta_T are differentiable with respect to the images X, the learning rate
lr and the start theta_0. Two memory modes give the same gradients:

- ``standard``: every step's graph is kept (``create_graph``), as the reference MTT code does;
  memory grows with the number of steps by one graph (all activations) per step.
- ``constant``: in the manner of TESLA, no graph is kept in the forward pass, only each step's
  parameters (P numbers). The backward pass runs the steps in reverse, rebuilding one step's graph at
  a time, and carries the adjoint a_t = dL/dtheta_t exactly:
      a_t = a_{t+1} - lr * H_t a_{t+1}    (a Hessian-vector product)
      dL/dX += -lr * (dg_t/dX)^T a_{t+1},  dL/dlr += -<g_t, a_{t+1}>
  Peak memory is one step's graph plus T parameter copies: flat in T for any network whose
  activations outweigh its parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from .method import Method
from .settings import MOMENTUM, NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, SettingError, check
from .training.augment import DSA, Draw
from .training.speed import FastNetwork

MODES = ("standard", "constant")


@dataclass
class Step:
    """One inner step's batch: positions in the synthetic set and its DSA draw (None without DSA)."""

    index: Tensor
    draw: Draw | None


class Student:
    """Unrolled training of ``model``'s architecture on (images, labels) with SGD steps.

    ``plan(steps)`` draws the batches and augmentations (global RNG); ``train(start, images, lr, plan,
    mode)`` returns the parameters after the steps, differentiable in ``images``, ``lr`` and ``start``.
    """

    def __init__(self, model: nn.Module, labels: Tensor, *, batch_size: int | None = None, dsa: DSA | None = None,
                 fast: FastNetwork | None = None):
        if any(True for _ in model.buffers()):
            raise ValueError("the student network must have no buffers (running statistics): use norm='instancenorm' or 'none'")
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.labels = labels
        self.batch_size = batch_size or len(labels)
        self.dsa = dsa
        self.fast = fast  # the speed settings: each step's gradient a compiled program (``FastNetwork.gradients``)

    def plan(self, steps: int, image_shape: Sequence[int]) -> list[Step]:
        """``steps`` batches: successive chunks of random permutations of the synthetic set, as MTT draws them."""
        n, device = len(self.labels), self.labels.device
        order, plan = torch.empty(0, dtype=torch.long), []
        for _ in range(steps):
            if len(order) < self.batch_size:
                order = torch.cat([order, torch.randperm(n)])
            index, order = order[: self.batch_size], order[self.batch_size :]
            draw = self.dsa.draw(len(index), image_shape[-2], image_shape[-1]) if self.dsa is not None else None
            plan.append(Step(index.to(device), draw))
        return plan

    def logits(self, params: Sequence[Tensor], x: Tensor) -> Tensor:
        """The student with ``params`` (shaped like the model's parameters) on images ``x``; with speed settings, compiled
        (differentiable once: second-order gradients go through ``gradients``)."""
        state = dict(zip(self.names, params, strict=True))
        if self.fast is not None:
            return self.fast.call("forward", state, x)
        return functional_call(self.model, state, (x,))

    def loss(self, params: Sequence[Tensor], images: Tensor, step: Step) -> Tensor:
        """Cross-entropy of the student with ``params`` on step ``step``'s batch."""
        return F.cross_entropy(self.logits(params, self._batch(images, step)), self.labels[step.index])

    def gradients(self, params: Sequence[Tensor], images: Tensor, step: Step, *, create_graph: bool) -> list[Tensor]:
        """The gradient of ``loss`` with respect to ``params`` (which require grad); ``create_graph`` keeps it differentiable."""
        if self.fast is None:
            return list(torch.autograd.grad(self.loss(params, images, step), params, create_graph=create_graph))
        state = dict(zip(self.names, params, strict=True))
        return self.fast.gradients(state, self.names, self._batch(images, step), self.labels[step.index], create_graph=create_graph)

    def _batch(self, images: Tensor, step: Step) -> Tensor:
        x = images[step.index]
        return x if step.draw is None else self.dsa.apply(x, step.draw)

    def train(self, start: Sequence[Tensor], images: Tensor, lr: Tensor, plan: list[Step], mode: str = "standard") -> list[Tensor]:
        """theta_T after ``len(plan)`` steps from ``start`` (tensors shaped like the model's parameters)."""
        if mode not in MODES:
            raise ValueError(f"memory mode must be one of {MODES}, got {mode!r}")
        if mode == "constant":
            return list(_ConstantMemory.apply(self, plan, images, lr, *start))
        params = [p if p.requires_grad else p.detach().requires_grad_() for p in start]
        for step in plan:
            grads = self.gradients(params, images, step, create_graph=True)
            params = [p - lr * g for p, g in zip(params, grads)]
        return params


class _ConstantMemory(torch.autograd.Function):
    """theta_T from (images, lr, *theta_0) keeping only the per-step parameters; exact reverse pass."""

    @staticmethod
    def forward(ctx, student: Student, plan: list[Step], images: Tensor, lr: Tensor, *start: Tensor):
        params = [p.detach() for p in start]
        trajectory = []
        for step in plan:
            trajectory.append(params)
            with torch.enable_grad():
                leaves = [p.requires_grad_() for p in (q.clone() for q in params)]
                grads = student.gradients(leaves, images.detach(), step, create_graph=False)
            params = [p - lr.detach() * g for p, g in zip(params, grads)]
        ctx.student, ctx.plan, ctx.trajectory = student, plan, trajectory
        ctx.save_for_backward(images, lr)
        return tuple(params)

    @staticmethod
    def backward(ctx, *grad_params: Tensor):
        images, lr = ctx.saved_tensors
        student, plan = ctx.student, ctx.plan
        adjoint = [torch.zeros_like(p) if g is None else g for g, p in zip(grad_params, ctx.trajectory[0])]
        grad_images = torch.zeros_like(images)
        grad_lr = torch.zeros_like(lr)
        for step, params in zip(reversed(plan), reversed(ctx.trajectory)):
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_() for p in params]
                x = images.detach().requires_grad_()
                grads = student.gradients(leaves, x, step, create_graph=True)
                dot = sum((g * a).sum() for g, a in zip(grads, adjoint))
                hvp = torch.autograd.grad(dot, [*leaves, x], allow_unused=True)
            grad_lr -= dot.detach()
            if hvp[-1] is not None:
                grad_images -= lr * hvp[-1]
            adjoint = [a if h is None else a - lr * h for a, h in zip(adjoint, hvp[:-1])]
        ctx.trajectory = None
        return (None, None, grad_images, grad_lr, *adjoint)


@dataclass(frozen=True)
class StudentOptions:
    """What MTT and BPTT share: the student's steps on the synthetic set and its learnable learning rate."""

    lr_init: float = 0.01  # the student's learning rate at the start (MTT's lr_teacher); learned, then used for evaluation
    lr_lr: float = 1e-5  # SGD (momentum lr_momentum) on that learning rate
    lr_momentum: float = 0.5
    batch_syn: int | None = None  # synthetic images per student step; None: all of them
    memory: str = "standard"  # "standard" (every step's graph kept) or "constant" (recomputed, flat in the steps)

    def __post_init__(self):
        check(self, lr_init=POSITIVE, lr_lr=NON_NEGATIVE, lr_momentum=MOMENTUM, batch_syn=OPTIONAL_COUNT)
        if self.memory not in MODES:
            raise SettingError("memory", f"one of {MODES}", self.memory)


class UnrolledMethod(Method):
    """A method that trains a student on the synthetic set by unrolled SGD with a learned learning rate.

    ``self.student`` trains networks of the configured architecture; ``self.syn_lr`` is the learning
    rate (optimised beside the images, saved in the checkpoint, used by the evaluation).
    """

    Options = StudentOptions

    @classmethod
    def check_config(cls, config) -> None:
        if config.model.norm == "batchnorm":
            raise ValueError(f"method {cls.name!r} trains a student without running statistics and does not support model.norm=batchnorm; "
                             "use instancenorm or none")

    def __init__(self, ctx):
        super().__init__(ctx)
        options, syn = self.options, ctx.synthetic
        template = ctx.fresh_model()
        self.student = Student(template, syn.labels, batch_size=options.batch_syn, dsa=self.dsa, fast=self.fast(template))
        self.syn_lr = nn.Parameter(torch.tensor(options.lr_init, device=syn.images.device))
        self.optimizers.append(torch.optim.SGD([self.syn_lr], lr=options.lr_lr, momentum=options.lr_momentum))

    def unroll(self, start: Sequence[Tensor], steps: int) -> list[Tensor]:
        """The student's parameters after ``steps`` steps from ``start`` (global RNG draws the batches)."""
        images = self.ctx.synthetic.images
        return self.student.train(start, images, self.syn_lr, self.student.plan(steps, images.shape), self.options.memory)

    def eval_lr(self) -> float:
        return self.syn_lr.item()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "syn_lr": self.syn_lr.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"])
