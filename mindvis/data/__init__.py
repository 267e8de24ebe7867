"""File contracts (stimulus set, responses) and data sources."""
