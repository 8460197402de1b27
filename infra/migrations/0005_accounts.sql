-- Accounts can be deleted (SPEC §7.4): usage_events, daily_usage and audit_logs outlive the user and stay
-- keyed by the id only. Their foreign keys cascaded the user's deletion into the usage totals.
ALTER TABLE usage_events DROP CONSTRAINT IF EXISTS usage_events_user_id_fkey;
ALTER TABLE daily_usage DROP CONSTRAINT IF EXISTS daily_usage_user_id_fkey;
