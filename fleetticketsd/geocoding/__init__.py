"""Locating tickets: the gazetteer, the providers and their pacing."""
