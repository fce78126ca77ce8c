"""Feature pages and labels: what each transcoder feature responds to and what it promotes."""
