-- Which ingest instances started publishing to which epoch
-- (docs/architecture.md, "An epoch nobody published to").
--
-- An ingest instance writes its row here once per group and epoch, before
-- its first publish to that epoch (a timed-out publish may land, so the
-- attempt counts). Once an old epoch is sealed and no instance ever wrote a
-- row for it, its queue holds nothing of georelay's: the worker follows the
-- trail past it without reading it. That heals senders moved to a
-- namespace with a mistyped endpoint and straight back, which used to hold
-- the worker on an unreachable queue forever.
--
-- Only epochs opened from now on are recorded (publishes_recorded), and an
-- epoch is skipped only if no ingest process of an older version (one that
-- does not record: instances.records_publishes) held a lease since it opened.
ALTER TABLE routing_trail ADD COLUMN publishes_recorded boolean NOT NULL DEFAULT false;
ALTER TABLE routing_trail ALTER COLUMN publishes_recorded SET DEFAULT true;
ALTER TABLE instances ADD COLUMN records_publishes boolean NOT NULL DEFAULT false;

CREATE TABLE epoch_publishes (
    group_id    bigint NOT NULL,
    epoch       bigint NOT NULL,
    instance_id uuid NOT NULL,
    first_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, epoch, instance_id),
    FOREIGN KEY (group_id, epoch) REFERENCES routing_trail (group_id, epoch) ON DELETE CASCADE
);

--   GR013  what says whether an epoch was published to changes only as
--          ingest writes it: a row removed, or publishes_recorded turned on
--          for an old epoch, would make the worker skip a queue holding
--          accepted records (loss)
CREATE FUNCTION epoch_publishes_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    refused boolean := TG_OP = 'TRUNCATE';
BEGIN
    IF NOT refused THEN
        refused := EXISTS (SELECT 1 FROM routing_trail
                           WHERE group_id = OLD.group_id AND epoch = OLD.epoch AND drained_at IS NULL);
    END IF;
    IF refused THEN
        RAISE EXCEPTION 'epoch_publishes says which epochs hold records; changing it for an undrained epoch would make the worker skip a queue with accepted records'
            USING ERRCODE = 'GR013',
                  HINT = 'leave it to ingest; to give up on a region gone for good, use georelay admin trail abandon';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER epoch_publishes_guard BEFORE UPDATE OR DELETE ON epoch_publishes
    FOR EACH ROW EXECUTE FUNCTION epoch_publishes_guard();
CREATE TRIGGER epoch_publishes_no_truncate BEFORE TRUNCATE ON epoch_publishes
    FOR EACH STATEMENT EXECUTE FUNCTION epoch_publishes_guard();

CREATE FUNCTION routing_trail_publishes_recorded_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.publishes_recorded <> OLD.publishes_recorded THEN
        RAISE EXCEPTION 'whether an epoch''s publishes are recorded is fixed when it opens'
            USING ERRCODE = 'GR013',
                  HINT = 'an epoch opened before publishes were recorded is drained by reading its queue';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER routing_trail_publishes_recorded_guard BEFORE UPDATE OF publishes_recorded ON routing_trail
    FOR EACH ROW EXECUTE FUNCTION routing_trail_publishes_recorded_guard();
