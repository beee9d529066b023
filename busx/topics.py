"""Topic and subscription-pattern rules (SPEC.md, Topics).

A topic is 1-255 bytes of UTF-8: tokens separated by ".", none empty, no
whitespace or control characters. Patterns may use "*" (one token) and ">"
(one or more trailing tokens) as whole tokens. Topics whose first token starts
with "_" are reserved; clients may publish only to "_INBOX." topics there.
"""

from __future__ import annotations

import unicodedata
from functools import lru_cache

from .errors import InvalidTopic

MAX_TOPIC_BYTES = 255
INBOX_PREFIX = "_INBOX."


def _check_text(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise InvalidTopic(f"{what} must be str, not {type(text).__name__}")
    encoded = text.encode("utf-8", "surrogatepass")
    if not 0 < len(encoded) <= MAX_TOPIC_BYTES:
        raise InvalidTopic(f"{what} {text!r} must be 1-{MAX_TOPIC_BYTES} bytes of UTF-8, "
                           f"not {len(encoded)}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidTopic(f"{what} {text!r} is not valid UTF-8") from None
    for char in text:
        if char <= " " or char == "\x7f" or (
                char > "\x7f" and unicodedata.category(char)[0] in "ZC"):
            raise InvalidTopic(f"{what} {text!r} contains whitespace or a control "
                               f"character ({char!r})")
    if "" in text.split("."):
        raise InvalidTopic(f"{what} {text!r} has an empty token: tokens are separated "
                           f"by single dots, with none at either end")
    return encoded


def topic_bytes(topic: str) -> bytes:
    """Validate a topic to publish to and return it encoded."""
    return _topic_bytes(_plain_str(topic, "topic"))


def pattern_bytes(pattern: str) -> bytes:
    """Validate a subscription pattern and return it encoded."""
    return _pattern_bytes(_plain_str(pattern, "pattern"))


def _plain_str(text: object, what: str) -> str:
    """text as an exact str: a str subclass (a StrEnum) becomes its value;
    anything else raises InvalidTopic."""
    if type(text) is str:
        return text
    if not isinstance(text, str):
        _check_text(text, what)         # raises
    return str.__str__(text)


# Cached: a service publishes to few topics, many times each. Only exact str
# reaches the cache (a str subclass could hash and compare unlike a str).
@lru_cache(maxsize=4096)
def _topic_bytes(topic: str) -> bytes:
    encoded = _check_text(topic, "topic")
    if "*" in topic or ">" in topic:
        raise InvalidTopic(f"topic {topic!r} contains a wildcard: '*' and '>' are for "
                           f"subscription patterns only")
    if topic.startswith("_") and not topic.startswith(INBOX_PREFIX):
        raise InvalidTopic(f"topic {topic!r} is reserved for busx: topics whose first token "
                           f"starts with '_' may not be published (except _INBOX. replies)")
    return encoded


@lru_cache(maxsize=4096)
def _pattern_bytes(pattern: str) -> bytes:
    encoded = _check_text(pattern, "pattern")
    tokens = pattern.split(".")
    for index, token in enumerate(tokens):
        if token in ("*", ">"):
            if token == ">" and index != len(tokens) - 1:
                raise InvalidTopic(f"pattern {pattern!r}: '>' may only be the last token")
        elif "*" in token or ">" in token:
            raise InvalidTopic(f"pattern {pattern!r}: wildcards must be whole tokens "
                               f"('{token}' mixes a wildcard with text)")
    return encoded


def is_valid_topic(topic: str) -> bool:
    try:
        topic_bytes(topic)
    except InvalidTopic:
        return False
    return True


def matches(pattern: str, topic: str) -> bool:
    """Whether `topic` is delivered to a subscription on `pattern` (reference
    semantics for the broker's router)."""
    pattern_tokens = pattern.split(".")
    topic_tokens = topic.split(".")
    if topic.startswith("_") and pattern_tokens[0] in ("*", ">"):
        return False
    for index, token in enumerate(pattern_tokens):
        if token == ">":
            return len(topic_tokens) > index
        if index >= len(topic_tokens):
            return False
        if token != "*" and token != topic_tokens[index]:
            return False
    return len(topic_tokens) == len(pattern_tokens)
