"""mip.net.allocator: glibc's thresholds are set, unless the user set them."""

from __future__ import annotations

import platform

import pytest

from mip.net import allocator

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")


@glibc
def test_tune_sets_the_thresholds(monkeypatch):
    for name in ("GLIBC_TUNABLES", *allocator._USER_SETTINGS):
        monkeypatch.delenv(name, raising=False)
    assert allocator.tune() is True


@glibc
@pytest.mark.parametrize("name, value", [
    ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536"),
    ("MALLOC_TRIM_THRESHOLD_", "1048576"),
])
def test_the_users_settings_win(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert allocator.tune() is False
