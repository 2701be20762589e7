"""OutputTracker's incremental detokenisation against the whole-decode tracker it replaced.

``ReferenceTracker`` below is the tracker as it was before (one whole decode per token, quadratic);
``spec`` states the contract directly (decode every prefix). The incremental tracker must give
the same ``text``, ``token_ids``, ``finish_reason`` and concatenated stream, token by token or in
speculative chunks, on byte-level BPE (multi-byte characters split across tokens), SentencePiece
byte fallback with a leading-space-dropping decoder, ``clean_up_tokenization_spaces``, special
tokens and the default model's tokenizer, while decoding a number of tokens linear in the output.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import pytest

from conftest import CORPUS, make_tokenizer
from turbolm.core.generation import OutputTracker

UNICODE_TEXT = (
    "Naïve café, résumé über Zürich — “quotes” ‘too’ … 日本語のテキスト、中文字符。"
    " Emoji: 😀👍🏽🇫🇷 👩‍💻 e\u0301 Ελληνικά и кириллица! ok.  Done 🎉 ✓"
)


class ReferenceTracker:
    """``OutputTracker`` as it was before incremental decoding (verbatim, renamed)."""

    def __init__(
        self,
        tokenizer,
        eos_ids: Iterable[int] = (),
        max_new_tokens: int = 256,
        stop: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
    ):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.max_new_tokens = max_new_tokens
        self.stop = [s for s in stop if s]
        self.on_text = on_text
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self._emitted = 0
        self._needs_text = bool(self.stop) or on_text is not None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def push(self, tokens: Iterable[int]) -> bool:
        """Add tokens in order; return True once the output has ended."""
        for tok in tokens:
            if self.done:
                break
            self.token_ids.append(int(tok))
            if self._needs_text:
                self._update_text()
            if self.done:
                break
            if int(tok) in self.eos_ids:
                self.finish_reason = "eos"
            elif len(self.token_ids) >= self.max_new_tokens:
                self.finish_reason = "length"
        if self.done:
            self.finish()
        return self.done

    def _update_text(self) -> None:
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        for s in self.stop:
            # Only the newly decoded tail can contain a stop string that was not there before.
            i = text.find(s, max(0, len(self.text) - len(s)))
            if i >= 0:
                self.text = text[:i]
                self.finish_reason = "stop"
                return
        self.text = text
        if self.on_text is not None:
            safe = len(text)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                safe = len(text.rstrip("\ufffd"))
            # Hold back the longest tail that could still grow into a stop string.
            held = max((k for s in self.stop for k in range(1, min(len(s), safe + 1)) if text[:safe].endswith(s[:k])), default=0)
            self._emit(safe - held)

    def _emit(self, upto: int) -> None:
        if upto > self._emitted:
            self.on_text(self.text[self._emitted : upto])
            self._emitted = upto

    def finish(self) -> None:
        """Flush held-back text; fills ``text`` if nothing needed it so far."""
        if not self._needs_text:
            self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            self._needs_text = True
        if self.on_text is not None:
            self._emit(len(self.text))


class Outcome(NamedTuple):
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stream: str | None  # the on_text deltas joined (None without on_text)


def run(cls, tok, ids, sizes=(1,), stop=(), eos=(), max_new=None, stream=True) -> Outcome:
    """Push ``ids`` in chunks of ``sizes`` (cycled), as vanilla (1) or speculative (2-5) decoding does."""
    deltas: list[str] = []
    t = cls(tok, eos_ids=eos, max_new_tokens=max_new or len(ids), stop=stop, on_text=deltas.append if stream else None)
    i = k = 0
    while i < len(ids) and not t.done:
        n = sizes[k % len(sizes)]
        t.push(ids[i : i + n])
        i, k = i + n, k + 1
    if not t.done:
        t.finish()
    return Outcome(t.text, list(t.token_ids), t.finish_reason, "".join(deltas) if stream else None)


def spec(tok, ids, stop=(), eos=(), max_new=None) -> tuple[str, list[int], str]:
    """The contract, directly: after each token, the output ends before the first stop string
    that appeared, at EOS (kept) or at max_new_tokens."""
    max_new = max_new or len(ids)
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n], skip_special_tokens=True)
        found = [i for s in stop if s and (i := text.find(s)) >= 0]
        if found:
            return text[: min(found)], ids[:n], "stop"
        if ids[n - 1] in eos:
            return text, ids[:n], "eos"
        if n >= max_new:
            return text, ids[:n], "length"
    raise AssertionError("unreachable: max_new <= len(ids)")


def check(tok, ids, stop=(), eos=(), sizes=(1,), max_new=None, whole_stream=True):
    """Run the new tracker (streaming and not) and the reference tracker and compare them.

    The new one must meet ``spec`` and give what the reference gives, stream included; where the
    reference itself misses the contract (a stop string found late or not at all, see the tests
    below) it must meet the contract instead of copying the reference. ``whole_stream``: the
    deltas join to the text (not so where the decode later rewrites text already streamed:
    random bytes spoiling a byte-fallback run, ``clean_up_tokenization_spaces``)."""
    ours = run(OutputTracker, tok, ids, sizes, stop, eos, max_new)
    ref = run(ReferenceTracker, tok, ids, sizes, stop, eos, max_new)
    quiet = run(OutputTracker, tok, ids, sizes, stop, eos, max_new, stream=False)
    assert quiet[:3] == ours[:3]
    full = tok.decode(ours.token_ids, skip_special_tokens=True)
    if ours.finish_reason == "stop":
        assert full.startswith(ours.text) and any(full[len(ours.text) :].startswith(s) for s in stop)
    else:
        assert ours.text == full
    want = spec(tok, ids, stop, eos, max_new)
    assert ours[:3] == want, (ours, want)
    assert ours.stream == ours.text or not whole_stream
    if ref[:3] == want:
        assert ours == ref, (ours, ref)
    return ours, ref


def stops_from(text: str, rng: random.Random, k: int) -> list[str]:
    """``k`` stop strings cut from ``text`` (so that they do occur), 1-6 characters long."""
    out = []
    for _ in range(k):
        if not text:
            break
        a = rng.randrange(len(text))
        out.append(text[a : a + rng.randint(1, 6)])
    return out


@pytest.fixture(scope="module")
def bpe():
    """The tiny byte-level BPE of the other tests: no merges for non-ASCII, so every such
    character is split over several byte tokens."""
    return make_tokenizer()


def make_sentencepiece(decoder: str):
    """A Llama-style SentencePiece tokenizer built offline: BPE over "▁"-marked words with byte
    fallback (<0xXX> tokens for characters outside the vocabulary). ``decoder``: "metaspace"
    (Metaspace decoder, prepend_scheme="first") or "llama2" (Replace, ByteFallback, Fuse,
    Strip one leading space, as Llama-2's tokenizer.json). Both drop the leading space at the
    start of a decode."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    base.train_from_iterator(CORPUS + ["café naïve résumé über"], trainer)
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    if decoder == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")]
        )
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["metaspace", "llama2"])
def sentencepiece(request):
    return make_sentencepiece(request.param)


def with_specials(tok, ids, rng, p=0.15):
    """``ids`` with special tokens (skipped by the decode) sprinkled in."""
    out = []
    for i in ids:
        while rng.random() < p:
            out.append(rng.choice(tok.all_special_ids))
        out.append(i)
    return out


SIZES = [(1,), (2,), (3, 1, 5), (4, 2), (5,)]


def fuzz(tok, rng, cases, length, vocab=None, whole_stream=True):
    """Random token sequences (any id, special ones included) with stop strings cut from their text."""
    vocab = vocab or len(tok)
    for case in range(cases):
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, length))]
        text = tok.decode(ids, skip_special_tokens=True)
        stop = stops_from(text, rng, rng.choice([0, 1, 1, 2, 3]))
        eos = [rng.randrange(vocab)] if case % 3 == 0 else []
        max_new = rng.randint(1, len(ids)) if case % 4 == 0 else None
        check(tok, ids, stop, eos, SIZES[case % len(SIZES)], max_new, whole_stream)


def test_random_token_sequences_tiny_bpe(bpe):
    fuzz(bpe, random.Random(0), cases=300, length=60)


def test_split_characters_token_by_token_and_in_chunks(bpe):
    ids = bpe.encode(UNICODE_TEXT, add_special_tokens=False)
    assert len(ids) > 2 * len(UNICODE_TEXT.encode()) // 3  # most characters are split over byte tokens
    for sizes in SIZES:
        ours, _ = check(bpe, ids, sizes=sizes)
        assert ours.text == UNICODE_TEXT and ours.stream == UNICODE_TEXT


def test_stop_strings_in_split_characters_and_across_chunks(bpe):
    rng = random.Random(1)
    ids = with_specials(bpe, bpe.encode(UNICODE_TEXT, add_special_tokens=False), rng)
    for a in range(0, len(UNICODE_TEXT), 3):
        for n in (1, 2, 3, 5):
            stop = [UNICODE_TEXT[a : a + n]]
            for sizes in SIZES:
                ours, _ = check(bpe, ids, stop, sizes=sizes)
                assert ours.finish_reason == "stop" and ours.text == UNICODE_TEXT[: UNICODE_TEXT.index(stop[0])]


def test_stop_string_straddles_special_tokens(bpe):
    special = bpe.convert_tokens_to_ids("<|im_start|>")
    ids = bpe.encode("Hello world, the sea", add_special_tokens=False)
    cut = len(bpe.encode("Hello wor", add_special_tokens=False))
    ids = ids[:cut] + [special, special] + ids[cut:]
    for sizes in SIZES:
        ours, _ = check(bpe, ids, ["world"], sizes=sizes)
        assert ours.text == "Hello " and ours.finish_reason == "stop"
        # EOS is kept in token_ids and ends the output; nothing after it is kept or streamed
        ours, _ = check(bpe, ids + [bpe.eos_token_id] + ids, eos=[bpe.eos_token_id], sizes=sizes)
        assert ours.token_ids == ids + [bpe.eos_token_id] and ours.finish_reason == "eos"
        assert ours.text == ours.stream == "Hello world, the sea"


def test_emoji_stop_held_back_until_it_cannot_match(bpe):
    ids = bpe.encode("a 😀b 😀😀 c", add_special_tokens=False)
    deltas = []
    t = OutputTracker(bpe, max_new_tokens=100, stop=["😀😀"], on_text=deltas.append)
    for tok in ids:
        if t.push([tok]):
            break
        assert "\ufffd" not in "".join(deltas)  # never streams half a character
    assert t.finish_reason == "stop" and t.text == "a 😀b " == "".join(deltas)


class HiddenSpecials:
    """A tokenizer that does not tell which of its tokens are special: the tracker cannot leave
    them out of its windows, and they decode to nothing."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, **kwargs):
        return self.tok.decode(ids, **kwargs)


def test_windows_of_tokens_without_text(sentencepiece):
    """A window holding only tokens that decode to nothing must not be the context of the next
    word: SentencePiece decoders drop the leading space at the start of a decode."""
    tok = HiddenSpecials(sentencepiece)
    eos = sentencepiece.eos_token_id
    words = [sentencepiece.encode(w, add_special_tokens=False) for w in ("Hello", " world", " the", " sea 😀")]
    for run_length in (1, 3, 4, 5, 9):
        ids = [i for w in words for i in [*w, *[eos] * run_length]]
        for sizes in SIZES:
            ours, _ = check(tok, ids, sizes=sizes)
            assert ours.text == sentencepiece.decode([i for w in words for i in w])
            check(tok, ids, ["d t"], sizes=sizes)


def test_random_token_sequences_sentencepiece(sentencepiece):
    fuzz(sentencepiece, random.Random(2), cases=300, length=60, whole_stream=False)


def test_sentencepiece_leading_space_and_byte_fallback(sentencepiece):
    rng = random.Random(3)
    tok = sentencepiece
    ids = tok.encode(UNICODE_TEXT, add_special_tokens=False)
    assert any(t.startswith("<0x") for t in tok.convert_ids_to_tokens(ids))
    for sizes in SIZES:
        ours, _ = check(tok, ids, sizes=sizes)
        assert ours.text == tok.decode(ids)
        check(tok, with_specials(tok, ids, rng), sizes=sizes)
    for a in range(0, len(UNICODE_TEXT), 4):
        check(tok, ids, [UNICODE_TEXT[a : a + 1 + a % 4]], sizes=SIZES[a % len(SIZES)])


def test_reference_missed_stop_strings_that_the_new_tracker_finds(sentencepiece):
    """Where the text gets shorter or changes before its end, the old tracker searched for stop
    strings from too far on (the old length minus the stop's length) and found them a token late
    or never; with several stop strings it cut at the first one *listed* that occurred, which
    could leave an earlier one in the text. The new tracker meets the contract in all three."""
    # A byte-fallback character completing after its bytes showed as several "\ufffd".
    tok = sentencepiece
    ids = tok.encode(" Hello 日本 world", add_special_tokens=False)
    ours, ref = check(tok, ids, ["日本"])
    assert ours.finish_reason == "stop" and ours.text == tok.decode(ids).split("日本")[0]
    assert ref.token_ids == ids[: len(ours.token_ids) + 1]  # one token too many
    ours, ref = check(tok, ours.token_ids, ["日本"])
    assert ours.finish_reason == "stop" and ref.finish_reason == "length"  # missed
    # clean_up_tokenization_spaces removing a space before the stop string.
    tok = cleanup_tokenizer()
    ids = tok.encode(" 😀 's 😀 's n't ok", add_special_tokens=False)
    ours, ref = check(tok, ids, ["😀'sn'"], whole_stream=False)
    assert ours.text == " 😀's " and ref.finish_reason == "length"
    # Two stop strings in one token's text.
    ours, ref = check(PieceTokenizer(["the", " sea", " sand"]), [0, 1, 2], ["nd", "sa"])
    assert ours.text == "the sea " and ref.text == "the sea sa"


def cleanup_tokenizer():
    tok = make_tokenizer()
    tok.clean_up_tokenization_spaces = True
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    return tok


def test_clean_up_tokenization_spaces():
    """A decode that rewrites earlier text (" ." -> "."): the streamed " " before a "." cannot be
    taken back, so the deltas may not join to the text (as with the old tracker, whose stream the
    new one repeats); text, token_ids and finish_reason meet the contract."""
    tok = cleanup_tokenizer()
    assert tok.decode(tok.encode("a . b n't", add_special_tokens=False)) == "a. bn't"
    rng = random.Random(4)
    words = ["a", " .", " ,", " n't", " 's", " ?", " !", " the", "  ", " sea", "é", " 😀"]
    for case in range(300):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
        ids = tok.encode(text, add_special_tokens=False)
        stop = stops_from(tok.decode(ids), rng, rng.choice([0, 1, 1, 2]))
        check(tok, ids, stop, sizes=SIZES[case % len(SIZES)], whole_stream=False)
    fuzz(tok, random.Random(5), cases=150, length=40, whole_stream=False)


def test_clean_up_quote_runs_are_beyond_the_window():
    """The clean-up's " ' " -> "'" pairs quotes left to right, so how a run " ' ' ' '" reads depends
    on where it starts: no bounded window decodes it as the whole text does. ``finish`` still
    makes the text exact, and stop strings elsewhere are found, but one made by the re-pairing
    ("''s" here) is missed; the stream, which did not join to the text with the old tracker
    either, may differ from the old one. (Transformers ignores this clean-up for BPE models.)"""
    tok = cleanup_tokenizer()
    ids = tok.encode(" 😀 . 😀 ' ' 's 's , .é sea 'sé '   the sea", add_special_tokens=False)
    for sizes in SIZES:
        for stop in ([], ["sea '"], ["e '"]):
            ours = run(OutputTracker, tok, ids, sizes, stop)
            assert ours[:3] == spec(tok, ids, stop)
        ours = run(OutputTracker, tok, ids, sizes, ["''s"])
        assert spec(tok, ids, ["''s"])[2] == "stop"
        assert ours.finish_reason == "length" and ours.text == tok.decode(ids)


class CharTokenizer:
    """One character per token id (ord); ``transform`` post-processes a whole decode."""

    def __init__(self, transform=lambda s: s, special=()):
        self.transform = transform
        self.all_special_ids = list(special)

    def decode(self, ids, skip_special_tokens=True):
        return self.transform("".join(chr(i) for i in ids))


class PieceTokenizer:
    """Token id i is ``pieces[i]``."""

    def __init__(self, pieces):
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids)


def test_whole_output_decode_when_windows_cannot_be_trusted():
    """Decodes that depend on the whole sequence (reversed text, with or without its first
    character kept first): the windows disagree with the text read so far, so the tracker widens
    the window to the whole output or decodes the whole output (the old cost) and stays exact."""
    ids = [ord(c) for c in "hello world, stop here"]
    for transform in (lambda s: s[::-1], lambda s: s[:1] + s[1:][::-1]):
        tok = CharTokenizer(transform)
        for sizes in SIZES:
            for stop in (["ts"], ["olleh"], ["ereh"], ["ho"], []):
                ours = run(OutputTracker, tok, ids, sizes, stop)
                assert ours[:3] == spec(tok, ids, stop)


def test_final_text_is_the_whole_decode_when_the_window_misses_context(caplog):
    """A decode whose first character changes everything (a marker that upper-cases the whole
    text): no window after the first holds it, so the incremental text is wrong; ``finish``
    notices (one whole decode) and ``text`` is still ``decode(token_ids)``."""
    tok = CharTokenizer(lambda s: s.upper() if s.startswith("^") else s)
    ids = [ord(c) for c in "^abcdefghijklmnop"]
    caplog.set_level("DEBUG", logger="turbolm.core.generation")
    t = OutputTracker(tok, max_new_tokens=len(ids), stop=["XYZ"], on_text=lambda s: None)
    assert t.push(ids) and t.finish_reason == "length"
    assert t.text == "^ABCDEFGHIJKLMNOP"
    assert "differs from a whole decode" in caplog.text
    # Such a decode is outside what the windows can see: this stop string is not found, but
    # the text is still the whole decode.
    t = OutputTracker(tok, max_new_tokens=len(ids), stop=["FGH"])
    t.push(ids)
    assert t.finish_reason == "length" and t.text == tok.decode(ids)


def test_special_ids_that_decode_to_text_are_kept():
    tok = CharTokenizer(special=[ord("X"), 0])
    ids = [ord(c) for c in "abXcd"] + [0] + [ord(c) for c in "Xef"]
    for sizes in SIZES:
        ours, _ = check(tok, ids, ["cd\0X"], sizes=sizes)
        assert ours.finish_reason == "stop" and ours.text == "abXcd\0X"[:3]


class CountingTokenizer:
    """Counts the tokens passed to ``decode``."""

    def __init__(self, tok):
        self.tok = tok
        self.decoded = 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def decode_work(cls, tok, ids, sizes=(1,), stop=("<never>",)) -> tuple[int, Outcome]:
    counting = CountingTokenizer(tok)
    out = run(cls, counting, ids, sizes, stop)
    return counting.decoded, out


def long_ids(tok, n):
    ids: list[int] = []
    while len(ids) < n:
        ids += tok.encode(" ".join(CORPUS[:5]) + " " + UNICODE_TEXT, add_special_tokens=False)
    return ids[:n]


LINEAR_C = 20  # tokens decoded per generated token, at most (the old tracker: about N/2)


def test_decoding_work_is_linear(bpe):
    n = 2000
    ids = long_ids(bpe, n)
    work, ours = decode_work(OutputTracker, bpe, ids)
    assert ours.text == ours.stream == bpe.decode(ids) and ours.finish_reason == "length"
    assert work <= LINEAR_C * n
    old, ref = decode_work(ReferenceTracker, bpe, ids)
    assert ref == ours and old > LINEAR_C * n  # the bound is one the whole-decode tracker fails
    for sizes in SIZES[1:]:
        assert decode_work(OutputTracker, bpe, ids, sizes)[0] <= LINEAR_C * n


def test_decoding_work_is_linear_for_degenerate_outputs(bpe, sentencepiece):
    """Runs of special tokens and short runs of bytes that never finish a character keep the work
    linear (a run of unfinished bytes is one window, so its own cost is quadratic in its length)."""
    n = 2000
    lead = bpe.convert_tokens_to_ids("Ã")  # the byte 0xC3: starts a 2-byte character, never finished here
    special = bpe.convert_tokens_to_ids("<|im_start|>")
    outputs = {
        "lead bytes and text": ([lead] * 10 + long_ids(bpe, 30)) * (n // 40),
        "special tokens": ([special] * 300 + long_ids(bpe, 30)) * (n // 330),
        "specials between tokens": [t for i in long_ids(bpe, n // 2) for t in (i, special)],
    }
    for name, ids in outputs.items():
        work, ours = decode_work(OutputTracker, bpe, ids)
        assert ours.text == ours.stream == bpe.decode(ids, skip_special_tokens=True), name
        assert work <= LINEAR_C * len(ids), name
    bytes_ = [i for i in range(len(sentencepiece)) if sentencepiece.convert_ids_to_tokens(i).startswith("<0x")]
    ids = (long_ids(sentencepiece, 30) + bytes_[200:210]) * (n // 40)  # invalid byte-fallback runs
    work, ours = decode_work(OutputTracker, sentencepiece, ids)
    assert ours.text == sentencepiece.decode(ids) and work <= LINEAR_C * len(ids)


def test_decoding_work_is_linear_for_unicode_text(sentencepiece, bpe):
    n = 2000
    for tok in (sentencepiece, bpe):
        for text in (UNICODE_TEXT, "日本語のテキスト中文字符", "😀👍🏽🇫🇷👩‍💻🎉"):
            ids = []
            while len(ids) < n:
                ids += tok.encode(text + " ", add_special_tokens=False)
            work, ours = decode_work(OutputTracker, tok, ids)  # whole characters at the end
            assert ours.text == ours.stream == tok.decode(ids) and work <= LINEAR_C * len(ids)


def test_no_decoding_before_finish_without_stop_or_stream(bpe):
    counting = CountingTokenizer(bpe)
    ids = long_ids(bpe, 300)
    t = OutputTracker(counting, eos_ids=[bpe.eos_token_id], max_new_tokens=1000)
    for tok in ids[:-1]:
        assert not t.push([tok])
    assert counting.decoded == 0
    assert t.push([bpe.eos_token_id, 5, 6])
    assert counting.decoded == len(ids)  # one decode of the whole output, in finish
    assert t.text == bpe.decode(ids[:-1]) and t.token_ids == ids[:-1] + [bpe.eos_token_id]


# -- the default model's tokenizer (SmolLM2, byte-level BPE) -----------------------------------


@pytest.fixture(scope="module")
def smol(default_model):
    return default_model[1]


@pytest.mark.slow
def test_default_tokenizer_random_sequences(smol):
    fuzz(smol, random.Random(6), cases=200, length=60)


@pytest.mark.slow
def test_default_tokenizer_unicode_text_and_stops(smol):
    ids = smol.encode(UNICODE_TEXT, add_special_tokens=False)
    for sizes in SIZES:
        ours, _ = check(smol, ids, sizes=sizes)
        assert ours.text == UNICODE_TEXT
    rng = random.Random(7)
    noisy = with_specials(smol, ids, rng)
    for a in range(0, len(UNICODE_TEXT), 2):
        check(smol, noisy, [UNICODE_TEXT[a : a + 1 + a % 5]], sizes=SIZES[a % len(SIZES)])


@pytest.mark.slow
def test_default_tokenizer_linear_work(smol):
    n = 2000
    ids = long_ids(smol, n)
    work, ours = decode_work(OutputTracker, smol, ids, stop=("<never>", "😀😀😀"))
    assert ours.text == ours.stream == smol.decode(ids) and work <= LINEAR_C * n


@pytest.mark.slow
def test_default_model_generation_with_stop_and_stream(default_model):
    from turbolm import encode_prompt, generate

    model, tok = default_model
    ids = encode_prompt(tok, "Write a haiku about the sea, with an emoji.")
    full = generate(model, tok, ids, max_new_tokens=40)
    assert len(full.text) > 12
    stop = full.text[8:11]
    deltas = []
    res = generate(model, tok, ids, max_new_tokens=40, stop=[stop], on_text=deltas.append)
    assert res.finish_reason == "stop" and res.text == full.text[: full.text.index(stop)] == "".join(deltas)
    assert res.token_ids == full.token_ids[: res.new_tokens]
    check(tok, full.token_ids, [stop])
