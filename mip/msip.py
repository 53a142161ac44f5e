"""MSIP, the Micro-Service Interface Protocol: codec re-exported from ``mip.protocol.msip``."""

from mip.protocol.msip import *  # noqa: F401,F403
from mip.protocol.msip import __all__  # noqa: F401
