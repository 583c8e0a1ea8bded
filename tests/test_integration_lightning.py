"""Lightning adapter: real Trainer runs (CPU, a few steps) with the callback, the mixin and a resume."""

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

L = pytest.importorskip("lightning.pytorch")

from _toy_data import striped_data  # noqa: E402
from _fake_generators import FakeGenerator  # noqa: E402
from hardneg import HardNegConfig  # noqa: E402
from hardneg.integrations.lightning import HardNegCallback, HardNegLightningMixin  # noqa: E402
from hardneg.plugin import HardNegError  # noqa: E402

K = 4


def _toy_data(n_per_class=24, seed=0):
    return striped_data(n_per_class, K, seed, alike=True)


def _cfg(**kw):
    base = dict(num_classes=K, refresh_every=2, top_pairs=2, knn_k=4, sources_per_pair=4,
                images_per_refresh=8,
                generation_batch=4, buffer_size=64, synthetic_fraction=0.25, seed=0)
    base.update(kw)
    return HardNegConfig(**base)


class Net(L.LightningModule):
    """Tiny classifier; records the batch sizes and label sets its training_step saw."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, K)
        self.seen_sizes: list[int] = []
        self.seen_weights: list = []

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        self.seen_sizes.append(x.shape[0])
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MixinNet(HardNegLightningMixin, Net):
    def training_step(self, batch, batch_idx):
        assert isinstance(batch, tuple)
        x, y, idx = batch
        logits = self(x)
        self.seen_sizes.append(x.shape[0])
        self.seen_weights.append(self.hardneg_weights)
        return {"loss": self.hardneg_loss(F.cross_entropy(logits, y, reduction="none")), "logits": logits}


def _tuple_collate(items):
    return (torch.stack([i[0] for i in items]), torch.stack([i[1] for i in items]),
            torch.tensor([i[2] for i in items]))


def _trainer(tmp_path, **kw):
    base = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    base.update(kw)
    return L.Trainer(**base)


def _loader(data, batch_size=16, collate_fn=None, shuffle=True):
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0), collate_fn=collate_fn)


def test_fast_dev_run_observes_the_training_batch_and_stops_the_worker(tmp_path):
    torch.manual_seed(0)
    data = _toy_data()
    cb = HardNegCallback(_cfg(), dataset=data, generator=FakeGenerator())
    model = Net()
    trainer = _trainer(tmp_path, fast_dev_run=2, callbacks=[cb])
    trainer.fit(model, _loader(data), _loader(data, shuffle=False))
    s = cb.engine.stats()
    assert s["step"] == 2  # two training batches observed, validation batches not
    assert 16 <= s["bank_size"] <= 32
    assert s["worker"]["alive"] is False  # on_fit_end closed the worker


def test_max_steps_run_mixes_generated_negatives_into_list_batches(tmp_path):
    torch.manual_seed(0)
    data = _toy_data()
    # deterministic: images arrive at refreshes whatever the machine's load (the Trainer owns the loop)
    cb = HardNegCallback(_cfg(deterministic=True), generator=FakeGenerator())  # dataset from the train dataloader
    model = Net()
    trainer = _trainer(tmp_path, max_steps=30, callbacks=[cb], limit_val_batches=1, val_check_interval=3)
    trainer.fit(model, _loader(data), _loader(data, shuffle=False))
    s = cb.engine.stats()
    assert s["step"] == 30
    assert s["synthetic_used"] > 0
    assert max(model.seen_sizes) == 16 + 4  # batch of 16 + round(0.25 * 16) appended hard negatives
    assert s["refreshes"] >= 1
    pairs = {p.pair for p in cb.engine.confusions()}
    assert pairs & {(0, 1), (1, 0)}  # the look-alike classes are found
    assert cb.engine.dataset is data


def test_mixin_mixes_tuple_batches_and_exposes_weights(tmp_path):
    torch.manual_seed(0)
    data = _toy_data()
    cb = HardNegCallback(_cfg(synthetic_weight=0.5, deterministic=True), dataset=data, generator=FakeGenerator())
    model = MixinNet()
    trainer = _trainer(tmp_path, max_steps=30, callbacks=[cb], limit_val_batches=0)
    trainer.fit(model, _loader(data, collate_fn=_tuple_collate))
    assert cb.engine.stats()["synthetic_used"] > 0
    mixed = [w for w, n in zip(model.seen_weights, model.seen_sizes) if n > 16]
    assert mixed, "no mixed batch reached training_step"
    w = mixed[-1]
    assert w.shape == (20,) and torch.all(w[:16] == 1) and torch.all(w[16:] == 0.5)


def test_tuple_batches_without_the_mixin_fail_with_advice(tmp_path):
    data = _toy_data()
    cb = HardNegCallback(_cfg(), dataset=data, generator=FakeGenerator())
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[cb], limit_val_batches=0)
    with pytest.raises(HardNegError, match="HardNegLightningMixin"):
        trainer.fit(Net(), _loader(data, collate_fn=_tuple_collate))
    assert cb.engine.stats()["worker"]["alive"] is False  # on_exception stopped the worker


def test_batches_without_ids_fail_with_advice(tmp_path):
    data = _toy_data()
    pairs = torch.utils.data.TensorDataset(data.images, data.labels)
    cb = HardNegCallback(_cfg())
    with pytest.raises(HardNegError, match="sample ids"):
        _trainer(tmp_path, max_steps=1, callbacks=[cb], limit_val_batches=0).fit(Net(), _loader(pairs))


def test_resumed_fit_continues_from_the_saved_engine_state(tmp_path):
    torch.manual_seed(0)
    data = _toy_data()
    ckpt_dir = tmp_path / "ckpt"
    saver = L.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=6, save_top_k=-1)
    first = HardNegCallback(_cfg(), dataset=data, generator=FakeGenerator())
    _trainer(tmp_path, max_steps=6, callbacks=[first, saver], enable_checkpointing=True,
             limit_val_batches=0).fit(Net(), _loader(data))
    saved = first.engine.state_dict()
    ckpt = os.path.join(ckpt_dir, "epoch=0-step=6.ckpt")
    assert os.path.exists(ckpt)

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            seen["step"] = second.engine.step
            seen["bank_ids"] = sorted(second.engine.bank.state_dict()["ids"].tolist())
            seen["buffer"] = len(second.engine.buffer)

    second = HardNegCallback(_cfg(), dataset=data, generator=FakeGenerator())
    _trainer(tmp_path, max_steps=10, callbacks=[second, Probe()], limit_val_batches=0).fit(
        Net(), _loader(data), ckpt_path=ckpt)
    assert seen["step"] == 6
    assert seen["bank_ids"] == sorted(saved["bank"]["ids"].tolist())
    assert seen["buffer"] == len(first.engine.buffer)
    assert second.engine.step == 10  # 6 restored + 4 new steps


def test_soft_synthetic_labels_reach_the_loss_and_observe_gets_class_ids(tmp_path):
    from _engine_generators import make_result, spy_observe

    torch.manual_seed(0)
    data = _toy_data()
    seen_labels = []

    class Prefilled(HardNegCallback):
        """Puts 4 finished images of pair 0 -> 1 at r = 0.5 into the engine as soon as it is built."""

        def _build(self, pl_module, dataset):
            super()._build(pl_module, dataset)
            self.engine._accept([make_result(data.images[:4], (0, 1), 0.5)])
            seen_labels.append(spy_observe(self.engine))

    class SoftNet(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch[0], batch[1]
            logits = self(x)
            loss = F.cross_entropy(logits, y)  # takes (N, K) probability targets
            self.seen_weights.append((y.detach().clone(), logits.detach().clone(), loss.detach().clone()))
            return {"loss": loss, "logits": logits}

    # teacher="ema" too: the engine deep-copies the LightningModule inside a real fit and scores arrivals
    cb = Prefilled(_cfg(label_mode="soft-r", label_gamma=2.0, teacher="ema"), dataset=data)
    model = SoftNet()
    _trainer(tmp_path, max_steps=1, callbacks=[cb], limit_val_batches=0).fit(model, _loader(data))
    (y, logits, loss), = model.seen_weights
    assert y.shape == (20, K) and y.dtype == torch.float32
    assert bool(((y[:16] == 0) | (y[:16] == 1)).all()) and torch.equal(y[:16].sum(1), torch.ones(16))  # one-hot
    torch.testing.assert_close(y[16:], torch.tensor([[0.75, 0.25, 0.0, 0.0]] * 4))  # 0.5 ** 2 on the target
    torch.testing.assert_close(loss, -(y * F.log_softmax(logits, dim=1)).sum(1).mean())
    observed = seen_labels[0][0]
    assert observed.dtype == torch.int64 and observed[16:].tolist() == [1] * 4
    prov = cb.engine.buffer.provenance()
    assert bool(torch.isfinite(prov["teacher_p_target"]).all() & torch.isfinite(prov["model_p_target"]).all())
    assert cb.engine.stats()["synthetic_feedback"] == 4 and cb.engine.teacher.updates == 1
    assert getattr(cb.engine.teacher.module, "_trainer", None) is None  # the copy holds no trainer


def test_generated_rows_never_enter_or_overwrite_the_bank(tmp_path):
    from _bank_checks import assert_bank_holds_only_real_rows, record_head_inputs
    from _engine_generators import make_result

    torch.manual_seed(0)
    data = _toy_data()

    class Prefilled(HardNegCallback):
        def _build(self, pl_module, dataset):
            super()._build(pl_module, dataset)  # 4 images unlike any real one; their source ids are 0-3
            self.engine._accept([make_result(1 - data.images[:4], (0, 1), 0.5)])

    class IdNet(Net):
        def training_step(self, batch, batch_idx):
            self.seen_weights.append(batch[2].clone())  # the real rows' ids of this step
            return super().training_step(batch, batch_idx)

    cb = Prefilled(_cfg(label_mode="hard", refresh_every=1000), dataset=data)
    model = IdNet()
    seen, handle = record_head_inputs(model.head)
    _trainer(tmp_path, max_steps=2, callbacks=[cb], limit_val_batches=0).fit(model, _loader(data))
    handle.remove()
    assert model.seen_sizes == [20, 20]
    ids = torch.cat(model.seen_weights)
    assert_bank_holds_only_real_rows(cb.engine.bank, ids, torch.cat([e[:16] for e in seen]), data.labels[ids])
    assert cb.engine.stats()["synthetic_feedback"] == 8


def test_fit_resumed_with_ckpt_path_ends_where_the_uninterrupted_fit_ends(tmp_path):
    """deterministic=True: 12 steps equal 6 steps + ``fit(ckpt_path=...)`` to 12 (model, optimiser, engine)."""
    from _state_compare import state_differences

    def run(max_steps, ckpt_dir=None, ckpt_path=None):
        torch.manual_seed(0)
        data = _toy_data()
        cb = HardNegCallback(_cfg(deterministic=True), dataset=data, generator=FakeGenerator())
        end = {}

        class Probe(L.Callback):  # the engine's state at the last step, before on_fit_end stops the worker
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                if trainer.global_step == 12:
                    end["engine"] = cb.engine.state_dict()

        callbacks = [cb, Probe()]
        if ckpt_dir is not None:
            callbacks.append(L.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=6, save_top_k=-1))
        model = Net()
        trainer = _trainer(tmp_path, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=ckpt_dir is not None,
                           limit_val_batches=0)
        trainer.fit(model, _loader(data, shuffle=False), ckpt_path=ckpt_path)  # 6 batches an epoch
        return model, trainer, end

    whole_model, whole_trainer, whole = run(12, ckpt_dir=tmp_path / "ckpt")
    ckpt = os.path.join(tmp_path / "ckpt", "epoch=0-step=6.ckpt")
    assert os.path.exists(ckpt)
    model, trainer, resumed = run(12, ckpt_path=ckpt)
    assert trainer.global_step == 12 and resumed["engine"]["step"] == 12
    assert state_differences(whole_model.state_dict(), model.state_dict()) == []
    assert state_differences(whole_trainer.optimizers[0].state_dict(), trainer.optimizers[0].state_dict()) == []
    assert whole["engine"]["counters"]["synthetic_used"] > 0
    assert state_differences(whole["engine"], resumed["engine"]) == []
