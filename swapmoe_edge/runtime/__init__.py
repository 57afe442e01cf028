"""Configuration, loading an artifact into parts, and the Runtime facade."""
