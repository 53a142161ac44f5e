"""parse_url: a TcpAddress or a UnixAddress, and back to the URL; tcp_address: HOST:PORT only."""

import pytest

from mip.net import TcpAddress, UnixAddress, parse_url
from mip.net.urls import tcp_address


@pytest.mark.parametrize("url, address, text", [
    ("tcp://127.0.0.1:7000", TcpAddress("127.0.0.1", 7000), "tcp://127.0.0.1:7000"),
    ("localhost:0", TcpAddress("localhost", 0), "tcp://localhost:0"),
    ("tcp://[::1]:8", TcpAddress("::1", 8), "tcp://[::1]:8"),
    ("unix:///tmp/mip.sock", UnixAddress("/tmp/mip.sock"), "unix:///tmp/mip.sock"),
    ("unix://relative/mip.sock", UnixAddress("relative/mip.sock"), "unix://relative/mip.sock"),
])
def test_parse_url(url, address, text):
    parsed = parse_url(url)
    assert parsed == address and type(parsed) is type(address)
    assert parsed.scheme == text.partition("://")[0]
    assert str(parsed) == text


def test_default_port():
    assert parse_url("tcp://example.org", default_port=9) == TcpAddress("example.org", 9)


@pytest.mark.parametrize("url", ["tcp://example.org", "unix://", "http://h:1", "tcp://h:99999",
                                 "tcp://h:1/path"])
def test_bad_url(url):
    with pytest.raises(ValueError):
        parse_url(url)


@pytest.mark.parametrize("text, address", [
    ("0.0.0.0:8000", TcpAddress("0.0.0.0", 8000)),
    ("[::]:8001", TcpAddress("::", 8001)),
    ("tcp://localhost:0", TcpAddress("localhost", 0)),
])
def test_tcp_address(text, address):
    assert tcp_address(text) == address


@pytest.mark.parametrize("text", ["8000", "localhost", ":8000", "unix:///tmp/s", "h:99999", "h:x"])
def test_tcp_address_names_what_must_be_host_port(text):
    with pytest.raises(ValueError, match=f"--http must be HOST:PORT, not {text!r}"):
        tcp_address(text, "--http")


@pytest.mark.parametrize("url, hostport", [
    ("127.0.0.1:50051", "127.0.0.1:50051"), ("[::1]:0", "[::1]:0"),
    ("tcp://localhost:8001", "localhost:8001")])
def test_tcp_address_hostport(url, hostport):
    assert tcp_address(url, "gRPC address").hostport == hostport


@pytest.mark.parametrize("url", ["localhost", "localhost:", "h:port", "unix:///tmp/s", ":80"])
def test_tcp_address_refuses_what_is_not_host_and_port(url):
    with pytest.raises(ValueError, match=r"^gRPC address must be HOST:PORT, not "):
        tcp_address(url, "gRPC address")
