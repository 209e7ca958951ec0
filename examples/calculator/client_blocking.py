"""The seed's blocking client, unchanged but for the import."""

from txrpc.sync import Client

client = Client("localhost", 12345)
print(client.add(1, 2))
