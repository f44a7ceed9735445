"""What a serving process runs: a fork child's or a worker's life, from hygiene to ``_exit``.

Connection, preamble (PROXY, TLS), handler adaptation and the prefork worker's accept loop.
"""
