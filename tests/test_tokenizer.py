"""TextTokenizer: BOS policy, readable token strings, save/load, Hugging Face directories and chat templates
rendered exactly as `transformers` renders them."""

import json

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from glassformer.errors import CheckpointError, InputError
from glassformer.tokenizer import TextTokenizer, directory_tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEXT = "the cat sat on the mat. the dog ate the bone.\nthen 12 cats and 345 dogs met in the hall.\n" * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "the cat sat",
    "  two leading spaces",
    "tabs\tand\nnewlines\n\n",
    "digits 0123456789",
    "naïve café €",
    "中文 🤖",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>the end",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ],
]


def byte_level_backend() -> Tokenizer:
    """A small GPT-2 style byte-level BPE trained on TEXT, with ChatML's special tokens at ids 0..2."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    options = dict(special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    trainer = trainers.BpeTrainer(vocab_size=320, **options)
    backend.train_from_iterator([TEXT], trainer)
    return backend


@pytest.fixture
def tok():
    return TextTokenizer(byte_level_backend(), bos_token_id=1, eos_token_id=2, pad_token_id=0, chat_template=CHATML)


# BOS policy


def test_bos_follows_the_policy_and_is_never_doubled(tok):
    plain = tok.encode("the cat")
    assert plain[0] != 1 and tok.encode("the cat", add_bos=None) == plain  # add_bos_token is False here
    assert tok.encode("the cat", add_bos=True) == [1, *plain]
    tok.add_bos_token = True
    assert tok.encode("the cat") == [1, *plain]
    assert tok.encode("the cat", add_bos=False) == plain
    assert tok.encode("<|im_start|>the cat") == [1, *plain]  # the text's own BOS is the only one
    assert tok.encode("") == [1]


def test_bos_needs_a_bos_token(tok):
    tok.bos_token_id = None
    with pytest.raises(InputError, match="no BOS"):
        tok.encode("the cat", add_bos=True)
    with pytest.raises(ValueError, match="bos_token_id"):
        TextTokenizer(byte_level_backend(), add_bos_token=True)


def test_special_tokens_written_as_text_are_special(tok):
    ids = tok.encode("<|im_start|>user\nthe cat<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "<|im_start|>user\nthe cat<|im_end|>"
    assert tok.decode(ids, skip_special_tokens=True) == "user\nthe cat"


@pytest.mark.parametrize("text", CORPUS)
def test_decode_inverts_encode(tok, text):
    assert tok.decode(tok.encode(text)) == text


# token strings and ids


def test_token_strings_are_the_text_each_token_stands_for(tok):
    ids = tok.encode("the cat\n<|im_end|>")
    strings = tok.token_strings(ids)
    assert "".join(strings) == "the cat\n<|im_end|>"
    assert " cat" in strings and "\n" in strings and strings[-1] == "<|im_end|>"
    assert not any("Ġ" in s or "Ċ" in s for s in strings)


def test_token_strings_show_partial_characters_as_bytes(tok):
    ids = tok.encode("€")  # three bytes the small vocabulary never merged
    assert tok.token_strings(ids) == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert tok.decode(ids) == "€"


def test_token_strings_reject_ids_outside_the_vocabulary(tok):
    with pytest.raises(InputError, match="outside the vocabulary"):
        tok.token_strings([tok.vocab_size])


def test_token_id(tok):
    assert tok.token_id("<|im_end|>") == 2
    assert tok.token_strings([tok.token_id(" the")]) == [" the"]
    with pytest.raises(InputError, match=r"'the cat sat on' is not a single token: it encodes to \d tokens"):
        tok.token_id("the cat sat on")
    with pytest.raises(InputError, match="encodes to 0 tokens"):
        tok.token_id("")


def test_vocab_size_counts_added_tokens(tok):
    n = tok.vocab_size
    tok.backend.add_special_tokens([AddedToken("<extra>", special=True)])
    assert tok.vocab_size == n + 1 and tok.token_id("<extra>") == n
    assert repr(tok).startswith(f"TextTokenizer(vocab_size={n + 1}, bos_token_id=1,")


def test_stop_ids_are_eos_and_the_templates_end_of_turn(tok):
    tok.eos_token_id = 0
    assert tok.stop_ids() == [0, 2]
    tok.chat_template = None
    assert tok.stop_ids() == [0]


# save and load


def test_save_load_round_trip(tmp_path, tok):
    tok.add_bos_token = True
    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>" and config["add_bos_token"] is True
    assert config["chat_template"] == CHATML
    back = TextTokenizer.load(tmp_path)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 0)
    assert back.add_bos_token and back.chat_template == CHATML
    for text in CORPUS:
        assert back.encode(text) == tok.encode(text)
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_load_a_training_run_directory(tmp_path):
    """glassformer runs keep only tokenizer.json: no special ids, no BOS, no chat template."""
    from glassformer.training.tokenizers import char_tokenizer

    char_tokenizer("hello world").save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.load(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token, tok.chat_template) == (None, None, False, None)
    assert tok.decode(tok.encode("hello")) == "hello" and tok.token_strings(tok.encode("lo")) == ["l", "o"]
    with pytest.raises(InputError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_load_without_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        TextTokenizer.load(tmp_path)
    assert directory_tokenizer(tmp_path) is None
    assert directory_tokenizer(object()) is None


def test_load_hf_config_variants(tmp_path):
    """Special tokens as {"content": ...} dicts, named templates, chat_template.jinja over the config's."""
    byte_level_backend().save(str(tmp_path / "tokenizer.json"))
    config = {
        "bos_token": {"content": "<|im_start|>", "lstrip": False},
        "eos_token": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": CHATML}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = TextTokenizer.load(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.chat_template) == (1, 2, None, CHATML)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert directory_tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "x"
    config["eos_token"] = "<not-a-token>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="eos_token '<not-a-token>'"):
        TextTokenizer.load(tmp_path)


# against transformers

transformers = pytest.importorskip("transformers")


def hf_tokenizer(backend: Tokenizer, **kwargs):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def test_load_a_transformers_directory(tmp_path):
    ref = hf_tokenizer(
        byte_level_backend(), bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=CHATML,
    )  # fmt: skip
    ref.save_pretrained(tmp_path)
    tok = TextTokenizer.load(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    for text in CORPUS:
        assert tok.encode(text) == ref.encode(text), text
    for messages in CONVERSATIONS:
        assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False)


def test_bos_from_the_post_processor_when_the_config_does_not_say(tmp_path):
    """Llama-style tokenizer.json adds BOS in its post-processor; AutoTokenizer keeps that when the config
    has no add_bos_token, and so does load."""
    backend = byte_level_backend()
    bos = [("<|im_start|>", 1)]
    backend.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=bos)
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    tok = TextTokenizer.load(tmp_path)
    assert tok.add_bos_token and tok.bos_token_id == 1
    for text in CORPUS:
        expected = ref.encode(text)
        if expected[:2] == [1, 1]:  # transformers doubles BOS on text that starts with it; encode never does
            expected = expected[1:]
        assert tok.encode(text) == expected, text


@pytest.mark.parametrize("add_bos", [True, False])
def test_saved_directory_opens_in_transformers(tmp_path, tok, add_bos):
    """transformers takes BOS from tokenizer.json's post-processor, so save writes the policy there too."""
    tok.add_bos_token = add_bos
    tok.save(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ref.bos_token == "<|im_start|>" and ref.eos_token == "<|im_end|>"
    for text in CORPUS[:6]:
        assert tok.encode(text) == ref.encode(text), text
    assert tok.backend.post_processor is None  # the tokenizer itself is left as it was


TEMPLATES = {
    "chatml": CHATML,
    "system first, tojson, loop controls": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = 'default' %}{% endif %}"
        "{{ bos_token }}[{{ system | tojson }}]\n{% for m in messages %}{% if m['content'] == 'STOP' %}{% break %}"
        "{% endif %}  {{ m['role'] }}: {{ m | tojson }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}{{ eos_token }}"
    ),
    "indented blocks (trim_blocks, lstrip_blocks)": (
        "{% for m in messages %}\n    {% if m['role'] == 'user' %}\n<user>{{ m['content'] }}\n    {% else %}\n"
        "<{{ m['role'] }}>{{ m['content'] }}\n    {% endif %}\n{% endfor %}\n"
        "{% if add_generation_prompt %}\n<assistant>\n{% endif %}"
    ),
    "generation tag": (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
        "{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    ),
}


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize(
    "messages",
    CONVERSATIONS
    + [
        [{"role": "user", "content": "é <b>&\"quoted\"</b>"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "STOP"}, {"role": "user", "content": "b"}],
    ],
)
def test_chat_template_renders_as_transformers_does(tok, name, add_generation_prompt, messages):
    tok.chat_template = TEMPLATES[name]
    ref = hf_tokenizer(tok.backend, bos_token="<|im_start|>", eos_token="<|im_end|>", chat_template=tok.chat_template)
    expected = ref.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_errors(tok):
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InputError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(InputError, match="empty"):
        tok.apply_chat_template([])
    tok.chat_template = "{% for %}"
    with pytest.raises(CheckpointError, match="not valid Jinja"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    tok.chat_template = "{{ strftime_now('%Y') }}{{ ''.__class__.__mro__ }}"
    with pytest.raises(InputError, match="unsafe"):  # the sandbox refuses attribute escapes
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
