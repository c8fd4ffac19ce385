"""Code every sluice service shares: settings, logging, tracing, errors, server lifecycle, channels."""
