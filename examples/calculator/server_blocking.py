"""The seed's blocking server, unchanged but for the import."""

from txrpc.sync import Server

server = Server()
server.add = lambda a, b: a + b
server.start()
