"""A plain PyTorch loop on the built-in digits with the two hardneg lines.

    python examples/plain_loop_digits.py --max-steps 150

``mix`` before the forward adds ready hard negatives (never waits for the generator);
``observe`` after it records embeddings (captured by a forward hook), labels, logits and sample
ids, re-mines the confused class pairs every ``--refresh-every`` steps and asks the background
worker for GeNIe negatives of those pairs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from hardneg.plugin import HardNeg  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = _common.parser(__doc__).parse_args(argv)
    started = time.perf_counter()
    train, test = _common.digits(args)
    model = _common.SmallCNN(train.num_classes)
    gen = _common.generator(args, train)
    engine = HardNeg(_common.config(args, train.num_classes, gen), model=model, class_names=train.class_names,
                     dataset=train, generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    step = 0
    try:
        while step < args.max_steps:
            for x, y, idx in loader:                              # idx: dataset sample ids
                x, y, w = engine.mix(x, y)                        # hardneg line 1
                logits = model(x)
                loss = (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                engine.observe(labels=y, logits=logits.detach(), ids=idx)   # hardneg line 2
                step += 1
                if step >= args.max_steps:
                    break
        return _common.summary("plain", engine, model, test, started)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
