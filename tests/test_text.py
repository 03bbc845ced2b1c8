"""Text in and out: to_tokens / to_str_tokens / to_string / to_single_token, text forward, generate and
stream on strings, all checked against the token-level path they wrap."""

import pytest
import torch

import glassformer as gf


def test_to_tokens_of_a_string_and_a_padded_list(chat_model):
    tok = chat_model.tokenizer
    one = chat_model.to_tokens("The cat sat")
    assert one.shape == (1, len(tok.encode("The cat sat"))) and one.dtype == torch.long
    tokens, mask = chat_model.to_tokens(["The cat sat on the mat.", "The dog"], return_mask=True)
    short = tok.encode("The dog")
    assert tokens[1, -len(short) :].tolist() == short  # left-padded
    assert mask[1].tolist() == [0] * (tokens.shape[1] - len(short)) + [1] * len(short)
    assert (tokens[1, : tokens.shape[1] - len(short)] == tok.pad_token_id).all()


def test_prepend_bos_follows_the_tokenizer_unless_told(chat_model):
    tok = chat_model.tokenizer
    tok.bos_token_id = tok.backend.token_to_id("<|im_start|>")
    assert chat_model.to_tokens("cat")[0, 0] != tok.bos_token_id  # add_bos_token is False
    assert chat_model.to_tokens("cat", prepend_bos=True)[0, 0] == tok.bos_token_id
    tok.add_bos_token = True
    assert chat_model.to_tokens("cat")[0, 0] == tok.bos_token_id
    assert chat_model.to_tokens("cat", prepend_bos=False)[0, 0] != tok.bos_token_id


def test_str_tokens_string_and_single_token(chat_model):
    text = "The cat sat on the mat."
    tokens = chat_model.to_tokens(text)
    pieces = chat_model.to_str_tokens(text)
    assert "".join(pieces) == text and pieces == chat_model.to_str_tokens(tokens) == chat_model.to_str_tokens(tokens[0])
    assert chat_model.to_string(tokens[0]) == text and chat_model.to_string(tokens) == [text]
    cat = chat_model.to_single_token(" cat")
    assert chat_model.to_string([cat]) == " cat"
    with pytest.raises(gf.InputError, match="token"):
        chat_model.to_single_token(" cat sat on the mat")


def test_a_model_without_tokenizer_says_so():
    model = gf.Transformer(gf.Config(n_layers=1, d_model=8, n_heads=2, d_vocab=16, n_ctx=8), seed=0)
    for call in (lambda: model.to_tokens("hi"), lambda: model("hi"), lambda: model.generate("hi", max_new_tokens=2)):
        with pytest.raises(gf.InputError, match="no tokenizer"):
            call()


@torch.no_grad()
def test_forward_and_cache_on_text_equal_tokens(chat_model):
    texts = ["The cat sat on the mat.", "The dog"]
    tokens, mask = chat_model.to_tokens(texts, return_mask=True)
    torch.testing.assert_close(chat_model(texts), chat_model(tokens, attention_mask=mask), atol=0, rtol=0)
    _, cache = chat_model.run_with_cache("The cat sat")
    _, by_tokens = chat_model.run_with_cache(chat_model.to_tokens("The cat sat"))
    assert torch.equal(cache["pattern", 1], by_tokens["pattern", 1])
    with pytest.raises(gf.InputError, match="not text with a mask"):
        chat_model("The cat", attention_mask=torch.ones(1, 2))


def test_generate_text_is_the_prompt_and_the_decoded_continuation(chat_model):
    prompt = "The cat sat"
    text = chat_model.generate(prompt, max_new_tokens=12, eos_token_id=None)
    tokens = chat_model.generate(chat_model.to_tokens(prompt), max_new_tokens=12)
    assert text == prompt + chat_model.to_string(tokens[0, -12:])


def test_generate_text_stops_at_eos(chat_model):
    eos = chat_model.tokenizer.eos_token_id
    tokens = chat_model.generate(chat_model.to_tokens("The"), max_new_tokens=30)[0, 1:].tolist()
    first = tokens[0]  # make the first greedy token the EOS: the text must end right there
    chat_model.tokenizer.eos_token_id = first
    assert chat_model.generate("The", max_new_tokens=30) == "The"
    chat_model.tokenizer.eos_token_id = eos


def test_batched_text_generation_equals_each_prompt_alone(chat_model):
    prompts = ["The cat sat on the mat.", "The dog"]
    together = chat_model.generate(prompts, max_new_tokens=8, eos_token_id=None)
    assert together == [chat_model.generate(p, max_new_tokens=8, eos_token_id=None) for p in prompts]


def test_stream_text_joins_to_generate(chat_model):
    prompt = "Héllo wörld, 日本 🙂"
    pieces = list(chat_model.stream(prompt, max_new_tokens=20, eos_token_id=None))
    assert len(pieces) == 20 and all(isinstance(p, str) for p in pieces)
    assert prompt + "".join(pieces) == chat_model.generate(prompt, max_new_tokens=20, eos_token_id=None)


def test_stream_text_never_splits_a_character(chat_model):
    """Force the decoder through tokens that cut characters into bytes: no piece shows half of one."""
    target = "日本 🙂 wörld"
    ids = chat_model.tokenizer.encode(target)
    assert any("<0x" in s for s in chat_model.tokenizer.token_strings(ids))  # some tokens are partial bytes
    step = iter(ids)

    def force(logits, hook):
        forced = torch.full_like(logits, -1e9)
        forced[..., next(step)] = 0.0
        return forced

    pieces = list(chat_model.stream("The", max_new_tokens=len(ids), eos_token_id=None,
                                    fwd_hooks=[("hook_logits", force)]))
    assert "".join(pieces) == target and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # a step that ended inside a character waited for the rest


def test_sampling_options_pass_through(chat_model):
    options = dict(do_sample=True, temperature=0.9, top_k=20, eos_token_id=None)
    a = chat_model.generate("The", max_new_tokens=10, generator=torch.Generator().manual_seed(3), **options)
    b = chat_model.generate("The", max_new_tokens=10, generator=torch.Generator().manual_seed(3), **options)
    assert a == b


def test_save_and_load_keep_the_tokenizer(chat_model, tmp_path):
    chat_model.save(tmp_path / "run")
    back = gf.Transformer.load(tmp_path / "run")
    text = "<|im_start|>user\nThe cat 🙂<|im_end|>"
    assert back.to_tokens(text).tolist() == chat_model.to_tokens(text).tolist()
    assert back.tokenizer.chat_template == chat_model.tokenizer.chat_template
    assert back.generate("The cat", max_new_tokens=6) == chat_model.generate("The cat", max_new_tokens=6)
