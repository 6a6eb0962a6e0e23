"""camserve's HTTP service on :mod:`camcore`, in rooms by job (each room's ``__init__`` says what it holds).

Imports nothing: ``python -m service`` and every worker process import this package first, and they
must reach their health checks before torch and the app are loaded.
"""
