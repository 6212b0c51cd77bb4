"""Padded <-> packed (cu_seqlens) helpers shared by the attention and co-attention tests."""

import torch


def prefix_mask(lengths, length, device):
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).to(device)


def pack(padded, lengths):
    return torch.cat([padded[i, :n] for i, n in enumerate(lengths)])


def cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)
