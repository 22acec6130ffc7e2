"""Serving from several processes: how front-end processes and the engine process talk over Unix sockets.

- messages.py: the messages (carrying the engine's own records) and their framing;
- engine_server.py: the engine process's server, which hands front-ends' requests to its engines.

The front-end's end is an engine client (service/engine_client/socket_client.py); nothing else uses this
package, and the programs that run these processes are in service/processes/.
"""
