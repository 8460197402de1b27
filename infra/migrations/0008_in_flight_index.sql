-- The reaper's index of what is in flight, by a predicate no status check implies. Keyed on (status,
-- created_at) WHERE status IN ('queued', 'streaming'), it served any statement that checks a status: the
-- claim's `WHERE id = $1 AND user_id = $2 AND status = 'queued'` among them. Whenever the statistics were
-- taken while few generations were in flight, PostgreSQL read that index through instead of the primary
-- key, and each claim read every queued generation (500 of them in a burst of 500 streams). An index on
-- `finished_at IS NULL` (the same rows: a CHECK ties finished_at to the end states) serves only statements
-- that say so, the reaper's; a claim finds its row by the primary key or its user's in-flight index.
-- Building it reads the whole table under a lock that holds back writes (migrations run in a transaction,
-- so not CONCURRENTLY): on a large deployment, migrate in a quiet minute.
DROP INDEX generations_in_flight_idx;
CREATE INDEX generations_in_flight_idx ON generations (created_at) WHERE finished_at IS NULL;
