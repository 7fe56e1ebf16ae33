"""Prompt templates and the reply parsers of the MLLM oracles."""

import json

import pytest

from gem_plugins.prompts import PROMPT_VERSION, attribute_prompt, image_prompt, parse_json_scores, parse_score

ATTRS = ["Bangs", "Bald", "Wall hue"]


def test_attribute_prompt_follows_the_paper_template():
    text = attribute_prompt("Bangs")
    assert "You are an AI assistant" in text
    assert "0 to 5" in text and "0 means the attribute is absent" in text and "5 means" in text
    assert "Attribute: Bangs" in text and '"Bangs"' in text
    assert "independently" in text and "single digit" in text
    assert text.rstrip().endswith("Response:")


def test_image_prompt_names_every_attribute_and_asks_for_json():
    text = image_prompt(ATTRS)
    for a in ATTRS:
        assert json.dumps(a) in text
    assert "JSON" in text and "0 to 5" in text and "independently" in text


def test_prompt_version_is_a_nonempty_string():
    assert isinstance(PROMPT_VERSION, str) and PROMPT_VERSION


@pytest.mark.parametrize("text, expected", [
    ("3", 3), ("0", 0), ("5", 5), (" 4\n", 4), ("Score: 3", 3), ("**3**", 3), ("`2`", 2), ("3.", 3),
    ("3.0", 3), ("3/5", 3), ("Score: 3 / 5", 3), ("I would rate it 4 out of 5.", 4),
    ("On the 0-5 scale: 1", 1), ("Score (0 to 5): 2", 2), ("3. Final answer: 3", 3),
])
def test_parse_score_accepts(text, expected):
    assert parse_score(text) == expected


@pytest.mark.parametrize("text", [
    "7", "-1", "3.5", "3 or 4", "between 2 and 3", "", None, "no idea", "high", "10", "2,5",
])
def test_parse_score_rejects(text):
    assert parse_score(text) is None


def test_parse_json_plain_and_fenced_and_in_prose():
    plain = '{"Bangs": 3, "Bald": 0, "Wall hue": 5}'
    assert parse_json_scores(plain, ATTRS) == {"Bangs": 3, "Bald": 0, "Wall hue": 5}
    fenced = "Sure! Here you go:\n```json\n{\n  \"bangs\": 1,\n  \"BALD\": 2,\n  \"wall hue\": 4\n}\n```\nHope it helps."
    assert parse_json_scores(fenced, ATTRS) == {"Bangs": 1, "Bald": 2, "Wall hue": 4}
    prose = 'The scores are {"Bangs": "2", "Bald": 3.0, "wall_hue": 1} for this face.'
    assert parse_json_scores(prose, ATTRS) == {"Bangs": 2, "Bald": 3, "Wall hue": 1}


def test_parse_json_invalid_values_are_none_per_attribute():
    text = '{"Bangs": 7, "Bald": 2.5, "Wall hue": true}'
    assert parse_json_scores(text, ATTRS) == {"Bangs": None, "Bald": None, "Wall hue": None}
    text = '{"Bangs": 4, "Bald": "high"}'
    assert parse_json_scores(text, ATTRS) == {"Bangs": 4, "Bald": None, "Wall hue": None}


def test_parse_json_nested_and_fallback_pairs():
    assert parse_json_scores('{"scores": {"Bangs": 1, "Bald": 2, "Wall hue": 3}}', ATTRS) == \
        {"Bangs": 1, "Bald": 2, "Wall hue": 3}
    # Not valid JSON (single quotes, trailing comma): the name: value pairs still count.
    assert parse_json_scores("{'Bangs': 1, 'Bald': 9, 'Wall hue': 3,}", ATTRS) == \
        {"Bangs": 1, "Bald": None, "Wall hue": 3}


def test_parse_json_garbage_gives_all_none():
    for text in ("", None, "I cannot rate people.", "{not json", "[1, 2, 3]"):
        assert parse_json_scores(text, ATTRS) == {a: None for a in ATTRS}
