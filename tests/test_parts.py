"""The engine's parts on their own: capture, requests, the policy context, one GeNIe-Ada selection."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _toy_data import striped_data
from hardneg import HardNeg, HardNegConfig
from hardneg.capture import ForwardCapture
from hardneg.curriculum import ConstantCurriculum, make_curriculum
from hardneg.generators.ada import ada_pick, genie_ada
from hardneg.requests import RequestBuilder, request_seed
from hardneg.targeting import POLICIES, BankView, PlannedPair, PolicyContext, TargetingPolicy, register_policy
from hardneg.validation import HardNegError
from hardneg.value_space import ValueSpace

from test_ada import GRID, FillGenerator, jump_encoder


class TinyNet(nn.Module):
    def __init__(self, k=4):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, k)

    def forward(self, x):
        return self.head(self.body(x))


# --------------------------------------------------------------------------- capture
def test_forward_capture_works_without_an_engine():
    model = TinyNet()
    capture = ForwardCapture(model, num_classes=4)
    x = torch.rand(3, 1, 8, 8)
    model.train()
    model(x)
    assert capture.embeddings.shape == (3, 16) and capture.logits.shape == (3, 4)
    assert capture.pop() is not None and capture.embeddings is None
    model.eval()
    model(x)
    assert capture.embeddings is None  # eval forwards (validation) are ignored
    with capture.always():
        model(x)
    assert capture.embeddings.shape == (3, 16)
    capture.clear()
    model.train()
    with capture.silenced():
        model(x)
    assert capture.embeddings is None and capture.logits is None
    capture.remove()
    capture.remove()  # twice is fine
    assert not model._forward_hooks and not model.head._forward_pre_hooks


# --------------------------------------------------------------------------- requests
def _builder(seed=5, batch=4, dataset=None):
    data = dataset if dataset is not None else striped_data(8, 4, 0)
    return RequestBuilder(data, ValueSpace(None, None, (0.0, 1.0)), seed, batch, GRID), data


def test_requests_rotate_sources_take_r_from_the_curriculum_and_seed_from_the_request_id():
    builder, data = _builder()
    curriculum = ConstantCurriculum(0.7, 0.7, 100)
    plan = [PlannedPair((0, 1), 6, [0, 1, 2, 3, 4])]
    first = list(builder.build(plan, curriculum, step=3))
    assert [r.request_id for r in first] == [0, 1] and [len(r.ratios) for r in first] == [4, 2]
    assert [r.seed for r in first] == [request_seed(5, 0), request_seed(5, 1)] == [5_000_015, 5_000_016]
    assert torch.cat([r.source_ids for r in first]).tolist() == [0, 1, 2, 3, 4, 0]
    assert torch.equal(first[0].sources, torch.stack([data[i][0] for i in range(4)]).float())
    assert torch.cat([r.ratios for r in first]).tolist() == pytest.approx([0.7] * 6)
    assert curriculum.history[(0, 1)] == [(3, 0.7)]
    second = list(builder.build(plan, curriculum, step=4))
    assert torch.cat([r.source_ids for r in second]).tolist() == [1, 2, 3, 4, 0, 1]  # the cursor moved on
    bad = [PlannedPair((2, 3), 2, [0, 1], source_labels=[2])]
    with pytest.raises(HardNegError, match="one label per source id"):
        list(builder.build(bad, curriculum, step=5))
    assert builder.cursor.state_dict() == {"0,1": 2}  # a rejected plan leaves the cursor alone


def test_ada_requests_hold_every_source_at_every_grid_ratio():
    builder, _ = _builder(batch=10)
    curriculum = make_curriculum(HardNegConfig(num_classes=4, curriculum="ada", ada_grid=GRID))
    reqs = list(builder.build([PlannedPair((0, 1), 3, [0, 1, 2])], curriculum, step=0))
    assert [len(r.ratios) for r in reqs] == [10, 5]  # 10 // 5 = 2 sources per request
    assert reqs[0].source_ids.tolist() == [0] * 5 + [1] * 5
    assert reqs[0].ratios.tolist() == pytest.approx(list(GRID) * 2)
    assert builder.pop_ada_grid(0) == GRID and builder.pop_ada_grid(0) is None


# --------------------------------------------------------------------------- policy context
class RecordingPolicy(TargetingPolicy):
    name = "test-recording"
    seen: list = []

    def choose(self, context, budget):
        RecordingPolicy.seen.append(context)
        return []


def test_a_policy_reads_a_small_read_only_context_never_the_engine():
    register_policy("test-recording", lambda cfg: RecordingPolicy())
    try:
        data = striped_data(24, 4, 0)
        emb = torch.eye(6)[[0, 0, 1, 2]][data.labels] * 3 + torch.randn(len(data), 6, generator=torch.Generator().manual_seed(0))
        cfg = HardNegConfig(num_classes=4, targeting="test-recording", refresh_every=1000, async_refresh=False,
                            knn_k=4, sources_per_pair=5, top_pairs=2)
        with HardNeg(cfg, dataset=data, generator=lambda: None, start_worker=False) as engine:
            engine.observe(embeddings=emb, labels=data.labels, ids=torch.arange(len(data)))
            engine.refresh()
        (ctx,) = RecordingPolicy.seen
    finally:
        POLICIES._entries.pop("test-recording")
    assert isinstance(ctx, PolicyContext) and isinstance(ctx.bank, BankView)
    assert not hasattr(ctx.bank, "upsert") and not hasattr(ctx.bank, "remove")  # read-only
    assert ctx.num_classes == 4 and ctx.sources_per_pair == 5
    assert ctx.class_counts.tolist() == [24, 24, 24, 24] and len(ctx.bank) == 96
    assert {p.pair for p in ctx.pairs} == {(0, 1), (1, 0)}
    top = ctx.pairs[0]
    assert ctx.sources(top.pair) == top.source_ids and len(ctx.sources(top.pair, 2)) == 2
    assert set(data.labels[ctx.sources((top.b, top.a))].tolist()) == {top.b}  # the reverse pair's sources
    with pytest.raises(ValueError, match="budget"):
        RecordingPolicy().plan(ctx, -1)


def test_policy_context_without_a_bank_is_empty():
    ctx = PolicyContext(num_classes=3)
    ids, labels = ctx.known_samples()
    assert len(ids) == len(labels) == 0 and ctx.sources((0, 1)) == [] and ctx.pairs == ()


# --------------------------------------------------------------------------- GeNIe-Ada, one selection
def test_the_engine_and_genie_ada_pick_the_same_ratio_from_the_same_embeddings():
    gen = FillGenerator()
    sources = torch.stack([torch.full((1, 2, 2), 10.0 * i) for i in range(3)])
    encoder = jump_encoder({0: 0.6, 1: 0.8, 2: 0.9})
    mean = torch.tensor([0.0, 1.0])
    res = genie_ada(gen, encoder, sources, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long), mean,
                    grid=GRID)
    images = sources.repeat_interleave(len(GRID), 0) + torch.tensor(GRID).repeat(3).view(-1, 1, 1, 1)
    emb = F.normalize(encoder(images), dim=1)
    src = F.normalize(encoder(sources), dim=1)
    index, ratios, proj = ada_pick(emb, src, mean.unsqueeze(0), GRID)
    assert ratios.tolist() == pytest.approx([0.6, 0.8, 0.9]) == res.ratios.tolist()
    torch.testing.assert_close(proj, res.projections)
    assert index.tolist() == [1, 3, 4]



# --------------------------------------------------------------------------- a fixed refresh schedule
def test_refresh_at_refreshes_at_exactly_those_steps_and_deterministic_hands_images_over_at_once():
    from _engine_generators import BlendGenerator
    from hardneg.config import ConfigError

    data = striped_data(24, 4, 0)
    model = TinyNet()
    cfg = HardNegConfig(num_classes=4, refresh_at=[5, 2], deterministic=True, knn_k=4, sources_per_pair=6,
                        images_per_refresh=8, generation_batch=4, label_mode="hard", seed=0)
    assert cfg.refresh_at == (2, 5) and HardNegConfig.from_dict(cfg.to_dict()) == cfg
    refreshed_at, buffered = [], []
    with HardNeg(cfg, model=model, dataset=data, generator=BlendGenerator()) as engine:
        loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        for step, (x, y, idx) in zip(range(7), loader):
            before = engine.stats()["refreshes"]
            x, y, _ = engine.mix(x, y)
            engine.observe(labels=y, logits=model(x), ids=idx)
            if engine.stats()["refreshes"] > before:
                refreshed_at.append(engine.step)
                buffered.append(len(engine.buffer))
    assert refreshed_at == [2, 5]
    assert buffered[0] == 8  # deterministic: this refresh's images are in the buffer before the next step
    with pytest.raises(ConfigError, match="refresh_at"):
        HardNegConfig(num_classes=4, refresh_at=[0])
