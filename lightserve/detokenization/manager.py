"""The detokenization process: token ids from the router -> text deltas for the httpserver.

Stop strings are matched here, on text; a request that meets one is aborted in the router
from here too (an `AbortReq` on the router's inbox), so its KV is freed without a detour
through the httpserver.
"""

from __future__ import annotations

import logging
from multiprocessing.connection import Connection

import zmq

from lightserve.detokenization.incremental import IncrementalDetokenizer
from lightserve.io_struct import AbortReq, BatchTextOut, FinishReason, GenerateReq, TextOut, TokenOut
from lightserve.server_args import ServerArgs
from lightserve.utils import serde
from lightserve.utils.inbox import drain
from lightserve.utils.process import run_child
from lightserve.utils.run_paths import RunPaths
from lightserve.utils.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


class TextAssembler:
    """Turns one request's TokenOuts into TextOuts: incremental text, stop strings, finish.

    Used by the detokenization process and by the offline `LLM`, so both end requests alike.
    """

    def __init__(self, tokenizer, req: GenerateReq):
        self.tokenizer = tokenizer
        self.detok = IncrementalDetokenizer(tokenizer, req.prompt_ids, skip_special_tokens=True, stop=req.sampling.stop)
        self.special_ids = set(tokenizer.all_special_ids)
        self.prompt_ids = req.prompt_ids
        self.completion_tokens = 0

    def apply(self, out: TokenOut) -> TextOut:
        if out.error is not None:
            return TextOut(out.req_id, "", out.token_id, 0.0, finish_reason=FinishReason.ABORT,
                           prompt_tokens=out.prompt_tokens, error=out.error)
        self.completion_tokens += 1
        step = self.detok.step(out.token_id)
        text, reason = step.text, out.finish_reason
        if step.stopped:
            reason = FinishReason.STOP
        elif reason is not None:
            text += self.detok.finish()
            if self.detok.stopped:  # a stop string completed only in the flushed tail
                reason = FinishReason.STOP
        # A scored prompt's tokens each decoded on its own, as `token_text` is (one batched call).
        prompt_texts = [] if out.prompt_logprobs is None else self.tokenizer.batch_decode([[t] for t in self.prompt_ids])
        return TextOut(
            req_id=out.req_id, text=text, token_id=out.token_id, logprob=out.logprob,
            token_text=self.tokenizer.decode([out.token_id]), special=out.token_id in self.special_ids,
            finish_reason=reason, prompt_tokens=out.prompt_tokens, cached_tokens=out.cached_tokens,
            completion_tokens=self.completion_tokens,
            top_logprobs=out.top_logprobs, seed=out.seed,
            prompt_logprobs=out.prompt_logprobs, prompt_token_texts=prompt_texts,
        )


class DetokenizationManager:
    def __init__(self, args: ServerArgs, paths: RunPaths, tokenizer_dir: str):
        self.tokenizer = load_tokenizer(tokenizer_dir)
        ctx = zmq.Context()
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.bind(paths.detok_in)
        self.to_http = ctx.socket(zmq.PUSH)
        self.to_http.connect(paths.http_in)
        # Only this process sees stop strings: it tells the router itself, which frees the
        # request's KV at its next step.
        self.to_router = ctx.socket(zmq.PUSH)
        self.to_router.connect(paths.router_in)
        self.requests: dict[int, TextAssembler] = {}

    def loop(self) -> None:
        while True:
            for msg in drain(self.inbox, serde.DETOK_IN, block=True):
                if isinstance(msg, GenerateReq):
                    self.requests[msg.req_id] = TextAssembler(self.tokenizer, msg)
                elif isinstance(msg, AbortReq):
                    self.requests.pop(msg.req_id, None)
                else:  # BatchTokenOut
                    self.handle(msg.outs)

    def handle(self, outs: list[TokenOut]) -> None:
        """Text for the httpserver; a request that met a stop string is aborted in the router."""
        texts = []
        for out in outs:
            assembler = self.requests.get(out.req_id)
            if assembler is None:  # aborted or already stopped; the router drops it shortly
                continue
            text = assembler.apply(out)
            if text.finish_reason is not None:
                del self.requests[out.req_id]
            if text.finish_reason is FinishReason.STOP:
                self.to_router.send(serde.dumps(AbortReq(out.req_id)))
            texts.append(text)
        if texts:
            self.to_http.send(serde.dumps(BatchTextOut(texts)))


def start_detokenization_process(args: ServerArgs, paths: RunPaths, tokenizer_dir: str, pipe: Connection) -> None:
    def setup():
        manager = DetokenizationManager(args, paths, tokenizer_dir)
        return manager.loop, {}

    run_child("detokenization", pipe, args.log_level, setup)
