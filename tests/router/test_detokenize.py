"""Incremental detokenization equals decoding all tokens at once: multi-byte characters, byte-fallback, specials."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from loraplex.router.detokenize import TextStream
from loraplex.router.tokenizer import TextTokenizer
from tests.factories import tiny_tokenizer

TEXTS = [
    "héllo wörld — naïve café, 世界 🎉🦀 ok",
    "日本語のテキストと emoji 👩‍👩‍👧 mixed with ascii",
    '{"name": "Zoë", "city": "Kraków"} ∑∫√ ✓',
]


def _stream(tok: TextTokenizer, ids: list[int]) -> tuple[str, list[str]]:
    """What the scheduler does: special ids are not pushed (their text is not the answer's), the rest are."""
    stream, deltas = TextStream(), []
    for i in ids:
        if i not in tok.special_ids:
            deltas.append(stream.push(tok, i))
    deltas.append(stream.finish(tok))
    return stream.text, deltas


def _byte_fallback_tokenizer(directory: Path) -> TextTokenizer:
    """A Llama-style SentencePiece BPE: Metaspace spaces, <0xNN> byte-fallback tokens for what is not in vocab."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁w", "ll", "▁he", "▁hell", "▁hello", "▁world", "é"]:
        vocab[piece] = len(vocab)
    merges = [("▁", "h"), ("▁", "w"), ("l", "l"), ("▁h", "e"), ("▁he", "ll"), ("▁hell", "o")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return TextTokenizer(directory)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    directory = tmp_path_factory.mktemp("bytelevel")
    tiny_tokenizer(directory)
    return TextTokenizer(directory)


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory: pytest.TempPathFactory) -> TextTokenizer:
    return _byte_fallback_tokenizer(tmp_path_factory.mktemp("bytefallback"))


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_text_streams_to_the_whole_decode(byte_level: TextTokenizer, text: str) -> None:
    ids = byte_level.encode(text)
    assert len(ids) > len(text) // 2  # characters really are split across byte-level tokens here
    whole, deltas = _stream(byte_level, ids)
    assert whole == byte_level.decode(ids) == text
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # no half character is ever streamed


@pytest.mark.parametrize("text", [*TEXTS, "hello world", " hello  world é"])
def test_byte_fallback_tokens_stream_to_the_whole_decode(byte_fallback: TextTokenizer, text: str) -> None:
    ids = byte_fallback.encode(text)
    pieces = [byte_fallback.tokenizer.id_to_token(i) for i in ids]
    assert any(p.startswith("<0x") for p in pieces) == (text in TEXTS)  # the test texts need byte tokens
    whole, deltas = _stream(byte_fallback, ids)
    assert whole == byte_fallback.decode(ids)
    assert "".join(deltas) == whole


@pytest.mark.parametrize("seed", range(6))
def test_random_ids_with_specials_and_broken_bytes(byte_level: TextTokenizer, seed: int) -> None:
    """Arbitrary byte-level ids (specials among them, bytes that never complete a character): still the whole
    decode, U+FFFD included where a whole decode has it.

    Not asked of byte-fallback tokenizers: their decoder turns a whole run of byte tokens into U+FFFDs when any
    byte of it is invalid, so a valid character streamed before an invalid byte would have to be taken back
    (docs/serving.md); valid text through byte-fallback tokens is checked above."""
    rng = random.Random(seed)
    vocab = byte_level.tokenizer.get_vocab_size()
    ids = [rng.randrange(vocab) for _ in range(400)]
    assert any(i in byte_level.special_ids for i in ids)
    whole, deltas = _stream(byte_level, ids)
    assert whole == byte_level.decode(ids, skip_special=True)
    assert "\ufffd" in whole  # random bytes do break characters: the case is really exercised
    assert "".join(deltas) == whole


def test_stop_matching_reads_only_the_tail() -> None:
    stream = TextStream(pieces=["abc", "de", "", "fghij"])
    assert stream.recent(0) == ""
    assert stream.recent(4) == "ghij"
    assert stream.recent(7) == "defghij"
    assert stream.recent(100) == "abcdefghij"
    assert stream.text == "abcdefghij"


def test_work_per_token_does_not_grow_with_the_output(byte_level: TextTokenizer) -> None:
    """Tokens handed to the tokenizer per new token: the same near the start and 2,000 tokens in (a whole
    decode each step would hand it the whole output)."""
    fed: list[int] = []

    class Counting:
        def decode(self, ids: list[int], skip_special: bool = True) -> str:
            fed.append(len(ids))
            return byte_level.decode(ids, skip_special)

    ids = byte_level.encode(" ".join(TEXTS) * 40)[:2100]
    stream, counting = TextStream(), Counting()
    per_token = []
    for i in ids:
        before = sum(fed)
        stream.push(counting, i)
        per_token.append(sum(fed) - before)
    assert stream.text == byte_level.decode(ids)
    early, late = per_token[50:100], per_token[-50:]
    assert max(late) <= 12 and sum(late) <= sum(early) * 1.5 + 10
