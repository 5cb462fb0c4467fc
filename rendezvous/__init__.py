"""TucDesk rendezvous: the rendezvous control plane (init, serve, team, invite, keys)."""
