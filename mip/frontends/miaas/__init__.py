"""MIaaS: the ``/v1`` REST control plane for asynchronous inference jobs.

``build_miaas_app(engine, config)`` gives the Starlette app to mount at ``/v1``;
``mount_miaas(engine, args)`` builds it from ``mip serve`` options. Jobs go through a
:class:`~mip.jobs.queue.JobQueue` (SQLite by default, or Redis Streams) and are run by
:class:`~mip.jobs.worker.JobWorker` tasks (each job by a
:class:`~mip.frontends.miaas.runner.JobRunner`) in this process or by ``mip worker``
processes elsewhere.
"""

from mip.frontends.miaas.app import *  # noqa: F401,F403  (the names of app.__all__)
from mip.frontends.miaas.app import __all__ as __all__
