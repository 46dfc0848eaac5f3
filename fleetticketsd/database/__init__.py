"""The database: connections, bounded waits, the layout check and the takeover."""
