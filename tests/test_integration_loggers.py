"""Engine counters reach each trainer's own loggers: transformers' log_history (and so every
report_to logger), Accelerate trackers, Lightning loggers."""

import csv

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _toy_data import striped_data
from _fake_generators import FakeGenerator
from hardneg import HardNegConfig
from hardneg.integrations._common import flat_stats

K = 4


def _data(n_per_class=16, seed=0):
    return striped_data(n_per_class, K, seed)


def _cfg(**kw):
    base = dict(num_classes=K, refresh_every=2, top_pairs=2, knn_k=4, sources_per_pair=4, images_per_refresh=8,
                generation_batch=4, buffer_size=64, synthetic_fraction=0.25, seed=0)
    base.update(kw)
    return HardNegConfig(**base)


def test_flat_stats_keeps_every_numeric_counter():
    stats = {"observed": 3, "mean_r": None, "synthetic_accuracy": 0.5, "pair_r": {"0->1": 0.7},
             "buffer": {"size": 2, "pairs": {"0->1": 2}, "mean_r": 0.6},
             "worker": {"alive": True, "state": "running", "images_produced": 4, "last_error": None}}
    assert flat_stats(stats) == {"hardneg/observed": 3.0, "hardneg/synthetic_accuracy": 0.5,
                                 "hardneg/buffer/size": 2.0, "hardneg/buffer/mean_r": 0.6,
                                 "hardneg/worker/alive": 1.0, "hardneg/worker/images_produced": 4.0}


def test_transformers_log_history_gets_the_hardneg_counters(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hardneg.integrations.transformers import HardNegTrainer, HardNegTrainerCallback, WithSampleIds

    class DictImages(torch.utils.data.Dataset):
        def __init__(self):
            self.data = _data()

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            return {"pixel_values": self.data.images[i], "labels": int(self.data.labels[i])}

    torch.manual_seed(0)
    vit = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=K)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=6,
                                          per_device_train_batch_size=8, logging_steps=2, save_strategy="no",
                                          disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = HardNegTrainer(model=transformers.ViTForImageClassification(vit), args=args,
                             train_dataset=WithSampleIds(DictImages()),
                             hardneg=HardNegTrainerCallback(_cfg(), generator=FakeGenerator()))
    trainer.train()
    steps = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in steps] == [2, 4, 6]  # the Trainer's logging_steps
    for entry in steps:
        assert entry["hardneg/step"] == entry["step"]  # one engine step per training batch
        for key in ("hardneg/observed", "hardneg/requests_made", "hardneg/buffer/size",
                    "hardneg/worker/images_produced", "hardneg/engine_fraction"):
            assert key in entry


def test_accelerate_trackers_receive_the_counters(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.tracking import GeneralTracker

    from hardneg.integrations.accelerate import HardNegAccelerate

    class ListTracker(GeneralTracker):
        name = "list"
        requires_logging_directory = False
        logged: list = []

        def __init__(self, run_name="hardneg"):
            super().__init__()
            self.run_name = run_name

        @property
        def tracker(self):
            return self.logged

        def store_init_configuration(self, values):
            pass

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    torch.manual_seed(0)
    tracker = ListTracker()
    accelerator = accelerate.Accelerator(cpu=True, log_with=[tracker], project_dir=str(tmp_path))
    accelerator.init_trackers("hardneg-test")
    data = _data()
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, K))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    model, opt, loader = accelerator.prepare(model, opt, loader)
    hn = HardNegAccelerate(accelerator, _cfg(), model=model, dataset=data, generator=FakeGenerator(),
                           log_every_n_steps=2)
    for x, y, idx in loader:
        x, y, w = hn.mix(x, y)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        hn.observe(labels=y, logits=logits, ids=idx)
    hn.close()
    accelerator.end_training()
    assert [step for step, _ in tracker.logged] == [2, 4]  # 4 batches, every 2 engine steps
    values = tracker.logged[-1][1]
    assert values["hardneg/step"] == 4 and values["hardneg/observed"] == 64
    assert {"hardneg/requests_made", "hardneg/buffer/size", "hardneg/world_size"} <= set(values)


def test_accelerate_without_trackers_logs_nothing():
    accelerate = pytest.importorskip("accelerate")
    from hardneg.integrations.accelerate import HardNegAccelerate

    accelerator = accelerate.Accelerator(cpu=True)
    calls = []
    accelerator.log = lambda *a, **k: calls.append(a)  # would be a no-op anyway; must not even be asked
    hn = HardNegAccelerate(accelerator, _cfg(), log_every_n_steps=1)
    hn.observe(labels=torch.arange(8) % K, ids=torch.arange(8), embeddings=torch.randn(8, 4))
    hn.close()
    assert calls == []


def test_lightning_csv_logger_gets_every_counter_on_the_trainers_log_steps(tmp_path, monkeypatch):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger
    import hardneg.integrations.lightning as hl

    sent = []  # what the callback handed to log_dict at each log step (counters measured by then)
    monkeypatch.setattr(hl, "flat_stats", lambda stats: sent.append(flat_stats(stats)) or sent[-1])

    from hardneg.integrations.lightning import HardNegCallback

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, K))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch[0], batch[1]
            logits = self(x)
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = _data()
    cb = HardNegCallback(_cfg(), dataset=data, generator=FakeGenerator())
    logger = CSVLogger(str(tmp_path), name="run")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=8, log_every_n_steps=3, logger=logger,
                        callbacks=[cb], enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=str(tmp_path))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(Net(), loader)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("hardneg/step")]
    assert [float(r["hardneg/step"]) for r in logged] == [3, 6]  # Trainer(log_every_n_steps=3)
    assert len(sent) == 2
    # every counter the engine had measured at the log step, not a handful (a ratio such as
    # synthetic_accuracy is left out until it is measured, which depends on when images arrive)
    want = set(sent[-1])
    assert len(want) > 20 and want <= set(rows[0])
    assert set(flat_stats(cb.engine.stats())) - want <= {"hardneg/synthetic_accuracy"}
    assert float(logged[-1]["hardneg/observed"]) == 6 * 16
