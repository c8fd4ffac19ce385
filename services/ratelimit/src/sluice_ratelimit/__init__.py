"""Rate limiting: Envoy's Rate Limit Service v3 API, GCRA limits decided atomically in Redis."""

SERVICE_NAME = "envoy.service.ratelimit.v3.RateLimitService"
