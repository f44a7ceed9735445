"""A socketserver handler from the standard library's documentation, run unchanged.

With the standard library (one process per connection, reaped lazily, no limits):

    with socketserver.ForkingTCPServer(("127.0.0.1", 9000), MyTCPHandler) as server:
        server.serve_forever()

With forkserve, the only change is the command (or ``forkserve.serve(MyTCPHandler, ...)``):

    forkserve serve examples.socketserver_echo:MyTCPHandler --bind 127.0.0.1:9000
"""

import socketserver


class MyTCPHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        # self.rfile is a file-like object created by the handler
        self.data = self.rfile.readline().strip()
        print(f"{self.client_address[0]} wrote: {self.data!r}")
        self.wfile.write(self.data.upper() + b"\n")


if __name__ == "__main__":
    with socketserver.ForkingTCPServer(("127.0.0.1", 9000), MyTCPHandler) as server:
        server.serve_forever()
