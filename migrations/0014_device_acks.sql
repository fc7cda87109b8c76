-- A device moved to another group while records of it are still queued in
-- its old group would have them stored after its newer ones (the two
-- groups' queues are drained independently). To know when none are left:
--
-- device_acks: per device, group and epoch, the highest seq an ingest
--   instance got a broker ack for. Ingest notes it in memory per record and
--   writes it with its heartbeat (one statement, only what changed).
-- devices.disabled_at: when the device was last disabled.
-- instances.ack_horizon_s: how long after a device is disabled this ingest
--   instance may still acknowledge a record of it (its device-key cache's
--   life plus its request deadline); it has reported every such
--   acknowledgement at its first heartbeat after that.
CREATE TABLE device_acks (
    device_id     text NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
    group_id      bigint NOT NULL REFERENCES routing_groups (id),
    epoch         bigint NOT NULL,
    acked_through bigint NOT NULL,
    acked_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, group_id, epoch)
);

ALTER TABLE devices ADD COLUMN disabled_at timestamptz;
ALTER TABLE instances ADD COLUMN ack_horizon_s double precision NOT NULL DEFAULT 0;

CREATE FUNCTION devices_disabled_at() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.enabled AND NOT NEW.enabled THEN
        NEW.disabled_at := now();
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER devices_disabled_at BEFORE UPDATE OF enabled ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_disabled_at();

-- GR012 as before (an enabled device stays in its group); GR014: records of
-- the device that ingest acknowledged in the old group and the worker has
-- not stored yet, or acknowledgements not reported yet.
CREATE OR REPLACE FUNCTION devices_guard_group() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    queued record;
    unreported record;
    -- Disabled and moved in one statement: disabled now.
    since timestamptz := CASE WHEN OLD.enabled THEN now() ELSE OLD.disabled_at END;
BEGIN
    IF NEW.group_id = OLD.group_id THEN
        RETURN NEW;
    END IF;
    IF OLD.enabled AND NEW.enabled THEN
        RAISE EXCEPTION 'device "%" is enabled: moved to another group while it sends, its records would be stored out of order', OLD.id
            USING ERRCODE = 'GR012',
                  HINT = 'disable it (georelay admin device disable), wait until its group''s worker has stored what it sent, move it, then enable it';
    END IF;
    SELECT i.hostname, i.pid, since + make_interval(secs => i.ack_horizon_s) AS until
      INTO unreported
      FROM instances i
     WHERE i.role = 'ingest' AND since IS NOT NULL
       AND i.lease_until > since
       AND i.heartbeat_at < since + make_interval(secs => i.ack_horizon_s)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'device "%" was disabled at %: ingest on % (pid %) may still have acknowledged records of it that it has not reported', OLD.id, since, unreported.hostname, unreported.pid
            USING ERRCODE = 'GR014',
                  HINT = 'try again after ' || unreported.until || ' (an ingest instance that died holds this until its row is cleaned up, an hour after its lease)';
    END IF;
    SELECT a.epoch, a.acked_through INTO queued
      FROM device_acks a
      JOIN routing_trail t ON t.group_id = a.group_id AND t.epoch = a.epoch AND t.drained_at IS NULL
     WHERE a.device_id = OLD.id AND a.group_id = OLD.group_id
       AND a.acked_through > coalesce((SELECT max(seq) FROM telemetry WHERE device_id = OLD.id), 0)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'device "%" still has records queued in its group (epoch %, up to seq %): moved now, they would be stored after its newer ones', OLD.id, queued.epoch, queued.acked_through
            USING ERRCODE = 'GR014',
                  HINT = 'wait until the group''s worker has stored them (georelay admin status shows it draining), then move it';
    END IF;
    RETURN NEW;
END
$$;
