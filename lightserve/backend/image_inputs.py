"""Image embeddings of a prefill batch, read from the cache manager's shared memory.

The visual server stores each image's embedding (float32 [token_num, hidden]) in the segment
named from its cache record; a request reaches the backend only once all of its images are
stored. Prefill packs the requests back to back, so image j of request i covers the packed rows
`b_start[i] + token_start + [0, token_num)`; the model writes the embeddings over those
placeholder rows (`ForwardState.image_embeds` / `image_rows`). Every tensor-parallel rank reads
the same full-width embeddings (they are added after the vocab-parallel lookup is reduced).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from lightserve.cache_manager import shm
from lightserve.io_struct import GenerateReq

logger = logging.getLogger(__name__)


def read_embedding(prefix: str, record_id: int, token_num: int, hidden_size: int) -> Optional[torch.Tensor]:
    """The stored embedding of one record, or None if its segment is gone."""
    out = torch.empty(token_num, hidden_size, dtype=torch.float32)
    try:
        shm.read_into(shm.embed_name(prefix, record_id), out.numpy())
    except FileNotFoundError:
        return None
    return out


def gather_image_embeds(reqs: list[GenerateReq], b_start: list[int], shm_prefix: str, hidden_size: int,
                        dtype: torch.dtype, device: torch.device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(embeds [N, hidden] in `dtype`, rows [N] int64 of the packed input) for every image of
    the batch, or (None, None) when no request has images.

    A segment can only be missing when its request was aborted after the visual server had
    forwarded it (the httpserver then dropped the reference and the record may have been
    evicted): such a request's output is discarded, so its placeholders get zeros rather than
    failing the whole batch.
    """
    embeds, rows = [], []
    for req, start in zip(reqs, b_start):
        for img in req.images:
            emb = read_embedding(shm_prefix, img.record_id, img.token_num, hidden_size)
            if emb is None:
                logger.info("request %d: image record %d is gone (request aborted); placeholders zeroed",
                            req.req_id, img.record_id)
                emb = torch.zeros(img.token_num, hidden_size)
            embeds.append(emb)
            first = start + img.token_start
            rows.append(torch.arange(first, first + img.token_num))
    if not embeds:
        return None, None
    return torch.cat(embeds).to(device=device, dtype=dtype), torch.cat(rows).to(device)
