"""``from ipcserve.flask import IPCServe``: the Flask extension (implemented in flask_ext)."""

from __future__ import annotations

from .http.extension import IPCServe, error_response

__all__ = ["IPCServe", "error_response"]
