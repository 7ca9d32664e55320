"""The engine: the ML process and the caller's side of the channel to it.

No Flask and no HTTP server is imported here; :class:`~ipcserve.engine.mlprocess.MLProcess`
works in any Python program. The HTTP layer (:mod:`ipcserve.http`) builds on this package,
never the other way round.
"""
