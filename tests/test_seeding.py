import torch

from ddfast.distill.training.seeding import derive_seed, seeded


def test_seeds_are_stable_and_scopes_restore_the_rng():
    assert derive_seed(0, "iteration", 3) == derive_seed(0, "iteration", 3)
    assert derive_seed(0, "iteration", 3) != derive_seed(0, "iteration", 4) != derive_seed(1, "iteration", 3)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with seeded(7):
        assert torch.equal(torch.rand(3), inside)
