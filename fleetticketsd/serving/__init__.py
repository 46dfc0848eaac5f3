"""What the daemon shows: HTTP endpoints, the status page, the terminal output."""
