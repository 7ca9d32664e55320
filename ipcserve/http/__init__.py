"""The HTTP layer (Flask): one serving core and the surfaces on it.

:mod:`~ipcserve.http.serving` owns the request lifecycle (drain check, arrival-time
deadline, admission, call or stream with cancel-on-disconnect, one answer, metrics,
readiness); the surfaces (:mod:`~ipcserve.http.native`, :mod:`~ipcserve.http.openai`,
:mod:`~ipcserve.http.v2`, :mod:`~ipcserve.http.openapi`, :mod:`~ipcserve.http.status`)
only parse their protocol and format its answer. :mod:`~ipcserve.http.extension` registers
them on a Flask app. Users import the extension as ``from ipcserve.flask import IPCServe``.
"""
