"""Queue settings, from ``SLUICE_QUEUE_*`` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from sluice_core.settings import ServiceSettings
from sluice_queue.scheduler import SchedulerConfig


class QueueSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_QUEUE_")

    inference_target: str = Field(
        "127.0.0.1:8081", description="Where inference is reached: Envoy's internal listener, which balances replicas."
    )
    datastore_target: str = Field("127.0.0.1:8081", description="The data-access service (through Envoy).")
    ratelimit_target: str = Field("127.0.0.1:8081", description="The rate-limit service, for budgets (through Envoy).")
    budget_lease_s: float = Field(
        3.0,
        ge=0,
        description="Seconds' worth of a tenant's limits a replica reserves ahead, so that most requests need no "
        "rate-limit call; 0 reserves for each request alone.",
    )
    budget_idle_s: float = Field(
        1.0, gt=0, description="A tenant's allowance unused for this long goes back to the rate-limit service."
    )
    budget_timeout_ms: float = Field(
        250.0,
        gt=0,
        description="How long a budget reservation may wait for the rate-limit service before the request goes "
        "on without it (or is refused, with budget_fail_closed); its first token waits for the answer.",
    )
    budget_fail_closed: bool = Field(
        False,
        description="When the rate-limit service cannot answer, refuse budgeted requests UNAVAILABLE with a retry "
        "hint instead of letting them through unchecked (as Envoy's own limits do by default).",
    )
    auth_timeout_ms: float = Field(
        1000.0, gt=0, description="How long an API key's lookup may take before the key is served as last known."
    )
    auth_stale_s: float = Field(
        300.0,
        ge=0,
        description="While the data-access service cannot answer, keys known this recently are served as they "
        "were; others are refused UNAVAILABLE.",
    )
    auth_max_lookups: int = Field(
        64,
        gt=0,
        description="API key lookups at once; more wait for a turn within AUTH_TIMEOUT_MS (random keys cannot "
        "load PostgreSQL beyond this).",
    )
    usage_batch_size: int = Field(200, gt=0, description="Usage records per write.")
    usage_commit_timeout_ms: float = Field(
        1000.0,
        gt=0,
        description="How long a finished request's usage record may take to be written before its caller is told "
        "it finished; one not written by then is kept and written later.",
    )
    usage_draft_interval_s: float = Field(
        1.0,
        gt=0,
        description="How often running requests' usage drafts are brought up to date in Redis; should the replica "
        "die, another bills each of its requests for what it was sent by the last update.",
    )
    usage_flush_interval_s: float = Field(0.5, gt=0, description="How often buffered usage records are written.")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="The shared waiting line and slot leases.")
    redis_timeout_ms: float = Field(
        500.0,
        gt=0,
        description="A scheduler call Redis has not answered by then fails: the request is refused UNAVAILABLE "
        "with a retry hint (a healthy Redis answers in well under a millisecond).",
    )
    queue_prefix: str = Field("{sluice-queue}", description="Key prefix of the shared queue in Redis.")
    lease_s: float = Field(3.0, gt=0, description="A dead replica's slots and waiters are freed within this long.")
    max_waiting_per_class: int = Field(1024, ge=0, description="Waiting requests per priority class, all replicas.")
    max_waiting_per_tenant: int = Field(256, ge=0, description="Waiting requests per tenant, all replicas.")
    retry_after_s: float = Field(1.0, gt=0, description="The retry hint sent when a waiting line is full.")
    position_interval_s: float = Field(0.25, gt=0, description="How often waiters' positions are refreshed.")
    engine_interval_s: float = Field(1.0, gt=0, description="How often inference replicas are probed for slots.")
    engine_probes: int = Field(4, gt=0, description="Concurrent probes per round (Envoy spreads them).")
    engine_ttl_s: float = Field(10.0, gt=0, description="A replica unseen this long stops counting as capacity.")
    interactive_reserve: float = Field(
        0.25, ge=0, lt=1, description="Share of the slots (rounded down) batch requests leave to interactive ones."
    )

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(
            prefix=self.queue_prefix,
            lease_s=self.lease_s,
            max_waiting_per_class=self.max_waiting_per_class,
            max_waiting_per_tenant=self.max_waiting_per_tenant,
            retry_after_s=self.retry_after_s,
            position_interval_s=self.position_interval_s,
            engine_ttl_s=self.engine_ttl_s,
            interactive_reserve=self.interactive_reserve,
        )
