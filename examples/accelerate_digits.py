"""A plain 🤗 Accelerate loop on the built-in digits with online GeNIe hard negatives.

    python examples/accelerate_digits.py --max-steps 150                       # one process
    torchrun --nproc_per_node 2 examples/accelerate_digits.py --cpu            # two CPU processes (gloo)
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_digits.py   # two GPUs
    python examples/accelerate_digits.py --max-steps 200 --resume             # continue from OUT/accelerate

``HardNegAccelerate`` keeps one engine per process and feeds each the batch gathered from all
processes, so every rank holds the same embedding bank and finds the same confused pairs; the
generator runs on the main process (``--generate-on main``, images broadcast) or on every
process (``--generate-on all``, requests split, images gathered). ``register_for_checkpointing``
puts the engine state into ``accelerator.save_state``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

from hardneg.integrations.accelerate import HardNegAccelerate  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--generate-on", choices=["main", "all"], default="main")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/accelerate (accelerator.load_state)")
    p.add_argument("--cpu", action="store_true", help="force the CPU even when a GPU is present")
    args = p.parse_args(argv)
    started = time.perf_counter()
    accelerator = Accelerator(cpu=args.cpu)
    train, test = _common.digits(args)
    model = _common.SmallCNN(train.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))
    model, opt, loader = accelerator.prepare(model, opt, loader)
    # With --generate-on main only the main process needs the generator (others receive its images).
    gen = _common.generator(args, train) if args.generate_on == "all" or accelerator.is_main_process else None
    hn = HardNegAccelerate(accelerator, _common.config(args, train.num_classes, gen), model=model,
                           class_names=train.class_names, dataset=train, generator=gen,
                           generate_on=args.generate_on)
    accelerator.register_for_checkpointing(hn)
    state_dir = os.path.join(args.out, "accelerate")
    if args.resume and os.path.isdir(state_dir):
        accelerator.load_state(state_dir)  # model, optimizer, RNG and the hardneg engine
    try:
        step = hn.engine.step
        while step < args.max_steps:
            for x, y, idx in loader:                      # idx: global dataset sample ids
                x, y, w = hn.mix(x, y)                    # hardneg line 1 (collective)
                logits = model(x)
                loss = (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum()
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
                hn.observe(labels=y, logits=logits, ids=idx)   # hardneg line 2 (collective)
                step += 1
                if step >= args.max_steps:
                    break
        accelerator.save_state(state_dir)
        result = _common.summary(f"accelerate rank {accelerator.process_index}/{accelerator.num_processes}",
                                 hn.engine, accelerator.unwrap_model(model), test, started,
                                 world_size=accelerator.num_processes)
    finally:
        hn.close()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
