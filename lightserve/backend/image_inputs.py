"""Image embeddings of a prefill batch, read from the cache manager's shared memory.

The visual server stores each image's embedding (float32 [token_num, hidden]) in the segment
named from its cache record; a request reaches the backend only once all of its images are
stored. A step packs its prompt chunks back to back; the rows of an image that fall inside a
chunk are placed at the chunk's packed rows, and the model writes the embeddings over those
placeholder rows (`ForwardState.image_embeds` / `image_rows`). Every tensor-parallel rank reads
the same full-width embeddings (they are added after the vocab-parallel lookup is reduced).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from lightserve.cache_manager import shm
from lightserve.io_struct import ImageItem

logger = logging.getLogger(__name__)


def read_embedding(prefix: str, record_id: int, token_num: int, hidden_size: int) -> Optional[torch.Tensor]:
    """The stored embedding of one record, or None if its segment is gone."""
    out = torch.empty(token_num, hidden_size, dtype=torch.float32)
    try:
        shm.read_into(shm.embed_name(prefix, record_id), out.numpy())
    except FileNotFoundError:
        return None
    return out


@dataclass
class ChunkImages:
    """The images of one prefill chunk: the chunk covers prompt positions [first, first + length)
    and its tokens start at `packed_row` of the step's input."""

    req_id: int
    images: list[ImageItem]
    first: int
    length: int
    packed_row: int


def gather_image_embeds(chunks: list[ChunkImages], shm_prefix: str, hidden_size: int, dtype: torch.dtype,
                        device: torch.device) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(embeds [N, hidden] in `dtype`, rows [N] int64 of the packed input) for every image
    position the chunks cover, or (None, None) when they cover none.

    An image may straddle two chunks: each chunk takes the rows of the embedding that fall inside it.

    A segment can only be missing when its request was aborted after the visual server had
    forwarded it (the httpserver then dropped the reference and the record may have been
    evicted): such a request's output is discarded, so its placeholders get zeros rather than
    failing the whole batch.
    """
    embeds, rows = [], []
    for chunk in chunks:
        end = chunk.first + chunk.length
        for img in chunk.images:
            lo, hi = max(img.token_start, chunk.first), min(img.token_start + img.token_num, end)
            if lo >= hi:
                continue
            emb = read_embedding(shm_prefix, img.record_id, img.token_num, hidden_size)
            if emb is None:
                logger.info("request %d: image record %d is gone (request aborted); placeholders zeroed",
                            chunk.req_id, img.record_id)
                emb = torch.zeros(img.token_num, hidden_size)
            embeds.append(emb[lo - img.token_start : hi - img.token_start])
            first_row = chunk.packed_row + lo - chunk.first
            rows.append(torch.arange(first_row, first_row + hi - lo))
    if not embeds:
        return None, None
    return torch.cat(embeds).to(device=device, dtype=dtype), torch.cat(rows).to(device)
