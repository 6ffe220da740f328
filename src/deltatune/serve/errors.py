"""The errors a client gets back: ``{"error": message, "hint": hint}`` with the status below."""

from __future__ import annotations

from ..core.errors import DeltatuneError


class ServeError(DeltatuneError):
    """A request the server refuses; ``status`` is the HTTP status it answers with."""

    status = 400


class UnknownAdapter(ServeError):
    status = 404


class AdapterConflict(ServeError):
    """A name already taken by a loaded adapter."""

    status = 409


class UnusableAdapter(ServeError):
    """A run this server cannot serve: another base model, or a method it cannot share a base with."""

    status = 422


class TooLarge(ServeError):
    """Too many inputs in one request, or one input too long."""

    status = 413


class ModelFailure(ServeError):
    """The model failed on a request (its batch was retried one request at a time)."""

    status = 500


class ShuttingDown(ServeError):
    status = 503
