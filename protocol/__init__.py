"""TucDesk protocol core: identities, signed payloads, tokens, handshake and frames.

Sans-I/O: nothing in this package opens a socket, starts a task or reads the clock.
Callers pass the current time in.
"""
