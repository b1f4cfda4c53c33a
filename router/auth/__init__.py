"""Keys and roles, transport-free: who is calling (``principal``), the key check and the bind
policy (``keys``), per-key rate limits and lockouts (``limits``), review-page sessions
(``sessions``). The service core depends on ``router.auth.principal.Principal`` only; the
HTTP side (middleware, cookies) is router/http/auth.py, Ray's view of a caller
router/serve_context.py."""
