"""Prompts for multimodal-LLM relation oracles, and parsers for their replies.

Two templates, both on the GEM paper's 0-5 scale (Xie et al., NeurIPS 2024, Sec. 3.2, Fig. 3):

* :func:`attribute_prompt` follows the structure of the paper's Figure 3 (a role sentence, the
  0-5 scale with its two ends defined, the image, the targeted attribute and the expected score,
  then the instruction to score that attribute on its own and reply with the number only). One
  question per attribute; the reply is a single digit, read by :func:`parse_score`.
* :func:`image_prompt` asks for every attribute of one image at once and wants a JSON object
  ``{"attribute": score, ...}``, read by :func:`parse_json_scores`; it needs n times fewer calls.

:data:`PROMPT_VERSION` names the wording; oracles put it in their ``cache_key`` so that cached
scores are never reused across a change of prompt. Change it whenever a template changes.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional, Sequence

#: Version of the prompt wording (goes into the oracles' cache keys).
PROMPT_VERSION = "gem-prompt-v1"

#: Lowest and highest score of the scale.
MIN_SCORE, MAX_SCORE = 0, 5

_ROLE = (
    "You are an AI assistant that rates specific attributes of an image, following the instructions "
    "below. Rate each attribute on a scale from 0 to 5, where 0 means the attribute is absent and 5 "
    "means the attribute is expressed as strongly as possible."
)


def attribute_prompt(attribute: str) -> str:
    """The paper's per-attribute question (Fig. 3, reworded): one attribute, reply one digit.

    The image itself is not part of the text: the oracle sends it next to this text (an image
    part of a chat message, or the ``<image>`` slot of a chat template).
    """
    return (
        f"{_ROLE}\n"
        f"Image: the attached image\n"
        f"Attribute: {attribute}\n"
        f"Score: an integer from 0 to 5\n\n"
        f"Give the score that best reflects how strongly the attribute \"{attribute}\" is expressed "
        f"in the image. Judge this attribute on its own, independently of any other attribute, and "
        f"answer with the numerical score only: a single digit from 0 to 5.\n"
        f"Response:"
    )


def image_prompt(attributes: Sequence[str]) -> str:
    """All attributes of one image in one question; the reply is a JSON object of scores."""
    names = ", ".join(json.dumps(a) for a in attributes)
    example = "{" + ", ".join(f"{json.dumps(a)}: <score>" for a in attributes) + "}"
    return (
        f"{_ROLE}\n"
        f"Image: the attached image\n"
        f"Attributes: {names}\n"
        f"Scores: one integer from 0 to 5 per attribute\n\n"
        f"For each attribute, give the score that best reflects how strongly it is expressed in the "
        f"image. Judge every attribute on its own, independently of the others. Answer with a JSON "
        f"object only, mapping each attribute name exactly as written above to its score (an integer "
        f"from 0 to 5), like this: {example}\n"
        f"Response:"
    )


# ----------------------------------------------------------------------------------------------
# Reply parsers

#: Mentions of the scale itself ("0-5", "0 to 5", "/5", "out of 5"), removed before reading numbers.
_SCALE = re.compile(
    r"\(?\b0\s*(?:-|–|—|to)\s*5\b\)?|(?<=\d)\s*/\s*5\b|\bout\s+of\s+5\b|\bon\s+a\s+scale\s+of\s+5\b",
    re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)?(?![\w])")


def _as_score(value: Any) -> Optional[int]:
    """An integer score 0..5 from a JSON value (int, integral float, or a numeric string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number: float = value
    elif isinstance(value, float):
        number = value
    elif isinstance(value, str):
        return parse_score(value)
    else:
        return None
    if number != number or not float(number).is_integer():
        return None
    number = int(number)
    return number if MIN_SCORE <= number <= MAX_SCORE else None


def parse_score(text: Optional[str]) -> Optional[int]:
    """The single 0-5 score in a reply, or None.

    Accepts ``"3"``, ``"Score: 3"``, ``"**3**"``, ``"3/5"``, ``"3 out of 5"``, ``"3."``,
    ``"3.0"``. Returns None for no number, a number outside 0..5 (``"7"``), a fraction
    (``"3.5"``), or several different numbers (``"3 or 4"``); the same number repeated
    (``"Score: 3. Final answer: 3"``) is fine.
    """
    if not text:
        return None
    cleaned = _SCALE.sub(" ", str(text).replace("*", " ").replace("`", " "))
    values = set()
    for match in _NUMBER.finditer(cleaned):
        raw = match.group().replace(",", ".")
        try:
            number = float(raw)
        except ValueError:  # pragma: no cover - the pattern only matches numbers
            return None
        if not number.is_integer():
            return None
        values.add(int(number))
    if len(values) != 1:
        return None
    (value,) = values
    return value if MIN_SCORE <= value <= MAX_SCORE else None


def _normalise(name: str) -> str:
    return re.sub(r"[\W_]+", "", name.casefold())


def _json_objects(text: str) -> list[dict]:
    """Every JSON object that decodes at some ``{`` of the text, in order (fences are ignored)."""
    decoder = json.JSONDecoder()
    found = []
    position = text.find("{")
    while position != -1:
        try:
            value, end = decoder.raw_decode(text, position)
        except ValueError:
            position = text.find("{", position + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        position = text.find("{", end)
    return found


def _lookup(obj: dict, attributes: Sequence[str]) -> dict[str, Any]:
    """Values of ``obj`` per attribute, keys matched case-insensitively (then ignoring spaces/_/-)."""
    exact = {str(k).casefold(): v for k, v in obj.items()}
    loose = {_normalise(str(k)): v for k, v in obj.items()}
    out = {}
    for attribute in attributes:
        if attribute.casefold() in exact:
            out[attribute] = exact[attribute.casefold()]
        elif _normalise(attribute) in loose:
            out[attribute] = loose[_normalise(attribute)]
    return out


def parse_json_scores(text: Optional[str], attributes: Sequence[str]) -> dict[str, Optional[int]]:
    """Scores per attribute from a reply holding a JSON object; None where missing or invalid.

    The object may be bare, inside a ```json fence, surrounded by prose, or nested one level
    (``{"scores": {...}}``). Attribute names match case-insensitively. A value that is not an
    integer 0..5 (``7``, ``3.5``, ``"high"``, ``true``) gives None for that attribute. When no
    JSON object decodes, ``"name": 3`` / ``name = 3`` pairs in the text are used instead.
    """
    result: dict[str, Optional[int]] = {a: None for a in attributes}
    if not text:
        return result
    best: dict[str, Any] = {}
    for obj in _json_objects(str(text)):
        candidates = [obj] + [v for v in obj.values() if isinstance(v, dict)]
        for candidate in candidates:
            found = _lookup(candidate, attributes)
            if len(found) > len(best):
                best = found
        if len(best) == len(attributes):
            break
    if not best:
        for attribute in attributes:
            match = re.search(r"[\"']?" + re.escape(attribute) + r"[\"']?\s*[:=]\s*[\"']?([^\s,;}\"']+)",
                              str(text), re.IGNORECASE)
            if match:
                best[attribute] = match.group(1)
    for attribute, value in best.items():
        result[attribute] = _as_score(value)
    return result
