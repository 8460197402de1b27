-- MiniChat schema: SPEC §6 plus what the contract needs (refresh tokens, outbox, dead letters,
-- idempotency keys). Ids are UUIDs; times are timestamptz (UTC).

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    email         text NOT NULL CHECK (length(email) BETWEEN 3 AND 254),
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- Emails are unique case-insensitively.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));

-- Refresh tokens live in families: each refresh rotates within the family; reuse of a
-- rotated token revokes the whole family. Only the SHA-256 of a token is stored.
CREATE TABLE refresh_tokens (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    family_id   uuid NOT NULL,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    token_hash  bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    parent_id   uuid REFERENCES refresh_tokens (id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    rotated_at  timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_idx ON refresh_tokens (user_id);

CREATE TABLE chats (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title       text CHECK (length(title) <= 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
-- GET /api/chats: newest updatedAt first, keyset-paginated on (updated_at, id).
CREATE INDEX chats_user_updated_idx ON chats (user_id, updated_at DESC, id DESC);

CREATE TABLE generations (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    chat_id         uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    user_id         uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status          text NOT NULL DEFAULT 'queued'
                    CHECK (status IN ('queued', 'streaming', 'succeeded', 'canceled', 'failed')),
    model           text NOT NULL CHECK (length(model) BETWEEN 1 AND 200),
    system_prompt   text CHECK (length(system_prompt) <= 8000),
    temperature     double precision CHECK (temperature BETWEEN 0 AND 2),
    max_tokens      integer CHECK (max_tokens BETWEEN 1 AND 32768),
    input_tokens    integer NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens   integer NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    usage_estimated boolean NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    heartbeat_at    timestamptz,
    error_code      text,
    error_message   text,
    request_id      text,
    CHECK ((status IN ('succeeded', 'canceled', 'failed')) = (finished_at IS NOT NULL)),
    CHECK (status = 'queued' OR status = 'canceled' OR status = 'failed' OR started_at IS NOT NULL)
);
-- One in-flight generation per user: the backstop behind the Redis lock.
CREATE UNIQUE INDEX generations_one_in_flight_idx ON generations (user_id)
    WHERE status IN ('queued', 'streaming');
CREATE INDEX generations_chat_idx ON generations (chat_id, created_at);
-- The reaper scans only what is in flight.
CREATE INDEX generations_in_flight_idx ON generations (status, created_at)
    WHERE status IN ('queued', 'streaming');

CREATE TABLE messages (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Ordering key: creation order even for two messages written in one transaction.
    seq           bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    chat_id       uuid NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    role          text NOT NULL CHECK (role IN ('user', 'assistant', 'system')),
    content       text NOT NULL CHECK (length(content) <= 200000),
    generation_id uuid REFERENCES generations (id) ON DELETE SET NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- GET /api/chats/{id}/messages: oldest first, keyset-paginated on seq.
CREATE INDEX messages_chat_seq_idx ON messages (chat_id, seq);
-- One assistant message per generation.
CREATE UNIQUE INDEX messages_generation_key ON messages (generation_id) WHERE generation_id IS NOT NULL;

-- Usage is kept apart from chats: deleting a chat never changes usage totals.
CREATE TABLE usage_events (
    id             uuid PRIMARY KEY,                 -- the event's eventId
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    generation_id  uuid NOT NULL UNIQUE,             -- no FK: the generation's chat may be deleted
    model          text NOT NULL,
    input_tokens   integer NOT NULL CHECK (input_tokens >= 0),
    output_tokens  integer NOT NULL CHECK (output_tokens >= 0),
    estimated      boolean NOT NULL DEFAULT false,
    occurred_at    timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_user_time_idx ON usage_events (user_id, occurred_at);

CREATE TABLE daily_usage (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id        uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day            date NOT NULL,
    input_tokens   bigint NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens  bigint NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    UNIQUE (user_id, day)
);

CREATE TABLE audit_logs (
    id             uuid PRIMARY KEY,                 -- the event's eventId
    user_id        uuid,                             -- no FK: the trail outlives what it describes
    action         text NOT NULL,
    metadata_json  jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL
);
CREATE INDEX audit_logs_user_time_idx ON audit_logs (user_id, created_at);

-- Transactional outbox: written in the transaction of the change it describes.
CREATE TABLE outbox (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id      uuid NOT NULL UNIQUE,
    queue         text NOT NULL CHECK (queue IN ('usage_event', 'audit_event')),
    payload       jsonb NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX outbox_pending_idx ON outbox (id) WHERE published_at IS NULL;

-- Messages the worker could not understand: kept with the reason, never silently dropped.
CREATE TABLE dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue        text NOT NULL,
    message_id   text,
    body         text NOT NULL,
    reason       text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE idempotency_keys (
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key           text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request_hash  bytea NOT NULL,
    status_code   integer,
    response_body jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created_idx ON idempotency_keys (created_at);
