"""The serving layer: model repository, dynamic batching, execution providers, engine.

Import the pieces from their modules (``mip.serving.engine.Engine``,
``mip.serving.repository.ModelRepository``, ``mip.serving.demo.build_demo_repository``);
this package itself imports nothing heavy.
"""
