"""AugGen mixed conditions on a tiny random class-conditional generator."""

import pytest
import torch

pytest.importorskip("diffusers")

from hardneg.data import from_tensors
from hardneg.generators.class_conditional import ClassConditionalConfig, ClassConditionalGenerator
from hardneg.methods.auggen import (
    MixedCondition, auggen_expand, auggen_grid_search, auggen_soft_labels, mixed_condition_embeddings,
    mixed_embeddings, sample_mixed, score_generated_set,
)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gen():
    cfg = ClassConditionalConfig(num_classes=3, image_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                 attention_head_dim=8, mid_attention=False, num_inference_steps=2)
    g = ClassConditionalGenerator(cfg)  # its default init seed: deterministic
    with torch.no_grad():  # a random init has near-zero class embeddings: make classes matter
        g.unet.class_embedding.weight.normal_(0, 2.0, generator=torch.Generator().manual_seed(1))
    return g


@pytest.fixture(scope="module")
def real():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(6)
    return from_tensors(torch.rand(18, 1, 8, 8, generator=g), y)


def test_mixed_embedding_is_the_weighted_sum_of_class_embeddings(gen):
    table = gen.unet.class_embedding.weight
    got = mixed_embeddings(gen, [MixedCondition(0, 2, 0.7, 0.8), MixedCondition(1, 1, 0.5, 0.5)])
    assert torch.allclose(got[0], 0.7 * table[0] + 0.8 * table[2])
    assert torch.allclose(got[1], table[1])


def test_pure_conditions_reproduce_plain_class_samples_and_the_swap_is_undone(gen):
    original = gen.unet.class_embedding
    only_i = sample_mixed(gen, [MixedCondition(0, 2, 1.0, 0.0)], 3, seed=5)
    only_j = sample_mixed(gen, [MixedCondition(0, 2, 0.0, 1.0)], 3, seed=5)
    assert torch.allclose(only_i, gen.sample([0, 0, 0], seed=5), atol=1e-5)
    assert torch.allclose(only_j, gen.sample([2, 2, 2], seed=5), atol=1e-5)
    mixed = sample_mixed(gen, [MixedCondition(0, 2, 0.5, 0.5)], 3, seed=5)
    assert not torch.allclose(mixed, only_i, atol=1e-4) and not torch.allclose(mixed, only_j, atol=1e-4)
    assert gen.unet.class_embedding is original
    with pytest.raises(RuntimeError):
        with mixed_condition_embeddings(gen, [MixedCondition(0, 1, 0.5, 0.5)]):
            raise RuntimeError("boom")
    assert gen.unet.class_embedding is original  # restored after an error too


def test_expand_adds_one_new_label_per_mix(gen, real):
    pairs = [(0, 1), (1, 2), (0, 2), (2, 0)]  # more mixes than classes: sampled in two swaps
    out = auggen_expand(gen, real, pairs, alpha=0.7, beta=0.8, n_per_mix=2, seed=0)
    assert out.num_classes == 3 + 4
    assert out.class_names[3:] == ["0*0.7+1*0.8", "1*0.7+2*0.8", "0*0.7+2*0.8", "2*0.7+0*0.8"]
    assert len(out) == len(real) + 8 and out.images.shape[1:] == real.images.shape[1:]
    assert torch.equal(out.images[: len(real)], real.images) and torch.equal(out.labels[: len(real)], real.labels)
    assert out.labels[len(real):].tolist() == [3, 3, 4, 4, 5, 5, 6, 6]
    again = auggen_expand(gen, real, pairs, alpha=0.7, beta=0.8, n_per_mix=2, seed=0)
    assert torch.equal(out.images, again.images)


def test_an_expanded_classifier_is_scored_on_the_real_classes_only(real):
    from torch import nn

    from hardneg.training import predict

    class Fixed(nn.Module):  # logits favour a mixed class (index 3 or 4) over every real one
        def __init__(self, outputs: int) -> None:
            super().__init__()
            self.outputs = outputs

        def forward(self, x):
            logits = torch.zeros(x.shape[0], self.outputs)
            logits[:, 1] = 1.0
            logits[:, self.outputs - 1] = 5.0
            return logits

    assert predict(Fixed(5), real).tolist() == [1] * len(real)  # 3 real classes + 2 mixes: argmax over 3
    assert predict(Fixed(5), real, num_classes=5).tolist() == [4] * len(real)
    with pytest.raises(ValueError, match="num_classes >= 3"):
        predict(Fixed(2), real)


def test_soft_labels_sum_to_one_with_alpha_beta_shares(gen):
    soft = auggen_soft_labels(gen, [(0, 1), (2, 2)], alpha=0.6, beta=0.9, n_per_mix=2, seed=0)
    assert soft.images.shape == (4, 1, 8, 8) and soft.targets.shape == (4, 3)
    assert torch.allclose(soft.targets.sum(1), torch.ones(4))
    assert torch.allclose(soft.targets[0], torch.tensor([0.4, 0.6, 0.0]))
    assert torch.allclose(soft.targets[3], torch.tensor([0.0, 0.0, 1.0]))
    x, t, i = soft[1]
    assert x.shape == (1, 8, 8) and i == 1


def test_score_prefers_a_tight_set_far_from_real_classes():
    centroids = torch.eye(4)[:3]  # real classes along axes 0..2
    g = torch.Generator().manual_seed(0)
    far_tight = torch.tensor([0.0, 0.0, 0.0, 1.0]) + 0.01 * torch.randn(16, 4, generator=g)
    far_loose = torch.tensor([0.0, 0.0, 0.0, 1.0]) + 1.0 * torch.randn(16, 4, generator=g)
    on_class = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.01 * torch.randn(16, 4, generator=g)
    s_tight, s_loose, s_on = (score_generated_set(e, centroids)[2] for e in (far_tight, far_loose, on_class))
    assert s_tight > s_loose and s_tight > s_on


def test_grid_search_returns_the_best_candidate_deterministically(gen, real):
    proj = torch.randn(64, 5, generator=torch.Generator().manual_seed(3))
    embed = lambda x: x.flatten(1) @ proj  # noqa: E731  a fixed "classifier embedding"
    kw = dict(pairs=[(0, 1), (1, 2)], alphas=(0.5, 1.0), betas=(0.75,), n_per_condition=4, seed=0)
    res = auggen_grid_search(gen, embed, real, **kw)
    assert [(c.alpha, c.beta) for c in res.candidates] == [(0.5, 0.75), (1.0, 0.75)]
    assert res.candidates[0].score != res.candidates[1].score  # the conditions, not only the noise, matter
    assert res.best == max(res.candidates, key=lambda c: c.score)
    assert all(c.score == pytest.approx(c.distinctness - c.spread) for c in res.candidates)
    again = auggen_grid_search(gen, embed, real, **kw)
    assert again.candidates == res.candidates and (again.alpha, again.beta) == (res.alpha, res.beta)
