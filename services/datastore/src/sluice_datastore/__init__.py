"""Cached data access: tenants and API keys, conversations and messages, usage records."""

SERVICE_NAME = "sluice.datastore.v1.DataStore"
