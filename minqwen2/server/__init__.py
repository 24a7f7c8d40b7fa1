"""``minqwen2 serve``: an OpenAI-compatible HTTP server for one model, with a browser chat page.

Three modules, read in this order:

* ``protocol.py`` — the OpenAI API's shapes: a request body checked field by field into a
  ``Job`` (or an error with OpenAI's JSON and status), and the response and chunk bodies.
* ``engine.py`` — one model, many clients: a bounded queue, one generation at a time on a
  dedicated model thread, the KV cache reused across requests for their longest shared
  token prefix, and a disconnected client's generation stopped after the current step.
* ``app.py`` — the web side, a Starlette ASGI application: routes, the API key, the body
  limit, CORS, server-sent events, and the chat page ``minqwen2/static/chat.html``.

The command line (flags, uvicorn, warnings) is ``minqwen2/tools/serve.py``. The server
stack (Starlette, uvicorn) is the optional ``serve`` extra: ``pip install 'minqwen2[serve]'``.
"""

from minqwen2.server.app import build_app

__all__ = ["build_app"]
