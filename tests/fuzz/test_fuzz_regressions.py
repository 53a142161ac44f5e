"""Every seed of the fuzz corpora and every crash reproducer, through its harness.

The harnesses are those libFuzzer runs (harnesses.py); here they run on the
normal build, so an input that once crashed or broke an invariant fails the
normal test run. A reproducer lives in crashes/<harness>/ under the name
libFuzzer gave it.
"""

from __future__ import annotations

import os

import pytest

from . import harnesses

HERE = os.path.dirname(os.path.abspath(__file__))


def _inputs(kind: str) -> list:
    out = []
    for name in sorted(harnesses.HARNESSES):
        folder = os.path.join(HERE, kind, name)
        if os.path.isdir(folder):
            out += [pytest.param(name, os.path.join(folder, f), id=f"{name}/{f}")
                    for f in sorted(os.listdir(folder))]
    return out


@pytest.mark.parametrize("harness, path", _inputs("corpus"))
def test_corpus(harness, path):
    with open(path, "rb") as f:
        harnesses.HARNESSES[harness](f.read())


@pytest.mark.parametrize("harness, path", _inputs("crashes"))
def test_crash_reproducers(harness, path):
    with open(path, "rb") as f:
        harnesses.HARNESSES[harness](f.read())


def test_every_harness_has_a_corpus():
    for name in harnesses.HARNESSES:
        folder = os.path.join(HERE, "corpus", name)
        assert os.path.isdir(folder) and os.listdir(folder), name


def test_the_corpus_is_what_the_encoders_write():
    from .make_corpus import corpora

    import hashlib

    for name, seeds in corpora().items():
        folder = os.path.join(HERE, "corpus", name)
        assert {hashlib.sha1(s).hexdigest() for s in seeds} <= set(os.listdir(folder)), name
