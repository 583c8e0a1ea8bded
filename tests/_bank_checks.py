"""Checks that a mixed batch's generated rows never reach the embedding bank (shared by the adapter tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def record_head_inputs(head: torch.nn.Module) -> tuple[list[torch.Tensor], object]:
    """Record the input of ``head`` (the embedding the engine captures) on every training-mode forward."""
    seen: list[torch.Tensor] = []

    def keep(module, args):
        if module.training:
            seen.append(args[0].detach().flatten(1).float().clone())

    return seen, head.register_forward_pre_hook(keep)


def assert_bank_holds_only_real_rows(bank, ids, real_embeddings, real_labels) -> None:
    """The bank holds exactly ``ids``, each with its own real row's vector (L2-normalised) and label:
    no generated row was stored, and none overwrote a real sample's entry."""
    ids = torch.as_tensor(ids).long()
    stored_ids = torch.as_tensor(bank.ids_and_labels()[0])
    assert sorted(stored_ids.tolist()) == sorted(ids.tolist()), "the bank holds other ids than the real rows'"
    vectors, labels = bank.get(ids)
    got, want = torch.as_tensor(labels).long(), torch.as_tensor(real_labels).long()
    assert torch.equal(got, want), f"stored labels differ from the real rows' at ids {ids[got != want].tolist()}"
    torch.testing.assert_close(torch.as_tensor(vectors).float(), F.normalize(real_embeddings.float(), dim=1),
                               atol=1e-5, rtol=1e-4)
