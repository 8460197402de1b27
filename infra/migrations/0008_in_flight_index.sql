-- The in-flight index keyed on the creation time alone. Keyed on (status, created_at), it matched the
-- claim's `WHERE id = $1 AND user_id = $2 AND status = 'queued'` by its status, and PostgreSQL chose it over
-- the primary key whenever its statistics were taken while few generations were in flight: each claim then
-- read every queued generation (500 of them under a burst of 500 streams). Keyed on created_at, it can only
-- serve what it is for (the reaper's scans of what is in flight, oldest first), and an id is found by the
-- primary key. The index holds in-flight rows only, so building it reads the table but writes little.
DROP INDEX generations_in_flight_idx;
CREATE INDEX generations_in_flight_idx ON generations (created_at)
    WHERE status IN ('queued', 'streaming');
