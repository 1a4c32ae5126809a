"""Pure-PyTorch reference of the authors' InfoNCE (one-directional), METHOD.md §8.

    q, k (and negatives) L2-normalised;  logits_ij = q_i . k_j / T;  loss = mean_i CE(logits_i, i)
    with negatives n_1..n_M ("unpaired"): logits_i = [q_i . k_i, q_i . n_1, ..., q_i . n_M] / T,
    target 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backend import check_embedding_pair, check_extra_rows, check_temperature

__all__ = ["infonce_loss_reference", "validate_infonce_inputs"]


def validate_infonce_inputs(query, key, *, temperature, negatives, check_values: bool = True) -> None:
    B, d = check_embedding_pair(query, key, "query", "key")
    check_temperature(temperature)
    if negatives is None:
        if B < 2:
            raise ValueError(f"infonce_loss without explicit negatives needs at least 2 pairs, got B={B}")
    else:
        check_extra_rows(negatives, query, d, "negatives", "queries")
        if B < 1:
            raise ValueError("infonce_loss needs at least one query")
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if check_values and not capturing:  # reads values on the host: skipped in CUDA-graph capture
        for name, t in (("query", query), ("key", key), ("negatives", negatives)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or inf")


def infonce_loss_reference(query, key, *, temperature=0.1, negatives=None, check: bool = True) -> torch.Tensor:
    """METHOD.md §8 InfoNCE; fp32 math (fp64 for fp64 inputs), scalar in fp32 for half inputs."""
    if check:
        validate_infonce_inputs(query, key, temperature=temperature, negatives=negatives)
    ct = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = F.normalize(query.to(ct), dim=-1)
    k = F.normalize(key.to(ct), dim=-1)
    T = float(temperature)
    if negatives is None:
        logits = q @ k.t() / T
        target = torch.arange(q.shape[0], device=q.device)
    else:
        n = F.normalize(negatives.to(ct), dim=-1)
        logits = torch.cat([(q * k).sum(-1, keepdim=True), q @ n.t()], dim=1) / T
        target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)
