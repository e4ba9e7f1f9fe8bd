import json

import pytest

from shared.data import IGNORE_INDEX, DataError, Example, collate, encode, load_jsonl, parse_record
from tests.conftest import DATA


def _labelled_text(enc, tokenizer):
    return tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])


def test_chat_loss_covers_the_response_and_end_of_turn_only(tokenizer):
    ex = parse_record(
        {
            "messages": [
                {"role": "user", "content": 'Define "hand cheese".'},
                {"role": "assistant", "content": "Any cheese originally molded by hand."},
            ]
        }
    )
    enc = encode(ex, tokenizer, 256)
    assert _labelled_text(enc, tokenizer) == "Any cheese originally molded by hand.<|im_end|>"
    # the prompt (default system prompt + question) is fully masked
    first = next(i for i, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert "Define" in tokenizer.decode(enc.input_ids[:first])
    assert "You are a helpful AI assistant" in tokenizer.decode(enc.input_ids[:first])


def test_instruction_format_matches_the_equivalent_chat(tokenizer):
    a = encode(parse_record({"instruction": "Name a fruit.", "input": "Red.", "response": "Apple."}), tokenizer, 256)
    b = encode(
        parse_record(
            {
                "messages": [
                    {"role": "user", "content": "Name a fruit.\n\nRed."},
                    {"role": "assistant", "content": "Apple."},
                ]
            }
        ),
        tokenizer,
        256,
    )
    assert a == b
    assert _labelled_text(a, tokenizer) == "Apple.<|im_end|>"


def test_every_assistant_turn_of_a_multi_turn_chat_is_trained(tokenizer):
    ex = parse_record(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Goodbye."},
            ]
        }
    )
    text = _labelled_text(encode(ex, tokenizer, 256), tokenizer)
    assert text == "Hello.<|im_end|>Goodbye.<|im_end|>"


def test_plain_text_is_trained_on_every_token_and_ends_with_eos(tokenizer):
    enc = encode(parse_record({"text": "The quick brown fox."}), tokenizer, 256)
    assert enc.labels == enc.input_ids
    assert enc.input_ids[-1] == tokenizer.eos_token_id


def test_truncation_keeps_ids_and_labels_aligned(tokenizer):
    ex = Example(messages=(("user", "x " * 200), ("assistant", "y")))
    enc = encode(ex, tokenizer, 32)
    assert len(enc.input_ids) == len(enc.labels) == 32


def test_collate_pads_with_masked_labels(tokenizer):
    encs = [encode(parse_record({"text": t}), tokenizer, 64) for t in ("a b c d e f", "a")]
    batch = collate(encs, tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    short = len(encs[1].input_ids)
    assert batch["attention_mask"][1, short:].sum() == 0
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()


def test_committed_demo_partitions_are_valid_and_disjoint():
    topics = sorted(p.name for p in DATA.iterdir() if p.is_dir())
    assert len(topics) >= 4
    for topic in topics:
        train, heldout = load_jsonl(DATA / topic / "train.jsonl"), load_jsonl(DATA / topic / "heldout.jsonl")
        assert len(train) == 500 and len(heldout) == 200
        assert not {ex.messages for ex in train} & {ex.messages for ex in heldout}, topic
    assert (DATA / "LICENSE").read_text().count("WordNet 3.0 Copyright 2006 by Princeton University") == 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "ok"}', '{"text": "broken"'], r"bad\.jsonl:2: not valid JSON"),
        (['{"text": "ok"}', "", '["a list"]'], r"bad\.jsonl:3: expected a JSON object, got list"),
        (
            ['{"prompt": "a", "completion": "b"}'],
            r"bad\.jsonl:1: unknown record format with keys \['completion', 'prompt'\]",
        ),
        (
            ['{"messages": [{"role": "user", "content": "hi"}]}'],
            r"bad\.jsonl:1: 'messages' has no non-empty assistant turn",
        ),
        (
            ['{"messages": [{"role": "robot", "content": "hi"}]}'],
            r"bad\.jsonl:1: messages\[0\] has unknown role 'robot'",
        ),
        (['{"instruction": "a", "response": ""}'], r"bad\.jsonl:1: 'instruction' and a non-empty 'response'"),
        (["", "  "], r"bad\.jsonl: empty client partition"),
    ],
)
def test_malformed_files_name_the_file_line_and_problem(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_jsonl(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_records_round_trip_through_json(tmp_path):
    rows = [{"instruction": "Say hi.", "response": "Hi."}, {"text": "plain"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = load_jsonl(path)
    assert got[0].messages == (("user", "Say hi."), ("assistant", "Hi."))
    assert got[1].text == "plain" and got[1].messages == ()
