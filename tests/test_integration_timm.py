import itertools
"""timm adapter: HardNegTimm in a loop shaped like timm's train.py (timm model, Mixup, soft-target loss)."""

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")
from timm.data import Mixup  # noqa: E402
from timm.loss import SoftTargetCrossEntropy  # noqa: E402

from _fake_generators import FakeGenerator  # noqa: E402
from hardneg import HardNegConfig  # noqa: E402
from hardneg.data import from_tensors  # noqa: E402
from hardneg.integrations.timm import HardNegTimm, IndexedDataset  # noqa: E402
from hardneg.plugin import HardNeg  # noqa: E402

K = 4


def _toy_data(n_per_class=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per_class)
    x = torch.rand(len(y), 1, 16, 16, generator=g) * 0.3
    for c in range(K):
        x[y == c, :, 4 * c : 4 * c + 4, :] += 0.7
    return from_tensors(x.clamp(0, 1), y)


def _engine(model, data, **kw):
    base = dict(num_classes=K, refresh_every=2, top_pairs=2, knn_k=4, sources_per_pair=4,
                images_per_refresh=8,
                generation_batch=4, buffer_size=64, synthetic_fraction=0.25, seed=0)
    base.update(kw)
    return HardNeg(HardNegConfig(**base), model=model, dataset=data, generator=FakeGenerator())


def test_train_py_shaped_loop_with_mixup_gets_hard_negatives_and_observes():
    torch.manual_seed(0)
    data = _toy_data()
    model = timm.create_model("test_resnet", num_classes=K, in_chans=1)
    mixup = Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=K)
    loss_fn = SoftTargetCrossEntropy()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    engine = _engine(model, data)
    mixup_fn = HardNegTimm(engine, mixup)  # line 1
    plain = torch.utils.data.TensorDataset(data.images, data.labels)  # a timm-style (input, target) dataset
    loader = torch.utils.data.DataLoader(IndexedDataset(plain), batch_size=16, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(0))
    model.train()
    seen = []
    batches = itertools.chain(loader, loader)  # two epochs of 4 batches: negatives arrive in the second
    for input, target, ids in batches:  # until a batch carries hard negatives
        if len(seen) == 4:  # refreshes have run: wait for their images instead of racing the threads
            engine.wait_for_refresh(120)
            assert engine.wait_for_images(4, 120), "no hard negatives arrived"
        input, target = mixup_fn(input, target)
        output = model(input)
        loss = loss_fn(output, target)
        mixup_fn.after_forward(output, target, ids)  # line 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen.append((input.shape[0], target.shape))
        if input.shape[0] > 16:
            break
    mixup_fn.flush()  # the last step is observed after its backward: at the next call, flush() or close()
    s = engine.stats()
    engine.close()
    assert s["step"] == len(seen)
    assert s["bank_size"] == min(len(data), 16 * len(seen))  # ids from IndexedDataset reached the bank
    assert s["synthetic_used"] > 0
    assert s["synthetic_feedback"] == s["synthetic_used"]  # appended rows recognised as synthetic
    assert (20, torch.Size([20, K])) in seen  # 16 mixed-up real rows + 4 hard negatives, soft targets
    assert mixup_fn.weights.shape[0] == seen[-1][0]


def test_synthetic_rows_are_not_blended_and_keep_one_hot_targets():
    torch.manual_seed(0)
    data = _toy_data()
    model = timm.create_model("test_resnet", num_classes=K, in_chans=1)
    engine = _engine(model, data, refresh_every=1, synthetic_weight=0.5, label_mode="hard")
    mixup = Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=K)
    mixup_fn = HardNegTimm(engine, mixup)
    ids = torch.arange(0, 64, 4)  # 4 samples of each class
    x, y = data.images[ids], data.labels[ids]
    xm, ym = mixup_fn(x, y)
    mixup_fn.after_forward(model(xm), ym, ids)
    mixup_fn.flush()  # (backward would run here) observed now: refreshes, requests hard negatives
    engine.wait_for_refresh(120)  # wait for the refresh and the worker thread to fill the buffer
    assert engine.wait_for_images(4, 120)
    xm, ym = mixup_fn(x, y)
    engine.close()
    assert xm.shape[0] == 20
    syn = ym[16:]
    assert torch.all((syn == 0) | (syn == 1)) and torch.all(syn.sum(1) == 1)  # one-hot, not mixed
    assert torch.equal(mixup_fn.weights[16:], torch.full((4,), 0.5))
    per_sample = F.cross_entropy(torch.zeros(20, K), ym, reduction="none")
    assert mixup_fn.loss(per_sample) == pytest.approx(float(per_sample.mean()))  # all equal rows: same mean
    assert mixup_fn.mixup_enabled is True
    mixup_fn.mixup_enabled = False  # timm's --mixup-off-epoch switch reaches the wrapped Mixup
    assert mixup_fn.mixup_fn.mixup_enabled is False


def test_indexed_dataset_forwards_transform_like_timm_create_loader_sets_it():
    class Folder:
        transform = None

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return (self.transform(i) if self.transform else i), i % 2

    ds = IndexedDataset(Folder())
    ds.transform = lambda i: i * 10  # what timm.data.create_loader does
    assert ds.dataset.transform is ds.transform
    assert [ds[i] for i in range(3)] == [(0, 0, 0), (10, 1, 1), (20, 0, 2)]


def test_soft_synthetic_labels_reach_the_loss_and_observe_gets_class_ids():
    from _engine_generators import make_result, spy_observe

    torch.manual_seed(0)
    data = _toy_data()
    model = timm.create_model("test_resnet", num_classes=K, in_chans=1)
    engine = HardNeg(HardNegConfig(num_classes=K, label_mode="soft-r", label_gamma=2.0, synthetic_fraction=0.25,
                                   buffer_size=16, seed=0), model=model, dataset=data)
    seen = spy_observe(engine)
    ids = torch.arange(0, 64, 4)
    x, y = data.images[ids], data.labels[ids]
    soft_row = torch.tensor([0.75, 0.25, 0.0, 0.0])  # w = 0.5 ** 2 on target 1, the rest on source 0
    model.train()
    for mixup in (None, Mixup(mixup_alpha=1.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=K)):
        engine._accept([make_result(data.images[:4], (0, 1), 0.5)])
        mixup_fn = HardNegTimm(engine, mixup)
        xm, ym = mixup_fn(x, y)
        assert xm.shape[0] == 20 and ym.shape == (20, K)
        torch.testing.assert_close(ym[16:], soft_row.expand(4, K))
        output = model(xm)
        want = -(ym * F.log_softmax(output, dim=1)).sum(1).mean()
        torch.testing.assert_close(SoftTargetCrossEntropy()(output, ym), want)  # train.py's mixup loss
        torch.testing.assert_close(mixup_fn.soft_loss(output, ym), want)
        mixup_fn.after_forward(output, ym, ids)
        mixup_fn.flush()
        assert seen[-1].dtype == torch.int64 and seen[-1][16:].tolist() == [1] * 4  # the target, not the argmax
    engine.close()
    assert engine.stats()["synthetic_feedback"] == 8


def test_generated_rows_never_enter_or_overwrite_the_bank():
    from _bank_checks import assert_bank_holds_only_real_rows, record_head_inputs
    from _engine_generators import make_result

    torch.manual_seed(0)
    data = _toy_data()
    model = timm.create_model("test_resnet", num_classes=K, in_chans=1)
    engine = HardNeg(HardNegConfig(num_classes=K, label_mode="hard", synthetic_fraction=0.25, refresh_every=1000,
                                   seed=0), model=model, dataset=data)
    engine._accept([make_result(1 - data.images[:4], (0, 1), 0.5)])  # unlike any real image; source ids 0-3
    mixup_fn = HardNegTimm(engine)
    seen, handle = record_head_inputs(model.get_classifier())
    model.train()
    all_ids = []
    for ids in (torch.arange(0, 64, 4), torch.arange(1, 64, 4)):  # two mixed steps; id 0 among the real rows
        xm, ym = mixup_fn(data.images[ids], data.labels[ids])
        assert xm.shape[0] == 20
        mixup_fn.after_forward(model(xm), ym, ids)
        all_ids.append(ids)
    mixup_fn.flush()
    handle.remove()
    ids = torch.cat(all_ids)
    assert_bank_holds_only_real_rows(engine.bank, ids, torch.cat([e[:16] for e in seen]), data.labels[ids])
    assert engine.stats()["synthetic_feedback"] == 8
    engine.close()
