"""`govdb serve`: the governance server, an MCP server over the govdb store.

``tools`` holds the tools as plain functions over the Database interface;
``app`` puts them on the official MCP SDK and runs stdio or streamable HTTP.
"""

from __future__ import annotations

from .app import build_server, serve

__all__ = ["build_server", "serve"]
