"""GeNIe-Ada: r chosen just after the largest jump of the projection towards the target class."""

from __future__ import annotations

import math

import pytest
import torch

from hardneg.generators import GeneratorError
from hardneg.generators.ada import AdaResult, choose_ratio, genie_ada

GRID = (0.5, 0.6, 0.7, 0.8, 0.9)


# --------------------------------------------------------------------------- choose_ratio (pure)
def test_choose_ratio_picks_the_grid_point_after_the_largest_jump():
    p = torch.tensor([
        [0.0, 0.1, 0.2, 0.9, 1.0],   # jump 0.7 -> 0.8
        [0.0, 0.8, 0.85, 0.9, 0.95],  # jump 0.5 -> 0.6
        [0.1, 0.1, 0.1, 0.1, 0.7],   # jump 0.8 -> 0.9
    ])
    assert choose_ratio(p, GRID).tolist() == [0.8, 0.6, 0.9]


def test_choose_ratio_ties_go_to_the_earlier_jump_and_uses_the_given_grid():
    p = torch.tensor([[0.0, 1.0, 1.0, 2.0]])
    assert choose_ratio(p, (0.2, 0.4, 0.6, 0.8)).tolist() == [0.4]


def test_choose_ratio_rejects_bad_shapes_and_grids():
    with pytest.raises(GeneratorError, match=r"\(N, 5\)"):
        choose_ratio(torch.zeros(2, 4), GRID)
    with pytest.raises(GeneratorError, match="increasing"):
        choose_ratio(torch.zeros(1, 3), (0.5, 0.9, 0.7))
    with pytest.raises(GeneratorError, match=r"\(0, 1\]"):
        choose_ratio(torch.zeros(1, 2), (0.0, 0.5))
    with pytest.raises(GeneratorError, match="at least 2"):
        choose_ratio(torch.zeros(1, 1), (0.5,))


# --------------------------------------------------------------------------- genie_ada
class FillGenerator:
    """Fake generator: the image of source i at ratio r is filled with (source value + r)."""

    num_classes = 4

    def __init__(self) -> None:
        self.calls: list[tuple[int, list[float]]] = []

    def generate(self, sources, source_labels, target_labels, ratios, seed=None):
        r = torch.as_tensor(ratios, dtype=torch.float32)
        self.calls.append((sources.shape[0], r.tolist()))
        return sources + r.view(-1, 1, 1, 1)


def jump_encoder(jumps: dict[int, float]):
    """Embeds an image of source i (value 10 i + r) at angle 0.05 r, plus pi/2 once r >= jumps[i]."""

    def encode(images: torch.Tensor) -> torch.Tensor:
        value = images.mean(dim=(1, 2, 3)).double()
        i = torch.floor(value / 10 + 1e-6)
        r = value - 10 * i
        jump = torch.tensor([jumps[int(k)] for k in i.tolist()], dtype=torch.float64)
        theta = 0.05 * r + (math.pi / 2) * (r >= jump - 1e-6)
        return 3.0 * torch.stack([torch.cos(theta), torch.sin(theta)], dim=1).float()  # not unit length

    return encode


def test_ada_picks_the_later_grid_point_of_the_jump_and_returns_its_image():
    gen = FillGenerator()
    sources = torch.stack([torch.full((1, 4, 4), 10.0 * i) for i in range(2)])
    # source 0 flips between r = 0.6 and 0.7, source 1 between 0.8 and 0.9
    encoder = jump_encoder({0: 0.7, 1: 0.9})
    target_mean = torch.tensor([0.0, 1.0])  # the target class sits at angle pi/2
    res = genie_ada(gen, encoder, sources, torch.tensor([0, 0]), torch.tensor([1, 1]), target_mean,
                    grid=GRID, seed=0)
    assert isinstance(res, AdaResult)
    assert res.ratios.tolist() == pytest.approx([0.7, 0.9])
    # the returned image is the one generated at the chosen r (value 10 i + r), not a new one
    torch.testing.assert_close(res.images[0], torch.full((1, 4, 4), 0.7))
    torch.testing.assert_close(res.images[1], torch.full((1, 4, 4), 10.9))
    assert len(gen.calls) == 1  # every source at every grid r in one batched call, nothing after
    n_rows, ratios = gen.calls[0]
    assert n_rows == 2 * len(GRID)
    assert ratios == pytest.approx(list(GRID) * 2)
    assert res.projections.shape == (2, len(GRID))
    assert (torch.diff(res.projections, dim=1) > 0).all()  # moving towards the target class


def test_ada_target_means_as_vector_matrix_or_mapping_agree():
    gen = FillGenerator()
    sources = torch.stack([torch.full((1, 2, 2), 10.0 * i) for i in range(3)])
    encoder = jump_encoder({0: 0.6, 1: 0.8, 2: 0.9})
    src, tgt = torch.tensor([0, 0, 0]), torch.tensor([2, 2, 2])
    mean = torch.tensor([0.0, 1.0])
    a = genie_ada(gen, encoder, sources, src, tgt, mean)
    b = genie_ada(gen, encoder, sources, src, tgt, mean.expand(3, 2))
    c = genie_ada(gen, encoder, sources, src, tgt, {2: mean})
    assert a.ratios.tolist() == b.ratios.tolist() == c.ratios.tolist() == pytest.approx([0.6, 0.8, 0.9])
    with pytest.raises(GeneratorError, match="no mean for target class"):
        genie_ada(gen, encoder, sources, src, tgt, {1: mean})
    with pytest.raises(GeneratorError, match="dimension"):
        genie_ada(gen, encoder, sources, src, tgt, torch.zeros(5))


def test_ada_with_the_class_conditional_generator():
    pytest.importorskip("diffusers")
    from hardneg.generators.class_conditional import ClassConditionalConfig, ClassConditionalGenerator

    gen = ClassConditionalGenerator(ClassConditionalConfig(
        num_classes=3, image_size=8, block_out_channels=(8, 16), norm_num_groups=8, attention_head_dim=8,
        num_inference_steps=10))
    sources = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    src, tgt = torch.tensor([0, 1]), torch.tensor([2, 2])
    encoder = lambda x: torch.nn.functional.avg_pool2d(x, 4).flatten(1)  # noqa: E731
    res = genie_ada(gen, encoder, sources, src, tgt, torch.full((9,), 0.5), seed=3)
    assert res.images.shape == sources.shape and set(res.ratios.tolist()) <= set(GRID)
    # the chosen image is exactly the one the batched call made at that r (same seed, no re-generation)
    every = gen.generate(sources.repeat_interleave(5, 0), src.repeat_interleave(5), tgt.repeat_interleave(5),
                         torch.tensor(GRID).repeat(2), seed=3).view(2, 5, 1, 12, 12)
    for i in range(2):
        j = GRID.index(round(float(res.ratios[i]), 6))
        torch.testing.assert_close(res.images[i], every[i, j])


# --------------------------------------------------------------------------- through the engine
def test_engine_ada_keeps_each_sources_image_after_its_own_jump_towards_the_target():
    """Two sources of class 0 whose images jump onto class 3 at different r (0.75 and 0.45): the engine
    keeps r = 0.9 for the first and 0.6 for the second (a projection on source - target, the wrong
    way round, picks them the other way)."""
    from hardneg import HardNeg, HardNegConfig
    from hardneg.data import from_tensors
    from hardneg.targeting import PlannedPair

    images = torch.zeros(6, 1, 4, 4)
    images[1] = 10.0  # source 1's images are 10 + r, source 0's are r
    data = from_tensors(images, torch.tensor([0, 0, 3, 3, 3, 3]))
    jumps = {0: 0.75, 1: 0.45}

    def embed(batch, batch_size=256):  # at the source (1, 0) before the jump, at class 3 (0, 1) after it
        value = batch.flatten(1).mean(1)
        base = torch.round(value / 10)
        after = torch.tensor([float(v - 10 * b) >= jumps[int(b)] for v, b in zip(value, base)])
        return torch.stack([(~after).float(), after.float()], dim=1)

    cfg = HardNegConfig(num_classes=4, curriculum="ada", ada_grid=(0.3, 0.6, 0.9), generation_batch=6,
                        refresh_every=1000, label_mode="hard", seed=0,
                        pixel_range=(0.0, 12.0))  # source 1 lies at 10: outside the default [0, 1]
    with HardNeg(cfg, dataset=data, generator=FillGenerator()) as engine:
        engine.embed = embed
        engine.observe(embeddings=torch.tensor([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 4), labels=data.labels,
                       ids=torch.arange(6))
        engine._request_generation([PlannedPair((0, 3), 2, [0, 1])])
        engine.wait_for_generation()
        prov = engine.buffer.provenance()
    chosen = dict(zip(prov["source_ids"].tolist(), [round(r, 4) for r in prov["ratios"].tolist()]))
    assert chosen == {0: 0.9, 1: 0.6}


def test_embed_casts_images_to_a_bfloat16_models_dtype():
    """GeNIe-Ada embeds generated images with the model: a bf16 model gets bf16 inputs (float32
    images used to fail with a dtype mismatch), and the embeddings come back as float32."""
    from hardneg import HardNeg, HardNegConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model = model.to(torch.bfloat16)
    cfg = HardNegConfig(num_classes=3, refresh_every=1000, seed=0)
    with HardNeg(cfg, model=model, embedding_layer="2") as engine:
        emb = engine.embed(torch.rand(5, 1, 4, 4))
    assert emb.shape == (5, 8) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
