"""Vectorised sampling: greedy, filters, seeded reproducibility, penalties and logprobs."""

from __future__ import annotations

import math
from typing import Optional

import msgspec
import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lightserve.backend.sampling import (
    PenaltyState,
    SamplingBatch,
    mix64,
    sample,
    sampling_weights,
    uniforms,
)
from lightserve.io_struct import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def distinct_logits(rows: int, vocab: int, gen: torch.Generator, scale: float = 3.0) -> torch.Tensor:
    """Random logits without ties inside a row (ties would make top-k/top-p sets order-dependent)."""
    out = torch.empty(rows, vocab)
    ramp = torch.arange(vocab) * 1e-4  # larger than a float32 ulp at these magnitudes
    for r in range(rows):
        values = torch.randn(vocab, generator=gen).sort().values * scale + ramp
        out[r] = values[torch.randperm(vocab, generator=gen)]
    return out


def request_logits(request: int, step: int, vocab: int) -> torch.Tensor:
    """The model output of one request at one step: depends on nothing else, whatever the batch."""
    return torch.randn(vocab, generator=torch.Generator().manual_seed(request * 7919 + step)) * 2.5


def steps_of(n: int, step: int) -> torch.Tensor:
    return torch.full((n,), step, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------------


def splitmix64_output(z: int) -> int:
    """Reference finaliser on Python integers (exact unsigned 64-bit arithmetic)."""
    mask = (1 << 64) - 1
    z &= mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_mix64_matches_unsigned_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    edges = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63)])
    values = torch.cat([torch.randint(-(2**63), 2**63 - 1, (200,), generator=gen), edges])
    got = mix64(values).tolist()
    for v, g in zip(values.tolist(), got):
        assert g & ((1 << 64) - 1) == splitmix64_output(v)


def test_uniforms_are_the_splitmix64_stream_in_open_unit_interval() -> None:
    keys = mix64(torch.tensor([5, 5, 5, 123456789], dtype=torch.int64))
    steps = torch.tensor([0, 1, 2, 0], dtype=torch.int64)
    u = uniforms(keys, steps)
    gamma = 0x9E3779B97F4A7C15
    for key, step, value in zip(keys.tolist(), steps.tolist(), u.tolist()):
        bits = splitmix64_output(key + (step + 1) * gamma) >> 41
        assert value == (bits + 0.5) / 2**23
    big = uniforms(mix64(torch.arange(100_000, dtype=torch.int64)), torch.zeros(100_000, dtype=torch.int64))
    assert 0.0 < float(big.min()) and float(big.max()) < 1.0
    assert abs(float(big.mean()) - 0.5) < 0.005


# ---------------------------------------------------------------------------------------------
# Greedy and degenerate filters
# ---------------------------------------------------------------------------------------------


def test_greedy_is_max_and_logprob_is_log_softmax() -> None:
    logits = distinct_logits(8, 1000, torch.Generator().manual_seed(1))
    batch = SamplingBatch.build([GREEDY] * 8, list(range(8)), [[1, 2]] * 8, 1000, "cpu")
    result = sample(logits, batch, steps_of(8, 0))
    assert torch.equal(result.next_ids, logits.argmax(1))
    expected = torch.log_softmax(logits, 1).gather(1, result.next_ids[:, None]).squeeze(1)
    torch.testing.assert_close(result.logprobs, expected)
    assert result.top_ids is None and result.top_logprobs is None


def test_top_k_one_and_tiny_top_p_equal_greedy() -> None:
    vocab = 2000
    params = [SamplingParams(temperature=1.3, top_k=1), SamplingParams(temperature=0.9, top_p=1e-6), GREEDY]
    batch = SamplingBatch.build(params * 4, list(range(12)), [[0]] * 12, vocab, "cpu")
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        logits = distinct_logits(12, vocab, gen)
        assert torch.equal(sample(logits, batch, steps_of(12, step)).next_ids, logits.argmax(1))


def test_greedy_rows_see_penalties() -> None:
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.5]])
    params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    batch = SamplingBatch.build([params], [0], [[0]], 4, "cpu")
    assert int(sample(logits, batch, steps_of(1, 0)).next_ids) == 1  # 3.0 / 2 < 2.9


# ---------------------------------------------------------------------------------------------
# Seeded reproducibility
# ---------------------------------------------------------------------------------------------

TARGETS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.2, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=50, top_p=0.9, logprobs=3),
    SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4),
]
OTHERS = [
    GREEDY,
    SamplingParams(temperature=0.5, top_k=3),
    SamplingParams(temperature=1.5, top_p=0.5, frequency_penalty=1.0),
    SamplingParams(temperature=2.0, logprobs=5),
]
TARGET_ID, TARGET_SEED = 1000, 4242


def run_in_batch(target: SamplingParams, vocab: int, n_steps: int, others: list[int], target_row: int) -> list[int]:
    """The target request's tokens when it runs with the requests `others` (ids into OTHERS)."""
    ids = list(others)
    ids.insert(target_row, TARGET_ID)
    params = [target if i == TARGET_ID else OTHERS[i % len(OTHERS)] for i in ids]
    seeds = [TARGET_SEED if i == TARGET_ID else 17 * i + 1 for i in ids]
    batch = SamplingBatch.build(params, seeds, [[i % vocab, 3, 5] for i in ids], vocab, "cpu")
    tokens = []
    for step in range(n_steps):
        logits = torch.stack([request_logits(i, step, vocab) for i in ids])
        tokens.append(int(sample(logits, batch, steps_of(len(ids), step)).next_ids[target_row]))
    return tokens


@pytest.mark.parametrize("target", TARGETS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
def test_same_seed_same_tokens_whatever_the_batch(target: SamplingParams) -> None:
    vocab = 1003  # not a multiple of any vector width
    alone = run_in_batch(target, vocab, 12, [], 0)
    assert run_in_batch(target, vocab, 12, [0, 1, 2, 3], 2) == alone
    assert run_in_batch(target, vocab, 12, [3, 2, 1, 0, 5, 6, 7], 7) == alone
    assert run_in_batch(target, vocab, 12, [2, 2, 1], 0) == alone


def test_same_seed_same_tokens_full_vocabulary() -> None:
    """At a real vocabulary size a parallel reduction over one row rounds differently than over
    many rows; the choice must not depend on it."""
    target = SamplingParams(temperature=1.0, top_p=0.9, top_k=0, repetition_penalty=1.1)
    alone = run_in_batch(target, 49152, 3, [], 0)
    assert run_in_batch(target, 49152, 3, list(range(16)), 9) == alone


def test_filtered_weights_of_a_row_do_not_depend_on_the_batch() -> None:
    """Bit for bit, at a real vocabulary size (where one-row reductions split across threads)."""
    vocab = 49152
    scaled = torch.stack([request_logits(i, 0, vocab) for i in range(17)])
    top_k = torch.tensor([0, 40, 0, 200] * 4 + [0])
    top_p = torch.tensor([1.0, 0.9, 0.8, 1.0] * 4 + [0.95])
    shifted = scaled - scaled.max(1, keepdim=True).values
    batched = sampling_weights(shifted.clone(), top_k, top_p)
    for r in (0, 1, 2, 3, 16):
        alone = sampling_weights(shifted[r : r + 1].clone(), top_k[r : r + 1], top_p[r : r + 1])
        assert torch.equal(alone[0], batched[r])
        assert torch.equal(alone.cumsum(1)[0], batched[r : r + 1].cumsum(1)[0])


def test_same_seed_same_tokens_across_filter_and_merge() -> None:
    vocab, n_steps = 500, 10
    target = TARGETS[-1]  # with penalties: their history must follow the row
    alone = run_in_batch(target, vocab, n_steps, [], 0)

    ids = [0, TARGET_ID, 1, 2]
    params = [target if i == TARGET_ID else OTHERS[i] for i in ids]
    seeds = [TARGET_SEED if i == TARGET_ID else 17 * i + 1 for i in ids]
    batch = SamplingBatch.build(params, seeds, [[i % vocab, 3, 5] for i in ids], vocab, "cpu")
    tokens = []
    for step in range(n_steps):
        if step == 3:  # requests 0 and 2 finish; the target moves to row 0
            keep = torch.tensor([1, 3])
            batch, ids = batch.filter(keep), [ids[1], ids[3]]
        if step == 6:  # new requests join in front
            new = [3, 1]
            fresh = SamplingBatch.build([OTHERS[i] for i in new], [99, 98], [[7], [8, 9]], vocab, "cpu")
            batch, ids = SamplingBatch.merge(fresh, batch), new + ids
        logits = torch.stack([request_logits(i, step, vocab) for i in ids])
        tokens.append(int(sample(logits, batch, steps_of(len(ids), step)).next_ids[ids.index(TARGET_ID)]))
    assert tokens == alone


def test_different_seeds_give_different_tokens() -> None:
    vocab = 300
    params = SamplingParams(temperature=1.0)
    batch = SamplingBatch.build([params, params], [1, 2], [[0], [0]], vocab, "cpu")
    runs = [[], []]
    for step in range(20):
        logits = request_logits(0, step, vocab).expand(2, vocab).contiguous()
        ids = sample(logits, batch, steps_of(2, step)).next_ids.tolist()
        runs[0].append(ids[0])
        runs[1].append(ids[1])
    assert runs[0] != runs[1]


# ---------------------------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------------------------


def chi_square_bound(dof: int, z: float = 4.5) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at z standard deviations
    (z = 4.5: a correct sampler fails with probability ~3e-6)."""
    c = 2.0 / (9.0 * dof)
    return dof * (1.0 - c + z * math.sqrt(c)) ** 3


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """transformers' temperature -> top-k -> top-p warpers, as probabilities (float64)."""
    scores = (logits / p.temperature)[None]
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return torch.softmax(scores[0].double(), 0)


DISTRIBUTIONS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.7, top_k=4),
    SamplingParams(temperature=1.0, top_p=0.7),
    SamplingParams(temperature=0.8, top_k=6, top_p=0.8),
]


@pytest.mark.parametrize("params", DISTRIBUTIONS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}")
@pytest.mark.parametrize("vary", ["seed", "step"])
def test_empirical_distribution_matches(params: SamplingParams, vary: str) -> None:
    """Many draws of one distribution: across seeds in one batch, or along one request's steps."""
    n, logits = 20_000, torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5, 1.2, 0.7, -3.0, 0.4])
    vocab = logits.numel()
    seeds = list(range(n)) if vary == "seed" else [777] * n
    steps = torch.zeros(n, dtype=torch.int64) if vary == "seed" else torch.arange(n)
    batch = SamplingBatch.build([params] * n, seeds, [[] for _ in range(n)], vocab, "cpu")
    ids = sample(logits.expand(n, vocab).contiguous(), batch, steps).next_ids

    counts = torch.bincount(ids, minlength=vocab).double()
    expected = reference_probs(logits, params) * n
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was sampled"
    chi2 = float((((counts - expected) ** 2)[kept] / expected[kept]).sum())
    assert chi2 < chi_square_bound(int(kept.sum()) - 1), (counts.tolist(), expected.tolist())


@pytest.mark.parametrize("case", range(12))
def test_filters_keep_the_same_tokens_as_transformers(case: int) -> None:
    gen = torch.Generator().manual_seed(100 + case)
    vocab = [50, 700, 3000][case % 3]
    rows = 6
    scaled = distinct_logits(rows, vocab, gen, scale=[1.0, 3.0, 8.0][case % 3])
    top_k = torch.tensor([0, 1, 5, 40, 0, vocab - 1])[torch.randperm(rows, generator=gen)]
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.99, 0.2, 0.999])[torch.randperm(rows, generator=gen)]
    weights = sampling_weights(scaled - scaled.max(1, keepdim=True).values, top_k, top_p)
    for r in range(rows):
        p = SamplingParams(temperature=1.0, top_k=int(top_k[r]), top_p=float(top_p[r]))
        expected = reference_probs(scaled[r], p)
        assert torch.equal(weights[r] > 0, expected > 0), f"row {r}: {p}"
        # Relative: the tail tokens (down to ~e^-55 here) must keep their own tiny probabilities.
        torch.testing.assert_close((weights[r] / weights[r].sum()).double(), expected, rtol=1e-5, atol=0.0)


def test_ties_at_a_cut_are_all_kept() -> None:
    """Top-k and top-p are thresholds: a value tied with the last kept one is kept too, so the
    kept set never depends on how a sort orders ties (transformers' TopKLogitsWarper agrees)."""
    row = [0.0, -1.0, -5.0, -1.0, -1.0]
    cases = [  # (top_k, top_p, kept)
        (2, 1.0, [True, True, False, True, True]),  # the tie straddles the k-th place
        (2, 0.5, [True, True, False, True, True]),  # ... and the nucleus ends inside the tie
        (2, 0.4, [True, False, False, False, False]),
        (0, 0.5, [True, True, False, True, True]),  # no top-k: the histogram path
        (4, 0.5, [True, True, False, True, True]),  # top-k holds the whole tie: candidate path
    ]
    shifted = torch.tensor([row] * len(cases))
    top_k = torch.tensor([c[0] for c in cases])
    top_p = torch.tensor([c[1] for c in cases])
    together = sampling_weights(shifted, top_k, top_p)
    for r, (k, p, kept) in enumerate(cases):
        alone = sampling_weights(shifted[r : r + 1], top_k[r : r + 1], top_p[r : r + 1])
        assert (alone[0] > 0).tolist() == kept, (k, p)
        assert torch.equal(alone[0], together[r])
    hf = TopKLogitsWarper(2)(None, shifted[:1].clone())
    assert (hf[0] > float("-inf")).tolist() == cases[0][2]


def test_nucleus_survives_rounding_between_its_two_sums() -> None:
    """The bucket masses (summed in vocabulary order) say the first bucket reaches top_p, but the
    same tokens re-summed in decreasing order fall one ulp short: the whole bucket is kept, and
    nothing below it (the last token carries ~1e-10 of the mass, far less than 1 - top_p)."""
    row = [0.0, -0.013807828538119793, -0.023170914500951767, -0.0034086480736732483]
    row += [-0.01660149171948433, -0.01802346669137478, -0.015776125714182854, -23.0]
    weights = sampling_weights(torch.tensor([row]), torch.tensor([0]), torch.tensor([1 - 2**-24]))
    assert (weights[0] > 0).tolist() == [True] * 7 + [False]


# ---------------------------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------------------------

PENALTY_PARAMS = [
    SamplingParams(repetition_penalty=1.5),
    SamplingParams(repetition_penalty=0.7, presence_penalty=0.3),
    SamplingParams(frequency_penalty=0.8),
    SamplingParams(presence_penalty=-0.4, frequency_penalty=1.1, repetition_penalty=1.2),
    SamplingParams(),  # neutral row in a penalised batch
]


def penalty_case(vocab: int = 64) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (5, 9, 1, 14, 3)]
    outputs = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (7, 0, 12, 4, 6)]
    return prompts, outputs, torch.randn(5, vocab, generator=gen) * 4


def openai_penalised(logits: torch.Tensor, output: list[int], p: SamplingParams) -> torch.Tensor:
    counts = torch.bincount(torch.tensor(output, dtype=torch.int64), minlength=logits.numel()).float()
    return logits - counts * p.frequency_penalty - (counts > 0).float() * p.presence_penalty


def hf_repetition(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    input_ids = torch.tensor([prompt + output], dtype=torch.int64)
    return RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, logits[None].clone())[0]


def expected_penalised(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    return openai_penalised(hf_repetition(logits, prompt, output, p), output, p)


def test_repetition_penalty_equals_transformers() -> None:
    prompts, outputs, logits = penalty_case()
    params = [SamplingParams(repetition_penalty=r) for r in (1.5, 0.7, 2.0, 1.01, 1.0)]
    state = PenaltyState.build(params, prompts, outputs, 64, "cpu")
    got = state.apply(logits)
    for r, p in enumerate(params):
        assert torch.equal(got[r], hf_repetition(logits[r], prompts[r], outputs[r], p))


def test_presence_and_frequency_follow_the_openai_formula() -> None:
    prompts, outputs, logits = penalty_case()
    pairs = ((0.5, 0), (0, 1.5), (-2, 2), (1, -0.5), (0, 0))
    params = [SamplingParams(presence_penalty=a, frequency_penalty=b) for a, b in pairs]
    got = PenaltyState.build(params, prompts, outputs, 64, "cpu").apply(logits)
    for r, p in enumerate(params):
        torch.testing.assert_close(got[r], openai_penalised(logits[r], outputs[r], p), rtol=0, atol=1e-5)
        # The prompt never counts for presence/frequency.
        untouched = torch.ones(64, dtype=torch.bool)
        untouched[outputs[r]] = False
        assert torch.equal(got[r][untouched], logits[r][untouched])


def test_no_penalty_state_without_penalties() -> None:
    batch = SamplingBatch.build([SamplingParams(temperature=0.5), GREEDY], [1, 2], [[1], [2]], 10, "cpu")
    assert batch.penalties is None


def test_updates_match_a_state_built_from_the_whole_history() -> None:
    prompts, outputs, _ = penalty_case()
    vocab = 64
    params = [msgspec.structs.replace(p, temperature=1.0) for p in PENALTY_PARAMS]
    batch = SamplingBatch.build(params, list(range(5)), prompts, vocab, "cpu")
    gen = torch.Generator().manual_seed(4)
    generated: list[list[int]] = [[] for _ in range(5)]
    for step in range(8):
        logits = torch.randn(5, vocab, generator=gen)
        result = sample(logits, batch, steps_of(5, step))
        for r, t in enumerate(result.next_ids.tolist()):
            generated[r].append(t)
    assert_state_matches(batch.penalties, PENALTY_PARAMS, prompts, generated)


def assert_state_matches(
    state: PenaltyState, params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]]
) -> None:
    """Each row of `state` penalises like a state built fresh from that request's history."""
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(len(params), state.counts.shape[1], generator=gen) * 3
    got = state.apply(logits)
    for r, p in enumerate(params):
        torch.testing.assert_close(got[r], expected_penalised(logits[r], prompts[r], outputs[r], p), rtol=0, atol=1e-5)
        if PenaltyState.uses_penalty(p):
            history = torch.tensor(outputs[r], dtype=torch.int64)
            assert torch.equal(state.counts[r], torch.bincount(history, minlength=state.counts.shape[1]).int())


def test_filter_and_merge_keep_penalty_rows_aligned() -> None:
    prompts, outputs, _ = penalty_case()
    vocab = 64
    params = [msgspec.structs.replace(p, temperature=0.8) for p in PENALTY_PARAMS]
    batch = SamplingBatch.build(params, list(range(5)), prompts, vocab, "cpu", output_ids=outputs)

    def expect(state: PenaltyState, order: list, generated: Optional[torch.Tensor] = None) -> None:
        """`state` rows are the requests `order` (indices into the case; None: a plain request),
        which have since generated the columns of `generated`."""
        history = [list(outputs[i]) if i is not None else [] for i in order]
        if generated is not None:
            history = [h + g for h, g in zip(history, generated.tolist())]
        assert_state_matches(
            state,
            [params[i] if i is not None else SamplingParams() for i in order],
            [prompts[i] if i is not None else [] for i in order],
            history,
        )

    keep = [3, 0, 4]
    kept = batch.filter(torch.tensor(keep))
    expect(kept.penalties, keep)
    expect(SamplingBatch.merge(kept, batch.filter(torch.tensor([1, 2]))).penalties, keep + [1, 2])
    halves = SamplingBatch.merge(batch.filter(torch.tensor([0, 1])), batch.filter(torch.tensor([3, 2])))
    expect(halves.penalties, [0, 1, 3, 2])

    plain = SamplingBatch.build([SamplingParams(temperature=0.3), GREEDY], [7, 8], [[1, 2], [3]], vocab, "cpu")
    for first, second, order in ((plain, kept, [None, None] + keep), (kept, plain, keep + [None, None])):
        merged = SamplingBatch.merge(first, second)
        assert len(merged) == 5 and merged.penalties.counts.shape == (5, vocab)
        expect(merged.penalties, order)
        # Keep generating: the rows without penalties must stay unpenalised as they gain history.
        gen = torch.Generator().manual_seed(7)
        steps = [sample(torch.randn(5, vocab, generator=gen), merged, steps_of(5, s)).next_ids for s in range(4)]
        expect(merged.penalties, order, torch.stack(steps, 1))

    # Dropping every penalised row frees the state.
    assert batch.filter(torch.tensor([4])).penalties is None
    assert SamplingBatch.merge(plain, plain).penalties is None


# ---------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_per_row_top_alternatives() -> None:
    vocab = 400
    params = [
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.7, logprobs=0, repetition_penalty=1.5),
        SamplingParams(temperature=1.3, top_k=10, logprobs=5, presence_penalty=1.0),
        SamplingParams(temperature=0.9, top_p=0.5, logprobs=1),
    ]
    batch = SamplingBatch.build(params, [1, 2, 3, 4], [[1, 2, 3]] * 4, vocab, "cpu")
    logits = distinct_logits(4, vocab, torch.Generator().manual_seed(6))
    raw = logits.clone()
    result = sample(logits, batch, steps_of(4, 0))
    assert torch.equal(logits, raw), "sample must not modify the model output"

    log_probs = torch.log_softmax(raw, 1)
    torch.testing.assert_close(result.logprobs, log_probs.gather(1, result.next_ids[:, None]).squeeze(1))
    assert result.top_ids.shape == (4, 5) and result.top_counts.tolist() == [2, 0, 5, 1]
    for r, k in enumerate([2, 0, 5, 1]):
        values, ids = log_probs[r].topk(k)
        assert result.top_ids[r, :k].tolist() == ids.tolist()
        torch.testing.assert_close(result.top_logprobs[r, :k], values)
        assert (result.top_ids[r, k:] == -1).all() and (result.top_logprobs[r, k:] == float("-inf")).all()


# ---------------------------------------------------------------------------------------------
# Broken logits
# ---------------------------------------------------------------------------------------------

BROKEN_ROW_PARAMS = [
    GREEDY,
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.2, top_p=0.9),
    SamplingParams(temperature=1.0, top_p=0.8, repetition_penalty=1.3, presence_penalty=0.5, logprobs=3),
    # The smallest penalty the door lets through, on huge logits: the division overflows to inf.
    SamplingParams(temperature=0.9, repetition_penalty=0.01),
]


@pytest.mark.parametrize("params", BROKEN_ROW_PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p{p.top_p}"
                         f"-r{p.repetition_penalty}")
@pytest.mark.parametrize("broken", ["nan-row", "one-nan", "posinf", "two-posinf", "neginf-row", "huge"])
def test_non_finite_logits_still_give_ids_inside_the_vocabulary(params: SamplingParams, broken: str) -> None:
    """A model that outputs NaN or inf (fp16 overflow, a broken checkpoint) or a penalty that
    overflows must not make the sampler return id V: the engine would index past its tables and
    the error used to take the router, and the server, down."""
    vocab = 300
    gen = torch.Generator().manual_seed(11)
    logits = distinct_logits(3, vocab, gen)  # rows 0 and 2 stay normal
    row = logits[1]
    if broken == "nan-row":
        row.fill_(float("nan"))
    elif broken == "one-nan":
        row[7] = float("nan")
    elif broken == "posinf":
        row[42] = float("inf")
    elif broken == "two-posinf":
        row[[42, 250]] = float("inf")
    elif broken == "neginf-row":
        row.fill_(float("-inf"))
    else:
        row.mul_(3e37)  # finite, but the penalty's division and the shift overflow
    normal = SamplingBatch.build([params] * 3, [5, 6, 7], [[1, 2, 42, 250]] * 3, vocab, "cpu")
    expected = sample(distinct_logits(3, vocab, torch.Generator().manual_seed(11)), normal, steps_of(3, 0))
    batch = SamplingBatch.build([params] * 3, [5, 6, 7], [[1, 2, 42, 250]] * 3, vocab, "cpu")
    for step in range(3):
        result = sample(logits, batch, steps_of(3, step))
        assert ((result.next_ids >= 0) & (result.next_ids < vocab)).all(), result.next_ids
        assert torch.isfinite(result.logprobs).all(), result.logprobs
        if step == 0:  # the healthy rows of the batch are not disturbed
            assert result.next_ids[[0, 2]].tolist() == expected.next_ids[[0, 2]].tolist()
            assert torch.equal(result.logprobs[[0, 2]], expected.logprobs[[0, 2]])
    if broken in ("posinf", "two-posinf"):  # +inf tokens hold the whole mass
        assert result.next_ids[1].item() in (42, 250)
