-- A region lost for good loses nothing and reorders nothing (docs/architecture.md
-- "A region lost for good").
--
-- routing_trail.abandoned_at: when the epoch was given up (`admin trail
--   abandon`, or the worker after the group's abandon_after). Agents read the
--   abandoned epochs of their group on the progress answer and send again
--   what they sent into one of them and is not stored.
-- routing_groups.abandon_after_s: a group's worker gives up on an old epoch
--   by itself after being unable to read it this long (NULL: never).
-- device_gaps: per device and abandoned epoch, the seqs (after_seq,
--   through_seq] ingest acknowledged there and the worker had not stored when
--   the epoch was given up. While a gap is open, the device's records above
--   through_seq are parked; the gap closes when through_seq is stored (the
--   agent sent it again) or when an SRE releases it.
-- parked_records: those held-back records, durable, in the database; moved
--   to telemetry in seq order when the gap closes (by the worker only).
ALTER TABLE routing_trail ADD COLUMN abandoned_at timestamptz;
-- devices.sends_again: the device sends again, when asked, what it got an
--   acknowledgement for (the georelay agent does). A Teltonika tracker
--   deletes a record once acknowledged: the tracker front door sets it
--   false. Its gaps are released at once when an epoch is given up (nobody
--   can fill them), so its newer records are not held back.
ALTER TABLE devices ADD COLUMN sends_again boolean NOT NULL DEFAULT true;
ALTER TABLE routing_groups ADD COLUMN abandon_after_s double precision
    CHECK (abandon_after_s IS NULL OR abandon_after_s >= 1);

CREATE TABLE device_gaps (
    device_id            text NOT NULL REFERENCES devices (id),
    group_id             bigint NOT NULL REFERENCES routing_groups (id),
    epoch                bigint NOT NULL,
    after_seq            bigint NOT NULL,
    through_seq          bigint NOT NULL CHECK (through_seq > after_seq),
    opened_at            timestamptz NOT NULL DEFAULT now(),
    release_requested_at timestamptz,
    closed_at            timestamptz,
    closed_how           text CHECK (closed_how IN ('filled', 'released')),
    CHECK ((closed_at IS NULL) = (closed_how IS NULL)),
    PRIMARY KEY (device_id, group_id, epoch)
);
CREATE INDEX device_gaps_open ON device_gaps (group_id, device_id) WHERE closed_at IS NULL;

CREATE TABLE parked_records (
    device_id    text NOT NULL REFERENCES devices (id),
    seq          bigint NOT NULL CHECK (seq >= 1),
    group_id     bigint NOT NULL REFERENCES routing_groups (id),
    payload      jsonb NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    received_at  timestamptz NOT NULL,
    namespace_id bigint NOT NULL REFERENCES namespaces (id),
    epoch        bigint NOT NULL,
    parked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, seq)
);
CREATE INDEX parked_records_group ON parked_records (group_id);

ALTER TABLE failover_events DROP CONSTRAINT failover_events_kind_check;
ALTER TABLE failover_events ADD CONSTRAINT failover_events_kind_check
    CHECK (kind IN ('group_created', 'sender_moved', 'drain_followed', 'exhausted', 'abandoned',
                    'failover_on', 'failover_off', 'gap_released'));

-- GR015: parked records are accepted records that are not stored yet; only
-- the worker moves them (to telemetry, in order), and only it closes a gap
-- (which releases them). It says so with georelay.releasing in its own
-- transaction.
CREATE FUNCTION parked_records_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('georelay.releasing', true), '') = 'on' THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    RAISE EXCEPTION 'parked_records holds accepted records waiting for a gap to fill: removing or changing them loses them'
        USING ERRCODE = 'GR015',
              HINT = 'release the gap instead (georelay admin device release-gap --device D): the worker stores them in order';
END
$$;
CREATE TRIGGER parked_records_guard BEFORE UPDATE OR DELETE ON parked_records
    FOR EACH ROW EXECUTE FUNCTION parked_records_guard();
CREATE TRIGGER parked_records_guard_truncate BEFORE TRUNCATE ON parked_records
    FOR EACH STATEMENT EXECUTE FUNCTION parked_records_guard();

CREATE FUNCTION device_gaps_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('georelay.releasing', true), '') = 'on' THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.closed_at IS NOT DISTINCT FROM OLD.closed_at
       AND NEW.closed_how IS NOT DISTINCT FROM OLD.closed_how
       AND NEW.through_seq = OLD.through_seq AND NEW.after_seq = OLD.after_seq
       AND NEW.device_id = OLD.device_id AND NEW.group_id = OLD.group_id AND NEW.epoch = OLD.epoch THEN
        RETURN NEW;  -- release_requested_at: what `admin device release-gap` sets
    END IF;
    IF TG_OP = 'DELETE' AND OLD.closed_at IS NOT NULL THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'an open gap holds parked records back until it fills: closing, changing or deleting it by hand would strand or reorder them'
        USING ERRCODE = 'GR015',
              HINT = 'georelay admin device release-gap --device D (or SET release_requested_at = now()): the worker releases them in order';
END
$$;
CREATE TRIGGER device_gaps_guard BEFORE UPDATE OR DELETE ON device_gaps
    FOR EACH ROW EXECUTE FUNCTION device_gaps_guard();
CREATE TRIGGER device_gaps_guard_truncate BEFORE TRUNCATE ON device_gaps
    FOR EACH STATEMENT EXECUTE FUNCTION device_gaps_guard();

-- Releasing a gap is audited, whoever does it (CLI, console or raw SQL).
CREATE FUNCTION device_gaps_audit_release() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO failover_events (group_id, kind, epoch, actor, reason)
    VALUES (NEW.group_id, 'gap_released', NEW.epoch, georelay_actor(),
            format('device %s: seqs %s to %s stranded in epoch %s given up%s',
                   NEW.device_id, NEW.after_seq + 1, NEW.through_seq, NEW.epoch,
                   coalesce(': ' || georelay_reason(), '')));
    RETURN NULL;
END
$$;
CREATE TRIGGER device_gaps_audit_release AFTER UPDATE OF release_requested_at ON device_gaps
    FOR EACH ROW WHEN (OLD.release_requested_at IS NULL AND NEW.release_requested_at IS NOT NULL)
    EXECUTE FUNCTION device_gaps_audit_release();

-- A record of a gap an SRE released that comes back after all (its region
-- returned, or its device woke up): newer records of the device are stored,
-- so storing it would reorder; it is kept here instead.
--   gap_released  its seq is in a released gap and not stored
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_reason_check;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_reason_check
    CHECK (reason IN ('undecodable', 'unknown_device', 'bad_tag', 'not_json_object', 'seq_conflict',
                      'wrong_epoch', 'key_unopenable', 'refused_by_database', 'unreadable',
                      'broker_dead_lettered', 'gap_released'));

-- GR014 also while the device waits for records stranded in an abandoned
-- epoch of its group: its parked records are released by that group's
-- worker, and would be stored after what it sends in the new group.
CREATE FUNCTION devices_guard_group_gaps() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    open_gap record;
BEGIN
    IF NEW.group_id = OLD.group_id THEN
        RETURN NEW;
    END IF;
    SELECT epoch, after_seq, through_seq INTO open_gap
      FROM device_gaps WHERE device_id = OLD.id AND group_id = OLD.group_id AND closed_at IS NULL
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'device "%" waits for its records stranded in abandoned epoch % (seqs % to %) of its group: moved now, its parked records would be stored after its newer ones', OLD.id, open_gap.epoch, open_gap.after_seq + 1, open_gap.through_seq
            USING ERRCODE = 'GR014',
                  HINT = 'wait until its agent has sent them again (georelay admin status, STRANDED), or give them up: georelay admin device release-gap --device ' || OLD.id;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER devices_guard_group_gaps BEFORE UPDATE OF group_id ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_guard_group_gaps();
