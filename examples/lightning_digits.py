"""Lightning on the built-in digits with online GeNIe hard negatives: one callback.

    python examples/lightning_digits.py --max-steps 150
    python examples/lightning_digits.py --max-steps 200 --resume     # continue from the last checkpoint

``HardNegCallback`` builds the engine on the LightningModule when fit starts, mixes ready hard
negatives into each training batch (the default collate makes lists of ``(image, label, index)``
items, which it edits in place), observes embeddings/logits/ids after each training batch, and
saves its state in every Lightning checkpoint. ``training_step`` returns its logits so the
engine also sees softmax confusion. For tuple batches or loss weights, see
``HardNegLightningMixin`` in ``hardneg.integrations.lightning``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, Sequence

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from hardneg.integrations.lightning import HardNegCallback  # noqa: E402


class DigitsModule(L.LightningModule):
    def __init__(self, num_classes: int, lr: float) -> None:
        super().__init__()
        self.model = _common.SmallCNN(num_classes)
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict:
        x, y, _ = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss, "logits": logits}  # "logits" feeds the engine's softmax confusion

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y, _ = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--resume", action="store_true", help="continue from OUT/lightning/last.ckpt")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint every N steps")
    args = p.parse_args(argv)
    started = time.perf_counter()
    train, test = _common.digits(args)
    gen = _common.generator(args, train)
    callback = HardNegCallback(_common.config(args, train.num_classes, gen), class_names=train.class_names,
                               dataset=train, generator=gen)
    ckpt_dir = os.path.join(args.out, "lightning")
    saver = L.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=args.ckpt_every,
                                        save_top_k=-1)
    trainer = L.Trainer(max_steps=args.max_steps, accelerator="cpu", devices=1, callbacks=[callback, saver],
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=min(50, args.max_steps), check_val_every_n_epoch=None,
                        limit_val_batches=2, num_sanity_val_steps=0, default_root_dir=args.out)
    module = DigitsModule(train.num_classes, args.lr)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    last = os.path.join(ckpt_dir, "last.ckpt")
    ckpt = last if args.resume and os.path.exists(last) else None
    trainer.fit(module, loader, DataLoader(test, batch_size=256), ckpt_path=ckpt)
    return _common.summary("lightning", callback.engine, module, test, started, resumed_from=ckpt)


if __name__ == "__main__":
    main()
