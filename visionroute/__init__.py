"""VisionRoute: the shared record types, errors and the command line.

The service itself lives in the fixed top-level packages: ``cascades`` (model stages),
``policies`` (decisions, budgets, review queue), ``retrieval`` (search), ``router``
(Ray Serve wiring and API) and ``evals`` (measurement).
"""

__version__ = "0.1.0"
