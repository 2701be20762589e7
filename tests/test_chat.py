import pytest

from turbolm import Conversation, TurboLMError, encode_chat, encode_prompt, run_turns


def test_prompt_uses_chat_template(tiny):
    _, tok = tiny
    ids = encode_prompt(tok, "Hello world!")
    expected = tok.apply_chat_template([{"role": "user", "content": "Hello world!"}], add_generation_prompt=True, tokenize=False)
    assert expected.endswith("<|im_start|>assistant\n")
    assert tok.decode(ids) == expected
    with_system = encode_prompt(tok, "Hello world!", system="Be brief.")
    assert tok.decode(with_system).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert tok.decode(encode_prompt(tok, "Hello world!", chat=False)) == "Hello world!"


def test_empty_prompt_and_bad_messages(tiny):
    _, tok = tiny
    for bad in ("", "   \n"):
        with pytest.raises(TurboLMError, match="empty prompt"):
            encode_prompt(tok, bad)
    with pytest.raises(TurboLMError, match="malformed"):
        encode_chat(tok, [{"content": "no role"}])


def test_multi_turn_second_prompt_contains_first_answer(tiny):
    _, tok = tiny
    prompts = []

    def respond(ids):
        prompts.append(tok.decode(ids))
        return f"answer {len(prompts)}"

    answers = run_turns(tok, ["first question", "second question"], respond)
    assert answers == ["answer 1", "answer 2"]
    assert "answer 1" not in prompts[0]
    assert prompts[1] == (
        "<|im_start|>user\nfirst question<|im_end|>\n<|im_start|>assistant\nanswer 1<|im_end|>\n"
        "<|im_start|>user\nsecond question<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tokenizer_without_template(tiny):
    _, tok = tiny
    template = tok.chat_template
    try:
        tok.chat_template = None
        conv = Conversation()
        assert tok.decode(conv.ask(tok, "plain text")) == "plain text"
    finally:
        tok.chat_template = template
