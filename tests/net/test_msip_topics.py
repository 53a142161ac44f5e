"""Topic matching (one module, used by the broker and the client)."""

from __future__ import annotations

import pytest

from mip.net import msip_client, msip_core, msip_topics
from mip.net.msip_topics import pattern_tokens, topic_matches


@pytest.mark.parametrize("sub,topic,patterns,expected", [
    ("a.b", "a.b", True, True),
    ("a.*", "a.b", True, True),
    ("a.*", "a.b.c", True, False),
    ("a.*", "a", True, False),
    ("a.>", "a.b.c", True, True),
    ("a.>", "a", True, False),
    ("*.b", "x.b", True, True),
    ("a.>", "a.x", False, False),  # patterns off: literal, as on the reference
    ("a.>", "a.>", False, True),
    ("a.>", "a.>", True, True),
    ("temp>30", "temp>30", True, True),  # not whole tokens: literal even with patterns on
    ("price*2", "price12", True, False),
    ("a.>.b", "a.x.b", True, False),  # '>' not last: literal
    ("a.>.b", "a.>.b", True, True),
])
def test_topic_matches(sub, topic, patterns, expected):
    assert topic_matches(sub, topic, patterns) is expected


def test_pattern_tokens():
    assert pattern_tokens("a.*.>") == ("a", "*", ">")
    assert pattern_tokens("a.b") is None and pattern_tokens("x>1") is None


def test_one_implementation():
    assert msip_client.topic_matches is msip_topics.topic_matches
    assert msip_core.pattern_tokens is msip_topics.pattern_tokens  # the broker's routing
    assert msip_core.match_tokens is msip_topics.match_tokens
    client_source = open(msip_client.__file__).read()
    assert "msip_broker" not in client_source and "msip_core" not in client_source  # it stands alone
