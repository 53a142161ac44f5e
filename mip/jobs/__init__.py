"""The job service: asynchronous inference jobs stored, leased, run and published.

``queue.py`` holds the persistent queue (:class:`~mip.jobs.queue.JobQueue`: SQLite by
default, or Redis Streams) with at-least-once delivery; ``worker.py`` the tasks that take
jobs from it and store their outcomes (:class:`~mip.jobs.worker.JobWorker`, and
``run_worker`` for ``mip worker``); ``push.py`` the MSIP publisher of outcomes. A job's
body and what running it means belong to the frontend that accepts it (the ``/v1`` API:
``mip.frontends.miaas``); this package knows no HTTP and no frontend.

Import the pieces from their modules; this package itself imports nothing.
"""
