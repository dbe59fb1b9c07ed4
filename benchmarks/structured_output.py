"""Structured output on the embedded SmolLM2: validity of constrained answers, and the step cost.

1. Validity: 50 prompts over 5 JSON schemas (nested objects, enums, arrays, bounded numbers,
   required fields), greedy and sampled; dates, e-mail addresses and a choice list by regex.
   Reports the share of answers that parse and validate with `jsonschema` (or match in full).
2. Speed: a B=64 batch decoding with every request constrained by a JSON schema against the same
   batch unconstrained, median decode step of each, in the same run. The schema holds a string
   of at least 400 characters, so no constrained request can end inside the timed steps and both
   batches stay at 64 rows.

    python benchmarks/structured_output.py                 # bf16, both parts
    python benchmarks/structured_output.py --skip-validity --steps 48
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import jsonschema

from lightserve import LLM, SamplingParams
from lightserve.io_struct import Chunk, GenerateReq, Grammar, StepPlan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.structured_cases import CHOICES, REGEXES, SCHEMAS, TOPICS, json_prompt  # noqa: E402

LONG_TEXT = {"type": "object", "properties": {"story": {"type": "string", "minLength": 400, "maxLength": 4000}},
             "required": ["story"]}


def chat_prompt(llm: LLM, text: str) -> list[int]:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=True)["input_ids"]


def validity(llm: LLM) -> None:
    for temperature in (0.0, 0.8):
        ok = total = 0
        t0 = time.perf_counter()
        prompts, params, schemas = [], [], []
        for name, schema in SCHEMAS.items():
            for k, topic in enumerate(TOPICS):
                prompts.append(chat_prompt(llm, json_prompt(name, topic)))
                params.append(SamplingParams(max_new_tokens=256, temperature=temperature, seed=k,
                                             grammar=Grammar("json_schema", json.dumps(schema))))
                schemas.append(schema)
        for out, schema in zip(llm.generate(prompts, params), schemas):
            total += 1
            try:
                jsonschema.validate(json.loads(out.outputs[0].text), schema)
                ok += 1
            except (ValueError, jsonschema.ValidationError) as exc:
                print(f"  invalid ({out.outputs[0].finish_reason}): {out.outputs[0].text!r}: {exc}")
        print(f"JSON schemas, temperature {temperature}: {ok}/{total} answers parse and validate "
              f"({time.perf_counter() - t0:.1f} s)")
    for kind, name, text in [("regex", "date", REGEXES["date"]), ("regex", "email", REGEXES["email"]),
                             ("choice", "choice", json.dumps(CHOICES))]:
        params = [SamplingParams(max_new_tokens=40, temperature=t, seed=i, grammar=Grammar(kind, text))
                  for i, t in enumerate([0.0] * 5 + [1.0] * 15)]
        prompts = [chat_prompt(llm, f"Give one {name} (#{i}).") for i in range(len(params))]
        answers = [o.outputs[0].text for o in llm.generate(prompts, params)]
        full = sum(bool(a in CHOICES if kind == "choice" else re.fullmatch(text, a)) for a in answers)
        print(f"{name}: {full}/{len(answers)} full matches, e.g. {answers[:3]}")


def decode_step_ms(llm: LLM, grammar: Grammar | None, batch: int, steps: int) -> float:
    engine = llm.engine
    reqs = [GenerateReq(req_id=10_000 + i, prompt_ids=chat_prompt(llm, f"Tell story number {i} about a ship."),
                        sampling=SamplingParams(max_new_tokens=steps + 8, temperature=1.0, seed=i, ignore_eos=True,
                                                grammar=grammar))
            for i in range(batch)]
    assert not engine.admit(reqs)
    engine.sample(engine.forward(StepPlan(chunks=[Chunk(r.req_id, len(r.prompt_ids)) for r in reqs])))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step(StepPlan(decode=True))
        times.append(time.perf_counter() - t0)
        assert engine.num_running == batch, "a request ended inside the timed steps"
    engine.release([r.req_id for r in reqs])
    return 1e3 * statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--skip-validity", action="store_true")
    args = parser.parse_args()
    llm = LLM(data_type=args.dtype, max_total_token_num=args.batch * 512, running_max_req_size=max(64, args.batch))
    if not args.skip_validity:
        validity(llm)
    grammar = Grammar("json_schema", json.dumps(LONG_TEXT))
    plain = decode_step_ms(llm, None, args.batch, args.steps)
    constrained = decode_step_ms(llm, grammar, args.batch, args.steps)
    plain_again = decode_step_ms(llm, None, args.batch, args.steps)
    base = (plain + plain_again) / 2
    print(f"B={args.batch} decode step, median of {args.steps - 2}: unconstrained {plain:.1f} / {plain_again:.1f} ms, "
          f"every row under a JSON schema {constrained:.1f} ms -> {100 * (constrained / base - 1):+.1f} %")


if __name__ == "__main__":
    main()
