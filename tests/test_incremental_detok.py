"""Incremental detokenization against decoding all ids at once.

The main tokenizer is a byte-level BPE trained here on a small corpus full of multi-byte UTF-8
characters (accented letters, symbols, emoji), so many
tokens hold only part of a UTF-8 character (or the end of one and the start of the next), the
hard case for streaming text. Random id sequences are mostly such byte soup.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lightserve.detokenization.incremental import REPLACEMENT_CHAR, IncrementalDetokenizer

CORPUS = [
    "A naïve café serves crème brûlée and crêpes; the résumé says 5 € or 4 £.",
    "Arrows → ← ↑ ↓, math ∑ ∞ ≈ ≠ ≤ ≥ √, shapes ■ □ ▲ ● ★ and music ♫ ✓ ✗.",
    "Emoji: 😀 🎉 👍🏽 🚀 ❤️ 🇫🇷 — and plain ASCII text with spaces, digits 12345.",
    "It was 20 °C, add ½ cup; © and ® marks, “double” and ‘single’ quotes…",
]
SPECIAL_TOKENS = ["<s>", "</s>"]
# Characters the tokenizer never saw: their bytes stay separate tokens.
UNSEEN = "🦀 ☃ ⌘"

HYPOTHESIS = settings(max_examples=150, deadline=None, derandomize=True)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def byte_ids(tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """One token per UTF-8 byte of `text` (byte-level BPE has a token for every byte)."""
    mapped = "".join(piece for piece, _ in tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text))
    return tok.convert_tokens_to_ids(list(mapped))


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detok.step(t).text for t in ids]


def run_all(tok: PreTrainedTokenizerBase, prompt: list[int], out: list[int], skip: bool, stop=()) -> str:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip, stop=list(stop))
    texts = stream(detok, out)
    texts.append(detok.finish())
    assert "".join(texts) == detok.output_text
    return detok.output_text


def reference_stop(tok: PreTrainedTokenizerBase, out: list[int], skip: bool, stops: list[str]):
    """The documented semantics, by brute force: decode every prefix of the output; at the first
    one that does not end mid-character (or at the very end) in which some stop string occurs,
    cut before the earliest-starting occurrence (ties: the stop listed first)."""
    for k in range(1, len(out) + 1):
        text = tok.decode(out[:k], skip_special_tokens=skip)
        if text.endswith(REPLACEMENT_CHAR) and k < len(out):
            continue
        hits = [(text.find(s), i) for i, s in enumerate(stops) if s and s in text]
        if hits:
            pos, i = min(hits)
            return text[:pos], stops[i]
    return tok.decode(out, skip_special_tokens=skip), None


def test_tokenizer_splits_characters(tok):
    """The test tokenizer really has tokens that cut characters, alone and inside merges."""
    partial = [i for i in range(len(tok)) if REPLACEMENT_CHAR in tok.decode([i])]
    merged_partial = [i for i in partial if len(tok.convert_ids_to_tokens(i)) > 1]
    assert len(partial) > 128 and merged_partial
    ids = tok.encode("∑ ∞ ≈ ≠ ★ 😀🎉")
    assert any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids)


@HYPOTHESIS
@given(
    prompt=st.lists(st.integers(0, 599), max_size=8),
    out=st.lists(st.integers(0, 599), max_size=60),
    skip=st.booleans(),
)
def test_matches_full_decode_and_holds_back_minimally(tok, prompt, out, skip):
    out = [t % len(tok) for t in out]
    prompt = [t % len(tok) for t in prompt]
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    for k, token in enumerate(out, start=1):
        assert not detok.step(token).stopped
        decoded = tok.decode(out[:k], skip_special_tokens=skip)
        if decoded.endswith(REPLACEMENT_CHAR):
            assert decoded.startswith(detok.output_text)
        else:  # nothing held back once the text is complete
            assert detok.output_text == decoded
    detok.finish()
    assert detok.output_text == tok.decode(out, skip_special_tokens=skip)
    assert detok.output_ids == out and detok.finished and not detok.stopped


@HYPOTHESIS
@given(
    prompt=st.lists(st.integers(0, 599), max_size=6),
    out=st.lists(st.integers(0, 599), max_size=40),
    skip=st.booleans(),
    data=st.data(),
)
def test_stop_strings_match_reference(tok, prompt, out, skip, data):
    out = [t % len(tok) for t in out]
    prompt = [t % len(tok) for t in prompt]
    full = tok.decode(out, skip_special_tokens=skip)
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        if full and data.draw(st.booleans()):  # a piece of the real text, often across tokens
            start = data.draw(st.integers(0, len(full) - 1))
            stops.append(full[start : start + data.draw(st.integers(1, 6))])
        else:
            stops.append(data.draw(st.text(alphabet="aeé ,.∑★😀", min_size=1, max_size=4)))
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip, stop=stops)
    texts = []
    for token in out:
        step = detok.step(token)
        texts.append(step.text)
        if step.stopped:
            break
    texts.append(detok.finish())
    expected_text, expected_stop = reference_stop(tok, out, skip, stops)
    assert "".join(texts) == expected_text == detok.output_text
    assert detok.matched_stop == expected_stop and detok.stopped == (expected_stop is not None)


def test_multibyte_character_held_until_complete(tok):
    ids = byte_ids(tok, "a🦀b")
    assert len(ids) == 6
    assert stream(IncrementalDetokenizer(tok, []), ids) == ["a", "", "", "", "🦀", "b"]


def test_prompt_context_keeps_leading_space():
    """A SentencePiece-style decoder drops the leading space of a sequence's first token; decoded
    after the prompt, the first output token keeps it."""
    words = ["<unk>", "▁The", "▁capital", "▁is", "▁Paris", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert tok.decode([4, 5]) == "Paris."
    assert run_all(tok, [1, 2, 3], [4, 5], skip=True) == " Paris."
    assert run_all(tok, [], [4, 5], skip=True) == "Paris."


def test_prompt_ending_mid_character_is_not_context(tok):
    prompt = byte_ids(tok, "x★")[:-1]
    out = byte_ids(tok, "★")[-1:] + byte_ids(tok, "ok")
    assert run_all(tok, prompt, out, skip=True) == tok.decode(out) == REPLACEMENT_CHAR + "ok"


def test_stop_split_across_tokens_never_leaks(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["END"])
    steps = [detok.step(t) for t in byte_ids(tok, "Hi ENDx")]
    assert [s.text for s in steps[:5]] == ["H", "i", " ", "", ""]
    assert steps[5].text == "" and steps[5].stopped and steps[5].stop == "END"
    assert steps[6].text == "" and steps[6].stopped  # a token in flight after the stop: ignored
    assert detok.output_text == "Hi " and detok.output_ids == byte_ids(tok, "Hi END")
    assert detok.finish() == "" and detok.output_text == "Hi "


def test_false_start_of_stop_string_is_released(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["END"])
    assert stream(detok, byte_ids(tok, "ENd!")) == ["", "", "ENd", "!"]
    assert not detok.stopped


def test_stop_string_made_of_split_characters(tok):
    texts = stream(IncrementalDetokenizer(tok, [], stop=["∑∞"]), byte_ids(tok, "★≈∑∞!"))
    assert "".join(texts) == "★≈" and not any("∑" in t for t in texts)


def test_earliest_starting_complete_match_wins(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["cd", "bcd"])
    assert "".join(stream(detok, byte_ids(tok, "abcde"))) == "a" and detok.matched_stop == "bcd"
    # A later-starting stop that completes first ends the request before "bcd" can complete.
    detok = IncrementalDetokenizer(tok, [], stop=["bcd", "c"])
    assert "".join(stream(detok, byte_ids(tok, "abcd"))) == "ab" and detok.matched_stop == "c"


def test_stop_string_at_the_very_start(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["\n"])
    assert detok.step(byte_ids(tok, "\n")[0]).stopped and detok.output_text == ""


def test_finish_releases_held_text(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["END"])
    assert stream(detok, byte_ids(tok, "abEN")) == ["a", "b", "", ""]
    assert detok.finish() == "EN" and detok.output_text == "abEN" and not detok.stopped
    with pytest.raises(RuntimeError):
        detok.step(byte_ids(tok, "a")[0])


def test_finish_decodes_incomplete_utf8_like_full_decode(tok):
    out = byte_ids(tok, "x🦀")[:-1]
    detok = IncrementalDetokenizer(tok, [])
    assert stream(detok, out) == ["x", "", "", ""]
    assert detok.finish() == tok.decode(out)[1:] == REPLACEMENT_CHAR


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens(tok, skip):
    out = byte_ids(tok, "hi") + [tok.eos_token_id] + byte_ids(tok, "yo")
    assert run_all(tok, [tok.bos_token_id], out, skip) == ("hiyo" if skip else "hi</s>yo")


def test_skipped_special_token_inside_a_character(tok):
    out = byte_ids(tok, "★")
    out.insert(1, tok.eos_token_id)
    assert run_all(tok, [], out, skip=True) == "★"


def test_long_run_of_invalid_bytes(tok):
    """Byte soup that never completes a character is still emitted, equal to the full decode."""
    lead_byte = byte_ids(tok, "★")[0]
    out = [lead_byte] * 100 + byte_ids(tok, "★ ok")
    assert run_all(tok, [], out, skip=True) == tok.decode(out)


def test_work_per_token_does_not_grow_with_the_output(tok, monkeypatch):
    """Every decode call sees a short window of ids, however long the output gets."""
    sizes: list[int] = []
    decode = tok.decode

    def recording_decode(ids, **kwargs):
        sizes.append(len(ids))
        return decode(ids, **kwargs)

    monkeypatch.setattr(tok, "decode", recording_decode)
    out = tok.encode(" ".join(CORPUS * 20) + UNSEEN)
    assert len(out) > 1000
    assert run_all(tok, out[:50], out, skip=True, stop=["never in the text"]) == decode(out)
    assert max(sizes) <= 16 and len(sizes) <= 2 * len(out) + 2


def test_empty_and_duplicate_stop_strings_are_ignored(tok):
    detok = IncrementalDetokenizer(tok, [], stop=["", "o", "o"])
    assert "".join(stream(detok, byte_ids(tok, "hello"))) == "hell" and detok.matched_stop == "o"
    assert run_all(tok, [], byte_ids(tok, "hi"), skip=True, stop=[""]) == "hi"


@pytest.fixture(scope="module")
def smollm2_tok() -> PreTrainedTokenizerBase:
    embedded_model = pytest.importorskip("lightserve.utils.embedded_model")
    return AutoTokenizer.from_pretrained(embedded_model.embedded_model_dir())


def chat_prompt(tok: PreTrainedTokenizerBase) -> list[int]:
    messages = [{"role": "user", "content": "Hi"}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_embedded_smollm2_tokenizer(smollm2_tok):
    """The real tokenizer of the embedded model: streamed text equals the full decode."""
    tok = smollm2_tok
    prompt = chat_prompt(tok)
    text = "Look: ∑ ≈ ★, 🦀🇫🇷 and naïve café.\nDone."
    out = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert any(REPLACEMENT_CHAR in tok.decode([t]) for t in out)  # some tokens cut a character
    assert run_all(tok, prompt, out, skip=True) == tok.decode(out, skip_special_tokens=True) == text
    assert run_all(tok, prompt, out, skip=False) == text + tok.eos_token
    assert run_all(tok, prompt, out, skip=True, stop=["🇫🇷", "Done"]) == "Look: ∑ ≈ ★, 🦀"


@HYPOTHESIS
@given(out=st.lists(st.one_of(st.integers(0, 400), st.integers(0, 49151)), max_size=40), skip=st.booleans())
def test_embedded_smollm2_random_ids(smollm2_tok, out, skip):
    """Random ids, many from the low ids that hold single bytes and special tokens."""
    out = [t % len(smollm2_tok) for t in out]
    expected = smollm2_tok.decode(out, skip_special_tokens=skip)
    assert run_all(smollm2_tok, chat_prompt(smollm2_tok), out, skip) == expected
