"""The tokenizer that lives beside a checkpoint: a `tokenizer.json` of the `tokenizers` library.

`TextTokenizer` adds what a model needs around it: its special ids, whether a prompt starts with BOS,
and its chat template, rendered the way `transformers` renders it. This module stays a leaf: the model,
the hooks and the converters import it, never the other way round.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, processors

from glassformer.checkpoints.files import atomic_write, read_json, write_json
from glassformer.errors import CheckpointError, InputError

# Tokens that end an assistant turn in the chat templates of the common model families.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")
SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The checkpoint's `tokenizer.json` (Hugging Face directories and glassformer runs both have one)."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"{path} is missing: this checkpoint has no tokenizer to turn text into tokens")
    return Tokenizer.from_file(str(path))


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of a prompt; an InputError when the tokenizer cannot encode it (a character a
    character-level vocabulary has never seen) or when it encodes to no tokens at all."""
    ids = TextTokenizer(tokenizer).encode(text)
    if not ids:
        raise InputError(f"the prompt {text!r} encodes to no tokens; give some text")
    return ids


def unknown_characters(tokenizer: Tokenizer, text: str) -> list[str]:
    """The characters of `text` that are not tokens of `tokenizer`'s vocabulary, sorted."""
    return sorted(set(text) - set(tokenizer.get_vocab()))


@dataclass(repr=False)
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus what a model needs to use it: special ids, BOS policy, chat template."""

    backend: Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None

    def __post_init__(self) -> None:
        if self.add_bos_token and self.bos_token_id is None:
            raise ValueError("add_bos_token=True needs a bos_token_id, got None")

    def __repr__(self) -> str:
        template = "none" if self.chat_template is None else f"{len(self.chat_template)} characters"
        return (
            f"TextTokenizer(vocab_size={self.vocab_size}, bos_token_id={self.bos_token_id}, eos_token_id="
            f"{self.eos_token_id}, pad_token_id={self.pad_token_id}, add_bos_token={self.add_bos_token}, "
            f"chat_template={template})"
        )

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special tokens written in it count as such. BOS first when `add_bos` (default:
        the tokenizer's policy), and never twice: text that already starts with BOS gets no second one."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        except Exception as err:  # the tokenizers library raises a bare Exception (e.g. a char vocabulary)
            unknown = unknown_characters(self.backend, text)
            detail = f"characters not in its vocabulary: {unknown[:10]}" if unknown else str(err)
            raise InputError(f"the tokenizer cannot encode {text[:40]!r}: {detail}") from None
        if self.add_bos_token if add_bos is None else add_bos:
            if self.bos_token_id is None:
                raise InputError("add_bos=True, but this tokenizer has no BOS token")
            if not ids or ids[0] != self.bos_token_id:
                ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """One readable string per token: the text it stands for (" the", not "Ġthe"), bytes that are no
        whole character as "<0xE2>", special tokens by name."""
        added = {i: t.content for i, t in self.backend.get_added_tokens_decoder().items()}
        spelling, strings = vocabulary_spelling(self.backend), []
        for i in (int(i) for i in ids):
            piece = self.backend.id_to_token(i)
            if piece is None:
                raise InputError(f"token id {i} is outside the vocabulary of {self.vocab_size} tokens")
            strings.append(added[i] if i in added else _readable(piece, spelling))
        return strings

    def token_id(self, text: str) -> int:
        """The id of the single token `text` is ("<|im_end|>", " the")."""
        ids = self.encode(text, add_bos=False)
        if len(ids) != 1:
            pieces = self.token_strings(ids)
            raise InputError(f"{text!r} is not a single token: it encodes to {len(ids)} tokens {pieces}")
        return ids[0]

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        """The conversation as the model's chat template writes it, exactly as `transformers`'
        `apply_chat_template(..., tokenize=False)` does."""
        if self.chat_template is None:
            raise InputError("this model has no chat template: give it plain text instead of messages")
        if not messages:
            raise InputError("messages is empty: a chat needs at least one message")
        import jinja2

        # transformers drops keys whose value is None: templates handle a missing key better than a None
        chat = [{key: value for key, value in dict(m).items() if value is not None} for m in messages]
        try:
            return _compile_template(self.chat_template).render(
                messages=chat, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self._special_token_strings(),
            )  # fmt: skip
        except jinja2.TemplateError as err:
            raise InputError(f"the chat template rejected the conversation: {err}") from None

    def stop_ids(self) -> list[int]:
        """Ids that end an assistant turn: EOS, and the template's end-of-turn tokens that are single tokens."""
        ids = [] if self.eos_token_id is None else [self.eos_token_id]
        for name in END_OF_TURN if self.chat_template else ():
            token = self.backend.token_to_id(name)
            if name in self.chat_template and token is not None and token not in ids:
                ids.append(token)
        return ids

    def save(self, directory: str | Path) -> None:
        """`tokenizer.json` and a Hugging Face style `tokenizer_config.json`, each written atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        backend = self._backend_adding_bos_as_told()
        atomic_write(directory / "tokenizer.json", lambda tmp: backend.save(str(tmp)))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": self.add_bos_token}
        config |= self._special_token_strings()
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_json(directory / "tokenizer_config.json", config)

    @classmethod
    def load(cls, directory: str | Path) -> TextTokenizer:
        """A tokenizer directory: one `save` wrote, a Hugging Face model's, or a glassformer run's."""
        directory = Path(directory)
        backend = load_tokenizer(directory)
        config = _read_config(directory)
        ids = {key: _token_to_id(backend, config.get(key), key) for key in SPECIAL_KEYS}
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # transformers keeps tokenizer.json's post-processor then: it may add BOS
            leading = _leading_special_token(backend)
            add_bos = leading is not None and ids["bos_token"] in (None, leading)
            ids["bos_token"] = leading if add_bos else ids["bos_token"]
        return cls(
            backend,
            bos_token_id=ids["bos_token"],
            eos_token_id=ids["eos_token"],
            pad_token_id=ids["pad_token"],
            add_bos_token=bool(add_bos) and ids["bos_token"] is not None,
            chat_template=_read_chat_template(directory, config),
        )

    def _backend_adding_bos_as_told(self) -> Tokenizer:
        """The backend, or a copy whose post-processor adds BOS exactly when add_bos_token says so: transformers
        (5.x) reads that from tokenizer.json and ignores tokenizer_config.json's add_bos_token."""
        if _leading_special_token(self.backend) == (self.bos_token_id if self.add_bos_token else None):
            return self.backend
        backend = Tokenizer.from_str(self.backend.to_str())
        if self.add_bos_token:
            bos = self.backend.id_to_token(self.bos_token_id)
            single, pair, special = f"{bos}:0 $A:0", f"{bos}:0 $A:0 {bos}:1 $B:1", [(bos, self.bos_token_id)]
        else:
            single, pair, special = "$A:0", "$A:0 $B:1", []
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
        return backend

    def _special_token_strings(self) -> dict[str, str]:
        """bos_token, eos_token, pad_token as the strings a chat template or tokenizer_config.json uses."""
        ids = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id, "pad_token": self.pad_token_id}
        return {key: self.backend.id_to_token(i) for key, i in ids.items() if i is not None}


def directory_tokenizer(source: Any) -> TextTokenizer | None:
    """The tokenizer of a checkpoint directory, or None when `source` is no directory or has no tokenizer.json."""
    if not isinstance(source, str | Path) or not (Path(source) / "tokenizer.json").is_file():
        return None
    return TextTokenizer.load(source)


def vocabulary_spelling(backend: Tokenizer) -> str:
    """How a vocabulary spells text, read off its decoder: "byte-level" (GPT-2's "Ġthe"), "metaspace"
    (SentencePiece's "▁the" and "<0xE2>") or "plain" (the text itself)."""
    decoder = backend.decoder
    types = set(re.findall(r'"type":"(\w+)"', decoder.__getstate__().decode())) if decoder else set()
    if "ByteLevel" in types:
        return "byte-level"
    return "metaspace" if types & {"Metaspace", "ByteFallback", "Replace"} else "plain"


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    """transformers' `tojson`: no HTML escaping, unlike Jinja's own."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    """A chat template compiled in the sandboxed environment transformers uses, with the same helpers."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' token masks; it
        renders its body unchanged, as transformers does when it tracks nothing."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise CheckpointError(f"the model's chat template is not valid Jinja: {err}") from None


def _readable(piece: str, spelling: str) -> str:
    """The text a vocabulary entry stands for, bytes that are no whole character shown as <0xNN>."""
    if spelling == "byte-level":
        table = _byte_level_decoder()
        raw = bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
        return _escape_partial_utf8(raw)
    if spelling == "metaspace":
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
        if byte:
            return _escape_partial_utf8(bytes([int(byte[1], 16)]))
        return piece.replace("\u2581", " ")
    return piece


def _escape_partial_utf8(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="surrogateescape")
    return re.sub("[\udc80-\udcff]", lambda m: f"<0x{ord(m[0]) - 0xDC00:02X}>", text)


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's printable spelling of the 256 bytes, inverted: character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelled, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            spelled[chr(byte)] = byte
        else:
            spelled[chr(256 + extra)] = byte
            extra += 1
    return spelled


def _read_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json, with special tokens from special_tokens_map.json where it lacks them."""
    config = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
    special_map = directory / "special_tokens_map.json"
    if special_map.exists():
        config = {**read_json(special_map), **config}
    return config


def _token_to_id(backend: Tokenizer, token: Any, key: str) -> int | None:
    """The id of a special token given as a string or as transformers' {"content": ...} dict."""
    if isinstance(token, dict):
        token = token.get("content")
    if token is None:
        return None
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise CheckpointError(f"tokenizer_config.json names {key} {token!r}, which is not in the vocabulary")
    return token_id


def _leading_special_token(backend: Tokenizer) -> int | None:
    """The id of the special token tokenizer.json's post-processor puts before the text, if it puts one."""
    if backend.post_processor is None:
        return None
    processor = json.loads(backend.post_processor.__getstate__())
    for step in processor.get("processors", [processor]):
        single = step.get("single") if step.get("type") == "TemplateProcessing" else None
        if single and "SpecialToken" in single[0]:
            name = single[0]["SpecialToken"]["id"]
            return step["special_tokens"][name]["ids"][0]
    return None


def _read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """chat_template.jinja if there is one, else tokenizer_config.json's (a string, or named templates)."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.exists():
        return jinja_file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        return named.get("default")
    return template
