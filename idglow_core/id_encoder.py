"""Multi-ID encoder (paper Fig. 2): k face embeddings -> one concatenated identity-token sequence.

Each identity's ArcFace embedding ``[id_dim]`` becomes ``N`` tokens ``[N, token_dim]`` (a 2-layer MLP), plus a
learned identity-slot embedding (slot j = the j-th reference, "Picture j" of the prompt), so the DiT can tell
the identities apart. The k identities of a sample are concatenated: ``[B, k*N, token_dim]``. Samples with
fewer identities are padded and masked (``mask`` True = a real token).

Example::

    enc = MultiIdEncoder(id_dim=512, token_dim=1024, tokens_per_id=8, max_ids=4)
    emb, emb_mask = pad_identities([e1, e3])       # [2, 3, 512], [2, 3]: sample 0 has 1 id, sample 1 has 3
    tokens, mask = enc(emb, emb_mask)              # [2, 24, 1024], [2, 24]
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from .errors import IncompatibleAdapterError, InputError

__all__ = ["MultiIdEncoder", "pad_identities", "expand_id_weights", "check_finite"]


def _embedding_dim_error(got: int, want: int) -> IncompatibleAdapterError:
    hint = (" The dlib backend gives 128-d embeddings; use the insightface backend (ArcFace, 512-d)."
            if got == 128 and want == 512 else
            " Use the face backend this adapter was trained with." if want != 512 else "")
    return IncompatibleAdapterError(f"Face embeddings have {got} dimensions but this adapter was trained on "
                                    f"{want}-d embeddings.{hint}")


def check_finite(values, what: str, fix: str) -> None:
    """Raise :class:`InputError` when ``values`` (tensor, array, number or sequence) holds NaN or inf.

    One NaN in one face embedding turns every identity token NaN and the generated image black; the message
    names the first bad entries (index tuples) so the user can find the input."""
    t = values.detach() if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=torch.float64)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        where = torch.nonzero(~torch.isfinite(t))[:5].tolist()
        raise InputError(f"{what} contain non-finite values (NaN or inf) at {where}"
                         f"{' ...' if int((~torch.isfinite(t)).sum()) > 5 else ''}. {fix}")


def pad_identities(embeddings: Sequence[torch.Tensor], max_ids: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-sample embeddings ``[k_i, d]`` into ``[B, K, d]`` (K = max k_i) and a bool mask ``[B, K]``.

    Raises :class:`InputError` for an empty sample, mixed dims, or (when given) ``k_i > max_ids``.
    """
    if not embeddings:
        raise InputError("No samples given: pass a list with one [k, d] embedding tensor per sample.")
    dims = {int(e.shape[-1]) for e in embeddings}
    if any(e.ndim != 2 or e.shape[0] < 1 for e in embeddings) or len(dims) != 1:
        raise InputError(f"Each sample needs a [k, d] tensor with k >= 1 and one common d; got shapes "
                         f"{[tuple(e.shape) for e in embeddings]}.")
    ks = [int(e.shape[0]) for e in embeddings]
    if max_ids is not None and max(ks) > max_ids:
        raise InputError(f"A sample has {max(ks)} identities but the adapter supports at most {max_ids}. "
                         f"Use at most {max_ids} reference faces or an adapter trained with a larger max_ids.")
    K, d = max(ks), dims.pop()
    out = embeddings[0].new_zeros(len(embeddings), K, d)
    mask = torch.zeros(len(embeddings), K, dtype=torch.bool, device=out.device)
    for b, e in enumerate(embeddings):
        out[b, : e.shape[0]] = e
        mask[b, : e.shape[0]] = True
    return out, mask


def expand_id_weights(id_weights: torch.Tensor, tokens_per_id: int) -> torch.Tensor:
    """Per-identity weights ``[B, K]`` -> per-token weights ``[B, K*N]`` (each weight repeated N times)."""
    if id_weights.ndim != 2:
        raise InputError(f"id_weights must be [B, K] (one weight per reference), got {tuple(id_weights.shape)}.")
    return id_weights.repeat_interleave(tokens_per_id, dim=1)


class MultiIdEncoder(nn.Module):
    """``[B, K, id_dim]`` embeddings (+ ``[B, K]`` mask) -> ``[B, K*N, token_dim]`` tokens + ``[B, K*N]`` mask.

    Token ``j*N + n`` is token n of identity j. Padded identities give zero tokens with mask False.
    """

    def __init__(self, id_dim: int = 512, token_dim: int = 1024, tokens_per_id: int = 8, max_ids: int = 4):
        super().__init__()
        if min(id_dim, token_dim, tokens_per_id, max_ids) < 1:
            raise InputError(f"MultiIdEncoder sizes must be >= 1, got id_dim={id_dim}, token_dim={token_dim}, "
                             f"tokens_per_id={tokens_per_id}, max_ids={max_ids}.")
        self.id_dim, self.token_dim, self.tokens_per_id, self.max_ids = id_dim, token_dim, tokens_per_id, max_ids
        self.proj = nn.Sequential(nn.Linear(id_dim, token_dim), nn.GELU(),
                                  nn.Linear(token_dim, tokens_per_id * token_dim))
        self.norm = nn.LayerNorm(token_dim)
        self.slot = nn.Parameter(torch.randn(max_ids, token_dim) * 0.02)  # identity-slot embedding

    def forward(self, embeddings: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """embeddings: ``[B, K, id_dim]`` (or ``[K, id_dim]`` for one sample); mask: ``[B, K]`` bool or None.

        Returns tokens ``[B, K*N, token_dim]`` and token mask ``[B, K*N]`` (bool).
        """
        if embeddings.ndim == 2:
            embeddings = embeddings[None]
            mask = None if mask is None else mask.reshape(1, -1)
        if embeddings.ndim != 3:
            raise InputError(f"Face embeddings must be [B, K, d] or [K, d], got {tuple(embeddings.shape)}.")
        B, K, d = embeddings.shape
        if d != self.id_dim:
            raise _embedding_dim_error(d, self.id_dim)
        if K > self.max_ids:
            raise InputError(f"{K} identities given but this adapter supports at most {self.max_ids}. Use at "
                             f"most {self.max_ids} reference faces or an adapter trained with a larger max_ids.")
        if K < 1:
            raise InputError("No identities given: pass at least one face embedding per sample.")
        if mask is None:
            mask = torch.ones(B, K, dtype=torch.bool, device=embeddings.device)
        if mask.shape != (B, K):
            raise InputError(f"Identity mask must be [B, K] = {(B, K)}, got {tuple(mask.shape)}.")
        mask = mask.to(device=embeddings.device, dtype=torch.bool)
        x = embeddings.to(self.slot.dtype)
        tokens = self.norm(self.proj(x).view(B, K, self.tokens_per_id, self.token_dim))
        tokens = tokens + self.slot[:K, None, :]                  # [B, K, N, D]
        tokens = tokens * mask[:, :, None, None].to(tokens.dtype)  # zero the padding
        token_mask = mask[:, :, None].expand(B, K, self.tokens_per_id)
        return tokens.reshape(B, K * self.tokens_per_id, self.token_dim), token_mask.reshape(B, -1)
