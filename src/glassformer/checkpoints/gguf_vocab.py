"""The tokenizer of a GGUF file (llama.cpp's format), rebuilt with the `tokenizers` library.

A GGUF carries no `tokenizer.json`: its vocabulary, merges, token types and special ids are metadata
under llama.cpp's key names. `tokenizer_from_gguf` turns them into the tokenizer llama.cpp runs:
byte-level BPE split the way `tokenizer.ggml.pre` says ("gpt2"), SentencePiece-style BPE with byte
fallback ("llama"), or a SentencePiece unigram vocabulary with scores ("t5").
"""

from __future__ import annotations

import base64
import json
import re
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from glassformer.errors import CheckpointError
from glassformer.tokenizer import TextTokenizer, vocabulary_spelling

KEY = "tokenizer.ggml."
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6  # llama.cpp's token types (5 is unused)
METASPACE = "\u2581"

# The pre-tokenizer splits of llama.cpp (src/llama-vocab.cpp, `regex_exprs`): each regex splits the pieces
# the previous one left, matches and the text between them both becoming pieces.
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
QWEN35 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The same splits as Hugging Face's tokenizer.json files write them.
HF_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
HF_QWEN2 = HF_LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
BLOOM = r" ?[^(\s|.,!?…。，、।۔،)]+"
DEEPSEEK3 = (
    r"\p{N}{1,3}",
    r"[一-龥぀-ゟ゠-ヿ]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)


def _family(splits: tuple[str, ...], *names: str) -> dict[str, tuple[str, ...]]:
    return dict.fromkeys(names, splits)


PRE_SPLITS: dict[str, tuple[str, ...]] = {
    **_family((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", "[0-9][0-9][0-9]"), "default"),
    **_family((LLAMA3,), "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
    **_family((LLAMA3,), "dbrx", "smaug-bpe", "glm4", "chatglm-bpe"),
    **_family((r"\p{N}", GPT2), "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
    **_family((GPT2,), "gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "trillion", "granite-docling", "mellum"),
    **_family((QWEN2,), "qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"),
    **_family((QWEN35,), "qwen35"),
    **_family((GPT4O,), "gpt-4o", "llama4", "minimax-m2"),
    **_family((TEKKEN,), "tekken"),
    **_family((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, "[0-9][0-9][0-9]"), "falcon"),
    **_family(("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", "[一-龥ࠀ-一가-퟿]+", r"\p{N}"), "deepseek-coder"),
    **_family(DEEPSEEK3, "deepseek-v3"),
    **_family((BLOOM,), "bloom", "gpt3-finnish", "poro-chat"),
    **_family((BLOOM, r"\p{N}"), "viking"),
}
# Pre-tokenizers whose words are looked up whole before any merge, and those that add BOS unless told not to.
IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken"}
ADDS_BOS = IGNORE_MERGES


def read_metadata(reader: Any) -> dict[str, Any]:
    """A `gguf.GGUFReader`'s key-value fields as plain Python values (str, int, float, bool, lists)."""
    return {name: field.contents() for name, field in reader.fields.items()}


def tokenizer_from_gguf(meta: Mapping[str, Any]) -> TextTokenizer:
    """The tokenizer a GGUF file's metadata describes, with its special ids, BOS policy and chat template."""
    kind = _require(meta, KEY + "model")
    if kind not in BUILDERS:
        raise CheckpointError(
            f"{KEY}model is {kind!r}, a tokenizer glassformer cannot rebuild; supported: {sorted(BUILDERS)}"
        )
    tokens = _tokens(_require(meta, KEY + "tokens"))
    types = list(meta.get(KEY + "token_type") or [NORMAL] * len(tokens))
    if kind == "t5":
        _name_sentinels(tokens, types)
    backend, add_bos_default = BUILDERS[kind](meta, tokens, types)
    _add_special_tokens(backend, tokens, types)
    spm_defaults = {"bos": 1, "eos": 2} if kind == "llama" else {}
    ids = {name: _special_id(meta, name, len(tokens), spm_defaults.get(name)) for name in ("bos", "eos", "padding")}
    add_bos = bool(meta.get(KEY + "add_bos_token", add_bos_default)) and ids["bos"] is not None
    return TextTokenizer(
        backend,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["padding"],
        add_bos_token=add_bos,
        chat_template=meta.get("tokenizer.chat_template"),
    )


def tokenizer_metadata(tokenizer: TextTokenizer) -> dict[str, Any]:
    """The GGUF metadata that describes `tokenizer` (what `tokenizer_from_gguf` reads back): a byte-level BPE
    as "gpt2", a SentencePiece-style BPE as "llama", a SentencePiece unigram as "t5". Other tokenizers are a
    CheckpointError."""
    backend = tokenizer.backend
    model = json.loads(backend.model.__getstate__())
    if model.get("type") not in ("BPE", "Unigram"):
        raise CheckpointError(f"a {model.get('type')} tokenizer cannot be written to GGUF; BPE and Unigram ones can")
    tokens = [backend.id_to_token(i) for i in range(tokenizer.vocab_size)]
    if None in tokens:
        raise CheckpointError(f"token id {tokens.index(None)} has no token: GGUF needs ids without gaps")
    meta: dict[str, Any] = {KEY + "tokens": tokens, KEY + "token_type": _token_types(backend, tokens)}
    written = _bpe_metadata if model["type"] == "BPE" else _unigram_metadata
    meta |= written(backend, model, tokens)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "padding": tokenizer.pad_token_id}
    meta |= {f"{KEY}{name}_token_id": i for name, i in ids.items() if i is not None}
    meta[KEY + "add_bos_token"] = tokenizer.add_bos_token
    if tokenizer.chat_template is not None:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _bpe_metadata(backend: Tokenizer, model: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    """A BPE vocabulary's merges, and how it spells text: byte-level ("gpt2") or SentencePiece-style ("llama")."""
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    spelling = vocabulary_spelling(backend)
    if spelling == "byte-level":
        return {KEY + "merges": merges, KEY + "model": "gpt2", KEY + "pre": _pre_name(backend)}
    if spelling == "metaspace":
        meta = {KEY + "model": "llama", KEY + "add_space_prefix": _adds_space_prefix(backend)}
        return meta | {KEY + "merges": merges, KEY + "scores": _scores(tokens, merges)}
    raise CheckpointError("only byte-level and SentencePiece-style tokenizers can be written to GGUF")


def _unigram_metadata(backend: Tokenizer, model: dict[str, Any], tokens: list[str]) -> dict[str, Any]:
    """A SentencePiece unigram vocabulary as llama.cpp's "t5" tokenizer: each token's score (0 for tokens added
    beyond the model's vocabulary, as transformers scores T5's sentinels), its unknown id, its charsmap."""
    if model.get("byte_fallback"):
        raise CheckpointError("a Unigram tokenizer with byte fallback cannot be written to GGUF (llama.cpp's has none)")
    if not _adds_space_prefix(backend):
        raise CheckpointError("a Unigram tokenizer that puts no \u2581 before the text cannot be written to GGUF")
    scores = [score for _, score in model["vocab"]]
    meta = {KEY + "model": "t5", KEY + "scores": scores + [0.0] * (len(tokens) - len(scores))}
    meta |= {KEY + "add_space_prefix": True, KEY + "remove_extra_whitespaces": True}  # as the reading rebuilds it
    if model.get("unk_id") is not None:
        meta[KEY + "unknown_token_id"] = model["unk_id"]
    charsmap = _precompiled_charsmap(backend)
    return meta | ({KEY + "precompiled_charsmap": charsmap} if charsmap else {})


def _precompiled_charsmap(backend: Tokenizer) -> list[int] | None:
    """The bytes of SentencePiece's normalization table, when `backend` normalizes with one and nothing else
    GGUF could not say (collapsing spaces, as Hugging Face's T5 tokenizers do, is llama.cpp's default)."""
    state = json.loads(backend.normalizer.__getstate__()) if backend.normalizer else {}
    steps = state.get("normalizers", [state] if state else [])
    tables = [step for step in steps if step["type"] == "Precompiled"]
    collapse = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
    if any(step["type"] != "Precompiled" and step != collapse for step in steps) or len(tables) > 1:
        raise CheckpointError(f"GGUF cannot hold this Unigram tokenizer's normalizer: {json.dumps(state)[:200]}")
    return list(base64.b64decode(tables[0]["precompiled_charsmap"])) if tables else None


def _token_types(backend: Tokenizer, tokens: list[str]) -> list[int]:
    """llama.cpp's type of each token: special added tokens are control, other added ones user-defined,
    "<0xNN>" byte tokens of a SentencePiece vocabulary bytes, the rest normal."""
    added = backend.get_added_tokens_decoder()
    byte_tokens = vocabulary_spelling(backend) == "metaspace"

    def kind(i: int, token: str) -> int:
        if i in added:
            return CONTROL if added[i].special else USER_DEFINED
        return BYTE if byte_tokens and re.fullmatch("<0x[0-9A-F]{2}>", token) else NORMAL

    return [kind(i, token) for i, token in enumerate(tokens)]


def _adds_space_prefix(backend: Tokenizer) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" before the text (Metaspace, or a Prepend normalizer)."""
    pre = backend.pre_tokenizer.__getstate__().decode() if backend.pre_tokenizer else ""
    if "Metaspace" in pre:
        return '"prepend_scheme":"never"' not in pre
    return "Prepend" in (backend.normalizer.__getstate__().decode() if backend.normalizer else "")


def _byte_level(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> tuple[Tokenizer, bool]:
    """GPT-2 style byte-level BPE, its text split by the regexes llama.cpp uses for `tokenizer.ggml.pre`."""
    pre = meta.get(KEY + "pre") or "default"
    if pre not in PRE_SPLITS:
        known = ", ".join(sorted(PRE_SPLITS))
        raise CheckpointError(f"{KEY}pre is {pre!r}, a pre-tokenizer glassformer does not know; known: {known}")
    vocab = _vocab(_byte_level_spelling(tokens, types))
    merges = _merges(_require(meta, KEY + "merges"))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in IGNORE_MERGES))
    backend.pre_tokenizer = _split(pre)
    backend.decoder = decoders.ByteLevel()
    return backend, pre in ADDS_BOS


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> tuple[Tokenizer, bool]:
    """SentencePiece BPE: "▁" for spaces (one put before the text unless add_space_prefix is false), <0xNN>
    tokens for bytes of characters the vocabulary lacks; merges from the file, or ranked by token score."""
    vocab = _vocab(tokens)
    if KEY + "merges" in meta:
        merges = _merges(meta[KEY + "merges"])
    else:
        merges = _merges_from_scores(tokens, _require(meta, KEY + "scores"))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get(KEY + "add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(METASPACE, "first" if prefix else "never", split=False)
    strip = [decoders.Strip(" ", 1, 0)] if prefix else []
    spaces = decoders.Replace(METASPACE, " ")
    backend.decoder = decoders.Sequence([spaces, decoders.ByteFallback(), decoders.Fuse(), *strip])
    return backend, True


def _unigram(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> tuple[Tokenizer, bool]:
    """SentencePiece unigram (llama.cpp's "t5"), built as transformers builds it from a GGUF file: the pieces with
    their scores, words split at whitespace (runs of it count as one) and each given a "▁" first; normalized
    first by the file's SentencePiece charsmap (llama.cpp applies it, transformers does not), where it has one."""
    if not meta.get(KEY + "add_space_prefix", True):
        raise CheckpointError(f"{KEY}add_space_prefix is false: glassformer reads only t5 tokenizers that prefix")
    scores = _require(meta, KEY + "scores")
    vocab = list(zip(tokens, scores, strict=True))
    backend = Tokenizer(models.Unigram(vocab, unk_id=_special_id(meta, "unknown", len(tokens), None)))
    charsmap = meta.get(KEY + "precompiled_charsmap")
    if charsmap:
        backend.normalizer = normalizers.Precompiled(bytes(charsmap))
    words = pre_tokenizers.Metaspace(METASPACE, "always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), words])
    backend.decoder = decoders.Metaspace(METASPACE, "always", split=True)
    return backend, False


def _name_sentinels(tokens: list[str], types: list[int], count: int = 100) -> None:
    """T5's sentinels, which llama.cpp's converter writes as "[PAD<n>]" tokens past the SentencePiece vocabulary:
    the first `count` renamed back (the first is <extra_id_99>, the last <extra_id_0>) and made control tokens,
    in place, as transformers does."""
    blanks = [i for i, token in enumerate(tokens) if re.fullmatch(r"\[PAD\d+\]", token)]
    for offset, i in enumerate(blanks[:count]):
        tokens[i], types[i] = f"<extra_id_{count - 1 - offset}>", CONTROL


def _split(pre: str) -> pre_tokenizers.PreTokenizer:
    """llama.cpp's regexes for `pre`, one after the other, then bytes spelled in GPT-2's alphabet."""
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in PRE_SPLITS[pre]]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(False, use_regex=False)])


def _pre_name(backend: Tokenizer) -> str:
    """The `tokenizer.ggml.pre` that splits text as `backend`'s pre-tokenizer does: one of ours, or one of the
    byte-level pre-tokenizers Hugging Face tokenizers (and glassformer's own BPE) use."""
    state = backend.pre_tokenizer.__getstate__() if backend.pre_tokenizer else b"null"
    for name in PRE_SPLITS:
        if _split(name).__getstate__() == state:
            return name
    pre = json.loads(state) or {}
    steps = [step.get("type") for step in pre.get("pretokenizers", [pre])]
    if steps == ["ByteLevel"] and pre.get("use_regex", True):
        return "gpt-2"
    if steps == ["Digits", "ByteLevel"] and pre["pretokenizers"][0].get("individual_digits"):
        return "smollm"
    if steps == ["Split", "ByteLevel"]:
        regex = pre["pretokenizers"][0].get("pattern", {}).get("Regex", "")
        known = {HF_LLAMA3: "llama-bpe", HF_QWEN2: "qwen2"}
        if regex in known:
            return known[regex]
    raise CheckpointError(f"no tokenizer.ggml.pre splits text as this pre-tokenizer does: {state.decode()[:200]}")


def _scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that rank the merges as `merges` does: the token a merge makes scores minus its
    rank; tokens no merge makes score below all of them."""
    made = {merge.replace(" ", ""): -float(rank) for rank, merge in reversed(list(enumerate(merges)))}
    return [made.get(token, -float(len(merges) + i)) for i, token in enumerate(tokens)]


BUILDERS: dict[str, Callable[[Mapping[str, Any], list[str], list[int]], tuple[Tokenizer, bool]]] = {
    "gpt2": _byte_level,
    "llama": _sentencepiece,
    "t5": _unigram,
}


def _require(meta: Mapping[str, Any], key: str) -> Any:
    if key not in meta:
        raise CheckpointError(f"the GGUF metadata has no {key}: the file does not describe its tokenizer")
    return meta[key]


def _tokens(tokens: list[str]) -> list[str]:
    """The vocabulary, an empty entry renamed as llama.cpp does ("[EMPTY_7]") so every id has a key."""
    return [token or f"[EMPTY_{i}]" for i, token in enumerate(tokens)]


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        seen: dict[str, int] = {}
        for i, token in enumerate(tokens):
            if token in seen:
                raise CheckpointError(f"{KEY}tokens holds {token!r} twice, as ids {seen[token]} and {i}")
            seen[token] = i
    return vocab


def _byte_level_spelling(tokens: list[str], types: list[int]) -> list[str]:
    """Tokens in GPT-2's byte alphabet ("Ġthe"). A file that writes a normal token as plain text gets it
    respelled; control and user-defined tokens stay as written, since text spells them that way."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    respell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return [
        token
        if kind in (CONTROL, USER_DEFINED) or set(token) <= alphabet
        else "".join(piece for piece, _ in respell.pre_tokenize_str(token))
        for token, kind in zip(tokens, types, strict=False)
    ]


def _merges(merges: list[str]) -> list[tuple[str, str]]:
    """"a b" -> ("a", "b"), split at the first space after the first character, as llama.cpp does."""
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut < 0:
            raise CheckpointError(f"{KEY}merges holds {merge!r}, which is not two tokens separated by a space")
        pairs.append((merge[:cut], merge[cut + 1 :]))
    return pairs


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Every split of a token into two tokens is a merge; merges rank by the merged token's score, best
    first, then by longer left and right parts (transformers' `generate_merges`, so both agree)."""
    ids = {token: i for i, token in enumerate(tokens)}
    ranked = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ids and token[k:] in ids]
        pairs.sort(key=lambda pair: (ids[pair[0]], ids[pair[1]]))
        ranked += [(score, len(left), len(right), left, right) for left, right in pairs]
    ranked.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(left, right) for *_, left, right in ranked]


def _add_special_tokens(backend: Tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens ("<|im_end|>", "<unk>") become special tokens and user-defined ones plain
    added tokens: both are then matched whole in text, as llama.cpp matches them."""
    pairs = list(zip(tokens, types, strict=False))
    special = [AddedToken(t, special=True, normalized=False) for t, k in pairs if k in (CONTROL, UNKNOWN)]
    backend.add_special_tokens(special)
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in pairs if k == USER_DEFINED])


def _special_id(meta: Mapping[str, Any], name: str, n_tokens: int, default: int | None) -> int | None:
    """`tokenizer.ggml.<name>_token_id`, or llama.cpp's default; an id outside the vocabulary is dropped."""
    key = f"{KEY}{name}_token_id"
    token_id = meta.get(key, default)
    if token_id is not None and not 0 <= token_id < n_tokens:
        if key in meta:
            warnings.warn(f"{key} = {token_id} is outside the vocabulary of {n_tokens} tokens; ignored", stacklevel=3)
        return None
    return token_id
