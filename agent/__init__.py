"""TucDesk agent: the agent daemon (enroll, run, status)."""
