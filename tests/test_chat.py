"""Chat: the template's rendering, stop at end of turn, and one KV cache across turns that gives the
answers a fresh run over the whole conversation gives."""

import pytest
import torch

import glassformer as gf
from glassformer import chat as chat_module
from glassformer.chat import shared_prefix


def test_chat_answers_what_generate_gives_on_the_rendered_prompt(chat_model):
    messages = [{"role": "user", "content": "The cat sat"}]
    tok = chat_model.tokenizer
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)
    tokens = chat_model.generate(torch.tensor([prompt]), max_new_tokens=16, eos_token_id=tok.stop_ids())
    new = tokens[0, len(prompt) :].tolist()
    new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert chat_model.chat(messages, max_new_tokens=16) == tok.decode(new)


def test_second_turn_feeds_only_what_is_new_and_answers_as_a_fresh_run(chat_model, monkeypatch):
    monkeypatch.setattr(chat_module, "CACHE_STEP", 16)  # make the cache grow between turns
    session = chat_model.chat_session(system="You are terse.")
    first = "".join(session.send("The cat sat on the mat.", max_new_tokens=10))
    length_after_first = len(session.ids)
    second = "".join(session.send("The dog sat on the log.", max_new_tokens=10))
    rendered = chat_model.tokenizer.apply_chat_template(session.conversation()[:-1], add_generation_prompt=True)
    whole = len(chat_model.tokenizer.encode(rendered, add_bos=False))
    assert session.prefilled < whole - length_after_first // 2  # the earlier turns were not fed again
    assert session.cache.max_len >= whole
    conversation = session.conversation()
    fresh = chat_model.chat(conversation[:-1], max_new_tokens=10)
    assert second == fresh and conversation[2] == {"role": "assistant", "content": first}


def test_reset_and_a_new_system_message(chat_model):
    session = chat_model.chat_session()
    answer = "".join(session.send("The cat", max_new_tokens=5))
    session.reset(system="Be brief.")
    assert session.messages == [] and session.ids == [] and session.cache.length == 0
    again = "".join(session.send("The cat", max_new_tokens=5))
    expected = chat_model.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The cat"}], 5)
    assert again == expected and isinstance(answer, str)


def test_an_answer_stopped_early_stays_in_the_conversation(chat_model):
    session = chat_model.chat_session()
    stream = session.send("The cat sat", max_new_tokens=20)
    partial = next(stream) + next(stream)
    stream.close()  # what Ctrl-C does in the terminal
    assert session.messages[-1] == {"role": "assistant", "content": partial}
    second = "".join(session.send("The dog", max_new_tokens=6))
    assert second == chat_model.chat(session.conversation()[:-1], max_new_tokens=6)


def test_a_conversation_past_n_ctx_is_a_clear_error(chat_model):
    session = chat_model.chat_session()
    with pytest.raises(gf.InputError, match="n_ctx=512"):
        "".join(session.send("The cat sat on the mat. " * 80, max_new_tokens=4))
    assert session.messages == []  # the message that did not fit is not kept


def test_chat_needs_a_template_and_well_formed_messages(chat_model):
    with pytest.raises(gf.InputError, match="role"):
        chat_model.chat([{"text": "hi"}])
    with pytest.raises(gf.InputError, match="user"):
        chat_model.chat([{"role": "assistant", "content": "hi"}])
    chat_model.tokenizer.chat_template = None
    with pytest.raises(gf.InputError, match="no chat template"):
        chat_model.chat([{"role": "user", "content": "hi"}])


def test_shared_prefix():
    assert shared_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and shared_prefix([], [1]) == 0


def test_longrope_keys_are_re_rotated_when_the_conversation_outgrows_the_original_context(chat_model):
    """Past LongRoPE's original context every key takes the long factors: the chat's cached answer and
    generate's both equal greedy decoding by a full forward over the whole sequence at each step."""
    import dataclasses

    tok = chat_model.tokenizer
    messages = [{"role": "user", "content": "The cat sat"}]
    prompt = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_bos=False)
    scaling = {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [3.0, 6.0, 9.0, 12.0]}
    scaling["original_n_ctx"] = len(prompt) + 3  # the switch comes in the middle of the answer
    model = gf.Transformer(dataclasses.replace(chat_model.cfg, rotary_scaling=scaling, init_std=0.3), seed=0).eval()
    model.tokenizer = tok
    tokens, stops = list(prompt), set(tok.stop_ids())
    with torch.no_grad():
        for _ in range(10):
            token = int(model(torch.tensor([tokens]))[0, -1].argmax())
            if token in stops:
                break
            tokens.append(token)
    assert len(tokens) > len(prompt) + 4  # the answer crossed the switch
    assert model.chat(messages, max_new_tokens=10) == tok.decode(tokens[len(prompt) :])
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=len(tokens) - len(prompt))
    assert generated[0].tolist() == tokens
