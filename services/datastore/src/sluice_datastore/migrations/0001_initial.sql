-- Tenants, API keys, conversations and messages, usage records, with the
-- indexes the request path's queries need and constraints that refuse bad rows.

CREATE TABLE tenants (
    id                  uuid PRIMARY KEY,
    name                text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    tier                smallint NOT NULL DEFAULT 1 CHECK (tier BETWEEN 1 AND 3),
    scheduling_weight   integer NOT NULL DEFAULT 1 CHECK (scheduling_weight >= 1),
    requests_per_minute integer NOT NULL DEFAULT 0 CHECK (requests_per_minute >= 0),
    tokens_per_minute   bigint NOT NULL DEFAULT 0 CHECK (tokens_per_minute >= 0),
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- Only a SHA-256 of each key is kept; the key itself is shown once when issued.
CREATE TABLE api_keys (
    id         uuid PRIMARY KEY,
    key_hash   bytea NOT NULL CHECK (octet_length(key_hash) = 32),
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
-- The hot lookup: by hash, on every request.
CREATE UNIQUE INDEX api_keys_key_hash ON api_keys (key_hash);
CREATE INDEX api_keys_tenant ON api_keys (tenant_id);

CREATE TABLE conversations (
    id         uuid PRIMARY KEY,
    tenant_id  uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_tenant_created ON conversations (tenant_id, created_at);

CREATE TABLE messages (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             integer NOT NULL CHECK (seq >= 1),
    role            smallint NOT NULL CHECK (role BETWEEN 1 AND 3),
    content         text NOT NULL,
    token_count     integer NOT NULL CHECK (token_count >= 0),
    request_id      text NOT NULL CHECK (length(request_id) BETWEEN 1 AND 128),
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- The newest N of a conversation: a backward scan of this index.
    PRIMARY KEY (conversation_id, seq)
);
-- An append retried with the same request id finds what it wrote.
CREATE INDEX messages_request ON messages (conversation_id, request_id);

CREATE TABLE usage (
    id                     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id             text NOT NULL CHECK (length(request_id) BETWEEN 1 AND 128),
    tenant_id              uuid NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    model                  text NOT NULL,
    prompt_tokens          integer NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens      integer NOT NULL CHECK (completion_tokens >= 0),
    cached_tokens          integer NOT NULL CHECK (cached_tokens >= 0 AND cached_tokens <= prompt_tokens),
    queue_ms               double precision NOT NULL CHECK (queue_ms >= 0),
    time_to_first_token_ms double precision NOT NULL CHECK (time_to_first_token_ms >= 0),
    total_ms               double precision NOT NULL CHECK (total_ms >= 0),
    status                 text NOT NULL CHECK (length(status) BETWEEN 1 AND 32),
    finished_at            timestamptz NOT NULL,
    created_at             timestamptz NOT NULL DEFAULT now()
);
-- Idempotent recording: a request is counted once.
CREATE UNIQUE INDEX usage_request ON usage (request_id);
-- A tenant's usage over a period.
CREATE INDEX usage_tenant_finished ON usage (tenant_id, finished_at);
