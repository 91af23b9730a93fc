"""The OpenAI-compatible HTTP server over the serving engine (`cla_jax.serving`); the
`cla-serve` command (cla_jax/scripts/serve.py) builds the engine from its flags and calls
`server.serve`.

Server-only: these modules import starlette, uvicorn, jinja2 and prometheus_client (the
`serve` extra), which neither `import cla_jax` nor `import cla_jax.serving` loads.

    app.py          the ASGI app: routes, and how an HTTP request becomes engine requests
    running.py      one HTTP request's engine requests: events, cancels, deadline, disconnect
    fields.py       request fields shared by both endpoints (sampling, stop, text checks)
    completions.py  /v1/completions: body -> requests, responses and stream chunks
    chat.py         /v1/chat/completions: the model's chat template, sandboxed
    limits.py       body size and read time, prompts per request, queued tokens (429)
    auth.py         API keys (Authorization: Bearer) and refusing an open, keyless bind
    errors.py       every error in OpenAI's JSON shape, 404/405/500 included
    metrics.py      /metrics in Prometheus' text format
    listener.py     the socket and uvicorn, with a time limit on request headers
    server.py       warm-up, then the app served over a started batcher until Ctrl+C
"""
