"""From Fake to Real: group-balanced sampling, GroupDRO, balanced synthetic sets, the two-stage regime."""

import pytest
import torch
from torch import nn

from hardneg.data import from_tensors
from hardneg.methods.fake_to_real import (
    GroupBalancedSampler, GroupDRO, balanced_synthetic_set, evaluate_groups, fake_to_real, group_ids,
    train_classifier,
)


pytestmark = pytest.mark.usefixtures("one_thread")


class LevelGenerator:
    """A stand-in class-conditional generator: class c -> noisy images around grey level (c + 1) / (K + 1)."""

    def __init__(self, num_classes):
        self.num_classes = num_classes
        self.calls = []

    def sample(self, labels, seed=None, size=None):
        labels = torch.as_tensor(labels)
        self.calls.append((labels.clone(), seed, size))
        g = torch.Generator().manual_seed(seed)
        h, w = size or (4, 4)
        base = ((labels.float() + 1) / (self.num_classes + 1)).view(-1, 1, 1, 1)
        return (base + 0.05 * torch.randn(len(labels), 1, h, w, generator=g)).clamp(0, 1)


def paint(images, attrs):
    """Render the attribute as a colour: the image in channel 0 (attribute 0) or channel 1 (attribute 1)."""
    out = torch.zeros(images.shape[0], 2, *images.shape[-2:])
    out[torch.arange(len(attrs)), attrs] = images[:, 0]
    return out


def test_group_ids():
    assert group_ids(torch.tensor([0, 1, 2]), torch.tensor([1, 0, 1]), 2).tolist() == [1, 2, 5]
    with pytest.raises(ValueError):
        group_ids(torch.tensor([0]), torch.tensor([2]), 2)


def test_group_balanced_sampler_balances_groups():
    groups = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    sampler = GroupBalancedSampler(groups, num_samples=6000, seed=0)
    drawn = groups[torch.tensor(list(sampler))]
    share = torch.bincount(drawn, minlength=3).float() / len(drawn)
    assert len(sampler) == 6000
    assert torch.allclose(share, torch.full((3,), 1 / 3), atol=0.03)  # not 0.90 / 0.09 / 0.01
    assert list(GroupBalancedSampler(groups, 50, seed=1)) == list(GroupBalancedSampler(groups, 50, seed=1))


def test_group_dro_upweights_the_worst_group():
    dro = GroupDRO(num_groups=3, step_size=0.5)
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = torch.tensor([0.1, 0.1, 2.0, 2.0, 0.5, 0.5], requires_grad=True)
    for _ in range(5):
        objective = dro(loss, groups)
    assert int(dro.q.argmax()) == 1 and dro.q[1] > dro.q[2] > dro.q[0]
    assert torch.isclose(dro.q.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert objective > loss.mean()  # weighted towards the group with the largest loss
    objective.backward()
    assert loss.grad[2] > loss.grad[4] > loss.grad[0]  # the worst group gets the most gradient
    state = dro.state_dict()
    other = GroupDRO(3)
    other.load_state_dict(state)
    assert torch.equal(other.q, dro.q)


def test_balanced_synthetic_set_covers_every_class_attribute_cell():
    gen = LevelGenerator(3)
    syn = balanced_synthetic_set(gen, num_classes=3, per_cell=4, num_attributes=2, group_transform=paint,
                                 seed=0, size=(4, 4), batch_size=10)
    assert len(syn.data) == 3 * 2 * 4 and syn.data.images.shape[1] == 2
    assert torch.bincount(syn.groups, minlength=6).tolist() == [4] * 6
    assert torch.equal(syn.groups // 2, syn.data.labels)
    attrs = syn.groups % 2
    painted = syn.data.images.flatten(2).abs().sum(2) > 0  # (N, channels)
    assert torch.equal(painted.float().argmax(1), attrs)
    assert [c[1] for c in gen.calls] == [0, 1, 2]  # one seed per generation batch: reproducible
    with pytest.raises(ValueError, match="conditioned on the 6"):
        balanced_synthetic_set(LevelGenerator(3), num_classes=3, per_cell=1, num_attributes=2)
    cells = balanced_synthetic_set(LevelGenerator(6), num_classes=3, per_cell=2, num_attributes=2)
    assert torch.equal(cells.groups, torch.arange(6).repeat_interleave(2))


def _tiny_model(channels=2, k=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * 16, 16), nn.ReLU(), nn.Linear(16, k))


@pytest.mark.parametrize("stage2", ["erm", "group-balanced", "group-dro"])
def test_two_stage_regime_runs_end_to_end(stage2):
    torch.manual_seed(0)
    gen = LevelGenerator(3)
    syn = balanced_synthetic_set(gen, 3, per_cell=8, num_attributes=2, group_transform=paint, seed=0)
    # real data: attribute spuriously tied to the label (class 0 -> attribute 0, others -> 1), 1 counter-example each
    labels = torch.arange(3).repeat_interleave(10)
    attrs = (labels > 0).long()
    attrs[[0, 10, 20]] = 1 - attrs[[0, 10, 20]]
    real_x = paint(gen.sample(labels, seed=7), attrs)
    real = from_tensors(real_x, labels)
    groups = group_ids(labels, attrs, 2)
    test_attrs = torch.arange(30) % 2
    test = from_tensors(paint(gen.sample(labels, seed=8), test_attrs), labels)
    model = _tiny_model()
    before = [p.clone() for p in model.parameters()]
    res = fake_to_real(model, syn.data, real, stage1_steps=6, stage2_steps=6, stage2=stage2, real_groups=groups,
                       test=test, test_groups=group_ids(labels, test_attrs, 2), batch_size=8, seed=0)
    assert len(res.stage1_losses) == 6 and len(res.stage2_losses) == 6
    assert all(torch.isfinite(torch.tensor(res.stage1_losses + res.stage2_losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    ev = res.test
    assert set(ev.group_accuracy) == set(range(6))
    assert ev.worst_group_accuracy == min(ev.group_accuracy.values()) <= ev.accuracy


def test_stage_training_lowers_the_loss_and_needs_groups_for_group_modes():
    torch.manual_seed(0)
    syn = balanced_synthetic_set(LevelGenerator(3), 3, per_cell=16, seed=0)
    model = _tiny_model(channels=1)
    losses = train_classifier(model, syn.data, steps=80, batch_size=16, lr=3e-2, seed=0)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert evaluate_groups(model, syn.data).accuracy > 0.9
    with pytest.raises(ValueError, match="needs groups"):
        train_classifier(model, syn.data, steps=1, mode="group-dro")
