"""MSIP topic matching, shared by the broker and the clients.

Topics are literal strings, as on the reference broker: ``alerts.>`` and ``temp>30`` are
ordinary topic names. A session that opted in to patterns (``Flags.PATTERNS`` on HELLO, or a
broker started with ``topic_patterns=True``) may subscribe to NATS-style patterns: dot-separated
tokens where a token ``*`` matches exactly one token and a final token ``>`` one or more. A
topic whose ``*`` or ``>`` is not a whole token (``temp>30``, ``price*2``), or with ``>`` before
the last token, stays a literal topic even then.
"""

from __future__ import annotations

__all__ = ["pattern_tokens", "match_tokens", "topic_matches"]


def pattern_tokens(topic: str) -> tuple[str, ...] | None:
    """The tokens of ``topic`` when it is a pattern, else None (a literal topic)."""
    if "*" not in topic and ">" not in topic:
        return None
    tokens = tuple(topic.split("."))
    if ">" in tokens[:-1] or not any(t == "*" or t == ">" for t in tokens):
        return None
    return tokens


def match_tokens(pattern: tuple[str, ...], topic: list[str]) -> bool:
    """Whether the tokens of a topic match the tokens of a pattern."""
    for i, p in enumerate(pattern):
        if p == ">":
            return len(topic) > i
        if i >= len(topic):
            return False
        if p != "*" and p != topic[i]:
            return False
    return len(pattern) == len(topic)


def topic_matches(subscription: str, topic: str, patterns: bool = True) -> bool:
    """Whether an event on ``topic`` belongs to ``subscription`` (``patterns``: wildcards on)."""
    tokens = pattern_tokens(subscription) if patterns else None
    if tokens is None:
        return subscription == topic
    return match_tokens(tokens, topic.split("."))
