"""asyncio servers and clients: the MSIP broker and its clients, URL parsing."""

from mip.net.msip_broker import Broker, BrokerStats
from mip.errors import BrokerError
from mip.net.msip_client import AsyncClient, Client, Event, Subscription
from mip.net.urls import Address, TcpAddress, UnixAddress, parse_url

__all__ = [
    "Address",
    "AsyncClient",
    "Broker",
    "BrokerError",
    "BrokerStats",
    "Client",
    "Event",
    "Subscription",
    "TcpAddress",
    "UnixAddress",
    "parse_url",
]
