-- The worker is idempotent: a batch delivered twice (an ack lost after the commit) must not store its
-- dead letters twice. Each dead letter carries the SHA-256 of its queue, message id and raw body, and a
-- second copy is skipped (ON CONFLICT DO NOTHING). Nullable: rows written without it stay valid.
ALTER TABLE dead_letters ADD COLUMN fingerprint bytea CHECK (length(fingerprint) = 32);
CREATE UNIQUE INDEX dead_letters_fingerprint_key ON dead_letters (fingerprint);
