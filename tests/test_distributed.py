"""hardneg.distributed without a process group: RowGather's packing and row-count agreement,
SharedWorker's "anything ready?" gate (a counting single-process communicator stands in)."""

import torch

from hardneg.distributed import LocalCommunicator, RowGather, SharedWorker


class Counting(LocalCommunicator):
    def __init__(self):
        super().__init__()
        self.calls = {"all_gather": 0, "all_reduce": 0, "objects": 0}

    def all_gather(self, tensor):
        self.calls["all_gather"] += 1
        return tensor

    def all_reduce_sum(self, tensor):
        self.calls["all_reduce"] += 1
        return tensor

    def broadcast_objects(self, objects, src=0):
        self.calls["objects"] += 1
        return objects


def test_rows_travel_exactly_and_one_all_gather_serves_a_steady_batch_size():
    comm = Counting()
    rows = RowGather(comm)
    ids = torch.tensor([2**40 + 3, 5, 2**31 + 7, 0, 11, 12])  # not representable in float32
    emb, logits = torch.randn(8, 4), torch.randn(8, 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1, 2])
    out = rows.gather(emb, labels, logits, ids, 6, [(0, 1), (1, 2)])
    assert comm.calls["all_gather"] == 2  # first step: agree on a row count, then the rows
    e, lab, lg, real_ids, pairs = out
    assert torch.equal(e, emb) and torch.equal(lg, logits) and torch.equal(lab, labels)
    assert torch.equal(real_ids, ids) and pairs == [(0, 1), (1, 2)]
    rows.gather(emb, labels, logits, ids, 6, [(0, 1), (1, 2)])
    assert comm.calls["all_gather"] == 3  # then one per step
    rows.gather(torch.randn(12, 4), torch.zeros(12, dtype=torch.long), torch.randn(12, 3), torch.arange(12), 12, [])
    assert comm.calls["all_gather"] == 5  # a larger batch: once more with room for it


class _Ready:
    failed = False

    def __init__(self):
        self.ready = []

    def poll(self):
        out, self.ready = self.ready, []
        return out


def test_shared_worker_exchanges_results_only_when_some_rank_has_any():
    comm = Counting()
    comm.world = 2  # the gate's all_reduce runs for world > 1 (the counting stand-in sums nothing)
    real = _Ready()
    shared = SharedWorker(comm, real, "main")
    for _ in range(5):
        shared.sync()
    assert comm.calls["all_reduce"] == 5 and comm.calls["objects"] == 0 and shared.exchanges == 0
    real.ready = ["result"]
    shared.sync()
    assert comm.calls["objects"] == 1 and shared.poll() == ["result"]
