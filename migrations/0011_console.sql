-- What the console (and `admin status`) shows that the database did not
-- know: the drain worker's progress per group, and each ingest instance's
-- open breakers.
--
-- drain_leases: the holder writes these with the lease row it already
-- updates in every stored batch's statement (no extra round trip).
--   stored_total    rows handed to INSERT for the group, by every holder so far
--                   (the console's records per minute are its rate)
--   last_batch_at   when the last batch was stored
--   last_batch_lag  seconds from ingest receiving that batch's newest record
--                   to its storing (the drain lag)
--   blocked_since   set while the worker cannot read the epoch it drains
--   blocked_on      why, in the worker's words (namespace and error)
ALTER TABLE drain_leases
    ADD COLUMN stored_total   bigint NOT NULL DEFAULT 0,
    ADD COLUMN last_batch_at  timestamptz,
    ADD COLUMN last_batch_lag double precision,
    ADD COLUMN blocked_since  timestamptz,
    ADD COLUMN blocked_on     text CHECK (length(blocked_on) <= 1024);

-- The namespaces whose breaker this ingest instance holds open, written with
-- its heartbeat.
ALTER TABLE instances ADD COLUMN open_breakers text[] NOT NULL DEFAULT '{}';
