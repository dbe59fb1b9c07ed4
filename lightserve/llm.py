"""`LLM`: offline, in-process generation over the same engine and scheduler as the server."""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import msgspec
from tqdm import tqdm

from lightserve.backend.engine import ModelEngine
from lightserve.detokenization.manager import TextAssembler
from lightserve.io_struct import FinishReason, GenerateReq, PromptLogprobs, SamplingParams
from lightserve.router.scheduler import Scheduler
from lightserve.server_args import ServerArgs
from lightserve.utils.grammar import compile_grammar
from lightserve.utils.tokenizer import load_tokenizer

Prompt = Union[str, list[int]]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str]  # "length" | "eos_token" | "stop_sequence"
    logprobs: list[float] = field(default_factory=list)

    @property
    def cumulative_logprob(self) -> float:
        return sum(self.logprobs)


@dataclass
class RequestOutput:
    request_id: int
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    seed: Optional[int] = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache, not computed
    prompt_logprobs: Optional[PromptLogprobs] = None  # with `SamplingParams.prompt_logprobs`

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    """Generate from a model directory (default: the embedded SmolLM2-135M-Instruct).

    Keyword arguments are `ServerArgs` fields (`data_type`, `device`, `attention_backend`,
    `max_total_token_num`, `max_req_total_len`, `running_max_req_size`, ...).
    """

    def __init__(self, model_dir: Optional[str] = None, **server_args: Any):
        from lightserve.utils.embedded_model import embedded_model_dir

        self.args = ServerArgs(model_dir=model_dir, **server_args)
        self.model_dir = str(model_dir or embedded_model_dir())
        self.tokenizer = load_tokenizer(self.args.tokenizer_dir or self.model_dir)
        self.engine = ModelEngine(self.args, self.model_dir)
        self.scheduler = Scheduler.for_server(self.args, self.engine, self.engine.mem.size)
        self.queue = self.scheduler.queue
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs in the order of `prompts`."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling params")
        reqs = [self._make_request(p, sp) for p, sp in zip(prompts, params_list)]
        for r in reqs:
            self.scheduler.add(r)
        return self._run(reqs, prompts, use_tqdm)

    def reset_prefix_cache(self) -> None:
        """Drop every prefix-cache entry that no running request uses (between `generate` calls: all)."""
        self.scheduler.flush_cache()
        while self.scheduler.has_work:
            self.scheduler.step()

    def _make_request(self, prompt: Prompt, params: SamplingParams) -> GenerateReq:
        params.validate()
        if params.grammar is not None:
            compile_grammar(params.grammar)  # a bad one raises here, as the server answers 400
        ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
        why = self.queue.check_request_fits(len(ids), params.max_new_tokens)
        if why is not None:
            raise ValueError(why)
        if params.seed is None and not params.is_greedy:
            params = msgspec.structs.replace(params, seed=secrets.randbits(63))
        return GenerateReq(req_id=next(self._ids), prompt_ids=ids, sampling=params)

    def _run(self, reqs: list[GenerateReq], prompts: Sequence[Prompt], use_tqdm: bool) -> list[RequestOutput]:
        results = {
            r.req_id: RequestOutput(r.req_id, p if isinstance(p, str) else None, r.prompt_ids,
                                    [CompletionOutput(0, "", [], None)], r.sampling.seed)
            for r, p in zip(reqs, prompts)
        }
        assemblers = {r.req_id: TextAssembler(self.tokenizer, r) for r in reqs}
        pending = set(results)
        bar = tqdm(total=len(reqs), desc="generate", disable=not use_tqdm)
        while pending:
            for out in self.scheduler.step():
                if out.req_id not in pending:
                    continue
                text = assemblers[out.req_id].apply(out)
                results[out.req_id].num_cached_tokens = out.cached_tokens
                if out.prompt_logprobs is not None:
                    results[out.req_id].prompt_logprobs = out.prompt_logprobs
                completion = results[out.req_id].outputs[0]
                completion.text += text.text
                completion.token_ids.append(out.token_id)
                completion.logprobs.append(out.logprob)
                if text.finish_reason is not None:
                    completion.finish_reason = text.finish_reason.value
                    pending.discard(out.req_id)
                    bar.update(1)
                    if text.finish_reason is FinishReason.STOP:
                        self.scheduler.abort(out.req_id)  # a stop string: free its KV now
        bar.close()
        return [results[r.req_id] for r in reqs]
