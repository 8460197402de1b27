-- Accounts can be deleted (SPEC §7.4): usage_events, daily_usage and audit_logs outlive the user and stay
-- keyed by the id only. Their foreign keys cascaded the user's deletion into the usage totals.
ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS usage_events_user_id_fkey;
ALTER TABLE daily_usage DROP CONSTRAINT IF EXISTS daily_usage_user_id_fkey;

-- An Idempotency-Key claim whose request never stored a result is taken over after a while; the claim
-- id tells the first request, should it finish late, that the key is no longer its own.
ALTER TABLE idempotency_keys ADD COLUMN claim_id uuid NOT NULL DEFAULT gen_random_uuid();

-- The purge job deletes refresh tokens whose family's life is over, oldest first.
CREATE INDEX refresh_tokens_expires_idx ON refresh_tokens (expires_at);
