"""Input embeddings: BERT's text embeddings and ViLBERT's region embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvl import _checks
from fastvl.nn.common import LayerNorm


class TextEmbeddings(nn.Module):
    """BERT's embeddings: ``dropout(LN(word + position + token_type))``.

    Parameters: ``word_embeddings`` [vocab, hidden], ``position_embeddings`` [max_positions, hidden],
    ``token_type_embeddings`` [type_vocab, hidden], ``norm``.
    ``forward(input_ids [B, L] long, token_type_ids [B, L] long | None (= 0), position_ids [B, L] |
    [L] | None (= 0..L-1), insert_after_first [B, K, hidden] | None)`` -> ``[B, L (+ K), hidden]``;
    ``insert_after_first`` is spliced in after the first token before the LayerNorm (ViLBERT's task
    token: no position or type embedding added to it).
    """

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, dropout: float = 0.1, eps: float = 1e-12, pad_token_id: int = 0):
        super().__init__()
        self.dropout = dropout
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, hidden_size)
        self.norm = LayerNorm(hidden_size, eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                insert_after_first: torch.Tensor | None = None) -> torch.Tensor:
        _checks.tensor("input_ids", input_ids, shape="[B, L] int64", ndim=2, dtypes=(torch.int64, torch.int32))
        length = input_ids.shape[1]
        if position_ids is None and length > self.position_embeddings.num_embeddings:  # (packed rows pass positions)
            raise ValueError(f"input_ids has {length} tokens, more than max_position_embeddings "
                             f"({self.position_embeddings.num_embeddings})")
        if token_type_ids is not None:
            _checks.tensor("token_type_ids", token_type_ids, shape="[B, L] int64", ndim=2,
                           dtypes=(torch.int64, torch.int32))
            _checks.same_shape("token_type_ids", token_type_ids, list(input_ids.shape), "[B, L] like input_ids")
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)
        embedded = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if insert_after_first is None:
            embedded = self.norm(self.token_type_embeddings(token_type_ids), embedded)
        else:
            embedded = embedded + self.token_type_embeddings(token_type_ids)
            embedded = torch.cat([embedded[:, :1], insert_after_first.to(embedded.dtype), embedded[:, 1:]], dim=1)
            embedded = self.norm(embedded)
        return F.dropout(embedded, self.dropout, self.training)


class RegionEmbeddings(nn.Module):
    """ViLBERT's region embeddings (``BertImageEmbeddings``):
    ``dropout(LN(image_embeddings(feature) + image_location_embeddings(location)))``; no position or
    type embedding.

    Parameters: ``image_embeddings`` (Linear feature_size (2048) -> v_hidden),
    ``image_location_embeddings`` (Linear 5 -> v_hidden), ``norm``.
    ``forward(features [B, Lv, feature_size], locations [B, Lv, 5])``: locations are
    ``[x1/W, y1/H, x2/W, y2/H, box area / image area]``, all in [0, 1]. Region 0 is by convention the
    IMG token the data collator builds (mean of the real regions' features, location [0, 0, 1, 1, 1]);
    this module embeds whatever it is given.
    """

    def __init__(self, feature_size: int = 2048, hidden_size: int = 1024, location_size: int = 5,
                 dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        self.dropout = dropout
        self.image_embeddings = nn.Linear(feature_size, hidden_size)
        self.image_location_embeddings = nn.Linear(location_size, hidden_size)
        self.norm = LayerNorm(hidden_size, eps)

    def forward(self, features: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        width, loc_width = self.image_embeddings.in_features, self.image_location_embeddings.in_features
        _checks.tensor("region_feats", features, shape=f"[B, Lv, {width}]", ndim=3)
        if features.shape[-1] != width:
            raise ValueError(f"region_feats must have shape [B, Lv, {width}] (feature width {width}), "
                             f"got {list(features.shape)}")
        _checks.tensor("region_loc", locations, shape=f"[B, Lv, {loc_width}]", ndim=3)
        _checks.same_shape("region_loc", locations, [*features.shape[:2], loc_width],
                           f"[B, Lv, {loc_width}] with B, Lv of region_feats")
        embedded = self.norm(self.image_embeddings(features),
                             self.image_location_embeddings(locations.to(features.dtype)))
        return F.dropout(embedded, self.dropout, self.training)
