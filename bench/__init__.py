"""The relay's benchmark harness (`make bench`, `python -m bench`).

Every measured program runs as its own process on loopback: the fake task API, the relay, the
callback receiver and the load clients. The harness only starts them, reads `/metrics`, `/proc`
and the fakes' control APIs, and writes the figures as a table and as JSON.
"""
