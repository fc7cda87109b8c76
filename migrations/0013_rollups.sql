-- Windowed aggregates (`georelay rollup`): per device, per numeric field
-- (gateway readings: per sensor and type), per window size, per window
-- start by reading time: count, sum, min, max (average = sum / count).
--
-- The rollup worker advances `rollup_progress.store_order` (a watermark over
-- telemetry.store_order) in the same transaction as its upserts: each
-- stored row is counted exactly once, and a row stored late (after an
-- outage, or re-sent after a failover) updates its own window.
CREATE TABLE telemetry_rollups (
    device_id      text NOT NULL,
    sensor         text NOT NULL,            -- gateway readings' sensor id; '' otherwise
    field          text NOT NULL,            -- the numeric field, or a gateway reading's type
    window_seconds integer NOT NULL CHECK (window_seconds BETWEEN 1 AND 86400),
    window_start   timestamptz NOT NULL,
    count          bigint NOT NULL CHECK (count >= 1),
    sum            double precision NOT NULL,
    min            double precision NOT NULL,
    max            double precision NOT NULL,
    PRIMARY KEY (device_id, sensor, field, window_seconds, window_start)
);

-- One row: the watermark and the rollup worker's lease (one active worker;
-- a standby takes over when the lease lapses; the token fences the old one).
CREATE TABLE rollup_progress (
    id          smallint PRIMARY KEY CHECK (id = 1),
    store_order bigint NOT NULL DEFAULT 0,
    instance_id uuid,
    token       bigint NOT NULL DEFAULT 0,
    lease_until timestamptz NOT NULL DEFAULT '-infinity',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO rollup_progress (id) VALUES (1);

-- Window sizes per group, in seconds (1 min, 3 min, 1 h by default). A
-- change applies to rows rolled up from then on.
ALTER TABLE routing_groups ADD COLUMN rollup_windows integer[] NOT NULL DEFAULT '{60,180,3600}'
    CHECK (cardinality(rollup_windows) <= 8 AND 1 <= ALL (rollup_windows) AND 86400 >= ALL (rollup_windows));

-- Range reads by store_order: telemetry is append-only, so a BRIN index is
-- tiny and costs the drain's inserts next to nothing.
CREATE INDEX telemetry_store_order_brin ON telemetry USING brin (store_order);
