"""The visual server: encodes the images of requests, then forwards the requests to the router.

Loop: take every waiting message (GenerateReq with images, AbortReq); ask the cache manager
which of the waiting requests' images lack embeddings; encode up to
`--visual_infer_batch_size` of them in one batch (each record once, however many requests
share it, in arrival order); store the embeddings in shared memory; forward every request
whose images are all encoded. A request whose image cannot be read or encoded ends with an
error sent to the detokenizer (as the router does for refusals); the server keeps serving
everyone else. Images encoded are counted by the cache manager (`stats().images_encoded`,
one per stored embedding), which every process of the instance can query.

Aborts: a request still waiting here is dropped. An abort for a request already forwarded is
relayed to the router over the same socket as the request, so it cannot overtake it (the
httpserver's own abort to the router travels on another socket and may arrive first).
The cache references of a request belong to the httpserver, which releases them when the
request ends, aborted or not.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from multiprocessing.connection import Connection

import torch
import zmq

from lightserve.backend.device import resolve_device, resolve_dtype
from lightserve.cache_manager.client import CacheClient
from lightserve.io_struct import BatchTokenOut, FinishReason, GenerateReq, TokenOut
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.inbox import drain
from lightserve.utils.process import run_child
from lightserve.utils.run_paths import RunPaths
from lightserve.visual.encoder import VisionEncoder
from lightserve.visual.spec import load_image

logger = logging.getLogger(__name__)


class VisualManager:
    def __init__(self, args: ServerArgs, paths: RunPaths, model_dir: str):
        device = resolve_device(args.device)
        self.encoder = VisionEncoder(model_dir, resolve_dtype(args.data_type, device), device)
        self.batch_size = max(1, args.visual_infer_batch_size)
        self.cache = CacheClient(paths)
        ctx = zmq.Context()
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.bind(paths.visual_in)
        self.to_router = ctx.socket(zmq.PUSH)
        self.to_router.connect(paths.router_in)
        self.to_detok = ctx.socket(zmq.PUSH)  # errors of requests that never reach the router
        self.to_detok.connect(paths.detok_in)
        self.pending: OrderedDict[int, GenerateReq] = OrderedDict()
        self.images_encoded = 0

    def loop(self) -> None:
        while True:
            self.receive(block=not self.pending)
            if self.pending:
                self.step()

    def receive(self, block: bool) -> None:
        for msg in drain(self.inbox, serde.VISUAL_IN, block):
            if isinstance(msg, GenerateReq):
                self.pending[msg.req_id] = msg
            elif self.pending.pop(msg.req_id, None) is None:  # an AbortReq for a forwarded request
                self.to_router.send(serde.dumps(msg))

    def step(self) -> None:
        """Fail the broken requests, encode one batch, forward the requests that are ready."""
        ids = list(dict.fromkeys(img.record_id for req in self.pending.values() for img in req.images))
        status = dict(zip(ids, self.cache.status(ids)))
        ready = {rid for rid, s in status.items() if s.embed_ready}
        batch: list[int] = []
        for req in list(self.pending.values()):
            if not all(status[img.record_id].exists and status[img.record_id].data_ready for img in req.images):
                self.fail(req, "an image of this request is no longer in the image cache")
                continue
            for img in req.images:
                if img.record_id not in ready and img.record_id not in batch and len(batch) < self.batch_size:
                    batch.append(img.record_id)
        if batch:
            ready |= self.encode(batch)
        for req in list(self.pending.values()):
            if all(img.record_id in ready for img in req.images):
                del self.pending[req.req_id]
                self.to_router.send(serde.dumps(req))

    def encode(self, record_ids: list[int]) -> set[int]:
        """Encode and store these records' images; returns the ids stored. Requests whose image
        failed are ended here."""
        images, decoded = [], []
        for rid in record_ids:
            try:
                images.append(load_image(self.cache.read_data(rid)))
                decoded.append(rid)
            except Exception as exc:  # corrupt bytes must end their requests, not this process
                self.fail_record(rid, f"cannot decode image: {exc}")
        if not decoded:
            return set()
        try:
            embeds = self.encoder.encode(images)
        except Exception as exc:
            logger.exception("visual: encoding a batch of %d images failed", len(decoded))
            for rid in decoded:
                self.fail_record(rid, f"image encoding failed: {exc}")
            return set()
        rows = embeds.cpu().contiguous()
        stored = self.cache.store_embeds([(rid, memoryview(rows[i].numpy()).cast("B")) for i, rid in enumerate(decoded)])
        self.images_encoded += sum(stored)
        for rid, ok in zip(decoded, stored):
            if not ok:
                self.fail_record(rid, "could not store the image embedding (image cache full)")
        logger.debug("visual: encoded %d images (%d in all)", len(decoded), self.images_encoded)
        return {rid for rid, ok in zip(decoded, stored) if ok}

    def fail_record(self, record_id: int, why: str) -> None:
        for req in [r for r in self.pending.values() if any(img.record_id == record_id for img in r.images)]:
            self.fail(req, why)

    def fail(self, req: GenerateReq, why: str) -> None:
        """End a request with an error, through the detokenizer like every other output."""
        self.pending.pop(req.req_id, None)
        self.to_detok.send(serde.dumps(req))  # it must know the request before its output
        error = TokenOut(req.req_id, -1, 0.0, FinishReason.ABORT, prompt_tokens=len(req.prompt_ids), error=why)
        self.to_detok.send(serde.dumps(BatchTokenOut([error])))


def start_visual_process(args: ServerArgs, paths: RunPaths, model_dir: str, pipe: Connection) -> None:
    def setup():
        # The visual server shares the cores with the backend ranks; half of them is its share.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
        manager = VisualManager(args, paths, model_dir)
        spec = manager.encoder.spec
        return manager.loop, {"image_token_id": spec.image_token_id, "tokens_per_image": spec.tokens_per_image}

    run_child("visual", pipe, args.log_level, setup)
