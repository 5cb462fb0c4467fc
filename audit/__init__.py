"""TucDesk audit: the offline audit verifier (verify)."""
