"""The HTTP face: FastAPI routes that only translate to and from the service core.

- ``api``: the app, its error handlers and the analyze and review routes; it includes the
  routers of ``search``, ``rollouts``, ``drift``, ``models`` and ``session``;
- ``deps``: the service and authenticator this process serves (what every route reaches);
- ``auth``: route roles, the API-key / session-cookie middleware, cookies and CSRF;
- ``inputs``: request bodies read within limits; ``docs``: /docs offline; ``review_page``: the
  reviewers' page from ``static/``.
"""
