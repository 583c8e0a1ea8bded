"""Subprocess for tests/test_checkpoint.py: writes checkpoints until the test SIGKILLs it.

``python _checkpoint_writer.py PATH loop``: ``save_atomic`` a large checkpoint to PATH over and over
(generation 1, 2, ...), each a tensor filled with its generation number.
``python _checkpoint_writer.py PATH engine``: build a seeded engine, observe 6 steps and
``HardNeg.save`` it to PATH, with ``torch.save`` slowed down: it writes half the bytes, creates
PATH.started and hangs, so the kill lands mid-write for certain.
"""

import io
import sys
import time

import torch


def main(path: str, mode: str) -> None:
    if mode == "loop":
        from hardneg.checkpoint import save_atomic

        payload = torch.empty(4 * 1024 * 1024)  # 16 MB per write
        gen = 0
        while True:
            gen += 1
            payload.fill_(gen)
            save_atomic({"generation": gen, "payload": payload}, path)
    elif mode == "engine":
        from hardneg import HardNeg, HardNegConfig

        real_save = torch.save

        def half_then_hang(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            open(path + ".started", "w").close()  # tells the test: the write is under way
            time.sleep(3600)

        torch.save = half_then_hang
        engine = HardNeg(HardNegConfig(num_classes=4, refresh_every=100, seed=0))
        g = torch.Generator().manual_seed(1)
        for step in range(6):
            engine.observe(torch.randn(8, 5, generator=g), torch.arange(8) % 4, ids=torch.arange(8) + 8 * step)
        engine.save(path)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
