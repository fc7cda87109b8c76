-- The drain worker's lease per group, with a fencing token.
--
-- One active drainer per group. A worker takes the lease when it is free or
-- has lapsed (the token goes up by one), renews it, and checks it — locking
-- this row — inside every transaction that stores a batch or follows the
-- trail. A worker that lost its lease (paused, cut off from the database)
-- therefore cannot commit anything once another has taken over: the
-- takeover's UPDATE waits for the old holder's transaction, and the old
-- holder's next check fails. (An advisory lock would bind the lease to one
-- connection while the batches are written through others, fencing nothing.)
-- Times are clock_timestamp(), not now(): now() is frozen at transaction start.
CREATE TABLE drain_leases (
    group_id    bigint PRIMARY KEY REFERENCES routing_groups (id),
    instance_id uuid NOT NULL,
    token       bigint NOT NULL CHECK (token >= 1),
    acquired_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until timestamptz NOT NULL
);
