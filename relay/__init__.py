"""TucDesk relay: the ciphertext-only relay (serve)."""
