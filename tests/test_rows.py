"""Dataset row formats: every instruction set in ../shared/data reads as chat messages."""

import pytest

from turbolm.core.rows import SkipRow, row_messages, row_prompt


def user_answer(user, answer):
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "Add.", "input": "1 2", "output": "3"}, user_answer("Add.\n\n1 2", "3")),  # Alpaca
    ({"instruction": "Why?", "context": "Because.", "response": "So.", "category": "qa"},
     user_answer("Why?\n\nBecause.", "So.")),  # Dolly
    ({"instruction": "Code it.", "input": "", "response": "pass"}, user_answer("Code it.", "pass")),  # GPTeacher
    ({"question": "1+1?", "answer": "2\n#### 2"}, user_answer("1+1?", "2\n#### 2")),  # GSM8K
    ({"text": "Write f.", "code": "def f(): pass", "test_list": ["assert f() is None"]},
     user_answer("Write f.\nYour code should pass these tests:\nassert f() is None", "def f(): pass")),  # MBPP
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     user_answer("Hi", "Hello")),
])
def test_row_formats(row, expected):
    assert row_messages(row) == expected
    assert row_prompt(row) == expected[:1]


@pytest.mark.parametrize("row, reason", [
    ({"question": 3, "answer": "x"}, "wrong_types"),
    ({"text": "t", "code": "c", "test_list": "assert"}, "wrong_types"),
    ({"instruction": "no answer"}, "missing_keys"),
    ({"conversations": [{"from": "gpt", "value": "answer first"}]}, "roles_out_of_order"),
    ({"conversations": []}, "empty_conversation"),
])
def test_malformed_rows_are_skipped_with_a_reason(row, reason):
    with pytest.raises(SkipRow, match=reason):
        row_prompt(row)


def test_a_prompt_needs_no_answer():
    system = {"from": "system", "value": "Be brief."}
    row = {"conversations": [system, {"from": "human", "value": "Hi"}]}
    assert row_prompt(row) == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    with pytest.raises(SkipRow, match="no_assistant_turn"):
        row_messages(row)
    # With an answer, the prompt is the first question only.
    long = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                              {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
    assert row_prompt(long) == [{"role": "user", "content": "a"}]
