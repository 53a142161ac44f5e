"""Framework adaptors: ``Inference`` classes with ``forward`` and ``concat`` written."""
