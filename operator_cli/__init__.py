"""TucDesk operator command line (`tucdesk`)."""
