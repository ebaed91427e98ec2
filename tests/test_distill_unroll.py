"""The unrolled student: both memory modes give the reference gradient (float64), and bad settings are refused."""

import pytest
import torch
from loops_support import one_thread  # noqa: F401  (autouse)

from ddfast.distill.training.augment import DSA
from ddfast.distill.training.models import ConvNet
from ddfast.distill.unroll import Student, StudentOptions


def setup(batch_size=7, dsa=True):
    torch.manual_seed(0)
    model = ConvNet(1, 10, 28, width=6, depth=2).double()
    labels = torch.arange(10).repeat_interleave(3)
    student = Student(model, labels, batch_size=batch_size, dsa=DSA() if dsa else None)
    images = torch.randn(30, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    start = [p.detach().clone().requires_grad_() for p in model.parameters()]
    target = [p.detach() + 0.1 * torch.randn_like(p) for p in start]
    return student, images, lr, start, target


def gradients(student, images, lr, start, target, plan, mode):
    final = student.train(start, images, lr, plan, mode)
    loss = sum(((a - b) ** 2).sum() for a, b in zip(final, target))
    return [loss.detach(), *torch.autograd.grad(loss, [images, lr, *start])]


@pytest.mark.parametrize("batch_size, dsa", [(7, True), (None, False)])
def test_constant_memory_gives_the_standard_gradients(batch_size, dsa):
    student, images, lr, start, target = setup(batch_size, dsa)
    plan = student.plan(5, images.shape)
    standard = gradients(student, images, lr, start, target, plan, "standard")
    constant = gradients(student, images, lr, start, target, plan, "constant")
    assert standard[1].abs().max() > 1e-4 and standard[2].abs() > 1e-3  # the images and the lr matter
    for s, c in zip(standard, constant):
        torch.testing.assert_close(c, s, rtol=1e-10, atol=1e-13)


def test_standard_mode_matches_finite_differences():
    student, images, lr, start, target = setup()
    plan = student.plan(3, images.shape)
    _, grad_images, grad_lr, *_ = gradients(student, images, lr, start, target, plan, "standard")

    def loss(x, rate):
        with torch.no_grad():
            params = [p.detach() for p in start]
            for step in plan:
                with torch.enable_grad():
                    leaves = [p.clone().requires_grad_() for p in params]
                    grads = torch.autograd.grad(student.loss(leaves, x, step), leaves)
                params = [p - rate * g for p, g in zip(params, grads)]
            return sum(((a - b) ** 2).sum() for a, b in zip(params, target))

    eps = 1e-6
    assert (loss(images, lr + eps) - loss(images, lr - eps)) / (2 * eps) == pytest.approx(grad_lr.item(), rel=1e-6)
    direction = torch.randn_like(images)
    numeric = (loss(images + eps * direction, lr) - loss(images - eps * direction, lr)) / (2 * eps)
    assert numeric.item() == pytest.approx((grad_images * direction).sum().item(), rel=1e-6)


def test_plan_covers_the_set_in_permutation_chunks():
    student, images, *_ = setup(batch_size=7, dsa=False)
    plan = student.plan(8, images.shape)
    assert [len(s.index) for s in plan] == [7] * 8 and all(s.draw is None for s in plan)
    first = torch.cat([s.index for s in plan[:4]])[:28]
    assert len(set(first.tolist())) == 28  # no image twice before the permutation is used up


def test_bad_settings_are_refused():
    student, images, lr, start, _ = setup()
    with pytest.raises(ValueError, match="memory mode must be one of"):
        student.train(start, images, lr, student.plan(1, images.shape), "cheap")
    with pytest.raises(ValueError, match="no buffers"):
        Student(ConvNet(1, 10, 28, width=4, norm="batchnorm"), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="memory must be one of"):
        StudentOptions(memory="cheap")
    with pytest.raises(ValueError, match="batch_syn must be an integer >= 1 or None"):
        StudentOptions(batch_syn=0)
