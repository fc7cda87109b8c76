-- The SQL control plane refuses what would stall a group or lose records
-- (docs/operations.md, "What the database refuses"). Each refusal has its
-- own SQLSTATE and a hint naming the safe way:
--   GR004  routing_trail rows are written by sender moves and the worker only
--   GR005  the current epoch cannot be marked drained
--   GR006  a group with undrained epochs cannot be deleted
--   GR007  a group's queue cannot be renamed (its backlog would be stranded)
--   GR008  moved_at cannot be set ahead of now
--   GR009  two groups cannot share a queue
--   GR010  a namespace holding undrained epochs keeps its endpoint
--   GR011  a namespace with a sealed key keeps its name (the key is sealed to it)
--   GR012  an enabled device keeps its group (its records in the old group's
--          queues and the new one's would be drained independently: reordered)
-- (GR001-GR003 are in 0001.) Every guard also holds for the services' own
-- statements, which never need what it refuses.

CREATE FUNCTION routing_trail_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    current_epoch bigint;
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- Only the move trigger opens an epoch (it runs one level down).
        IF pg_trigger_depth() < 2 THEN
            RAISE EXCEPTION 'routing_trail rows open only when a group''s senders move'
                USING ERRCODE = 'GR004',
                      HINT = 'move the senders: UPDATE routing_groups SET sender_namespace_id = (SELECT id FROM namespaces WHERE name = ''...'') WHERE name = ''...''';
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'DELETE' THEN
        IF OLD.drained_at IS NULL THEN
            RAISE EXCEPTION 'epoch % of group id % is not drained: deleting it would strand what its queue holds', OLD.epoch, OLD.group_id
                USING ERRCODE = 'GR004',
                      HINT = 'to give up on a region gone for good, mark the epoch drained (docs/operations.md); never delete trail rows';
        END IF;
        RETURN OLD;
    END IF;
    IF NEW.group_id <> OLD.group_id OR NEW.epoch <> OLD.epoch
       OR NEW.namespace_id <> OLD.namespace_id OR NEW.opened_at <> OLD.opened_at THEN
        RAISE EXCEPTION 'a trail row''s group, epoch, namespace and opening time never change (the worker would drain the wrong queue)'
            USING ERRCODE = 'GR004',
                  HINT = 'to send to another namespace, move the senders: UPDATE routing_groups SET sender_namespace_id = ...';
    END IF;
    IF OLD.drained_at IS NOT NULL AND NEW.drained_at IS NULL THEN
        RAISE EXCEPTION 'epoch % of group id % was drained; it cannot be undrained', OLD.epoch, OLD.group_id
            USING ERRCODE = 'GR004',
                  HINT = 'the worker has followed the trail past it; its leftovers are swept from drained namespaces by themselves';
    END IF;
    IF OLD.drained_at IS NULL AND NEW.drained_at IS NOT NULL THEN
        SELECT epoch INTO current_epoch FROM routing_groups WHERE id = NEW.group_id;
        IF NEW.epoch >= current_epoch THEN
            RAISE EXCEPTION 'epoch % is group id %''s current epoch: the senders write to it', NEW.epoch, NEW.group_id
                USING ERRCODE = 'GR005',
                      HINT = 'move the senders first (UPDATE routing_groups SET sender_namespace_id = ...); the worker then drains and follows by itself';
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER routing_trail_guard BEFORE INSERT OR UPDATE OR DELETE ON routing_trail
    FOR EACH ROW EXECUTE FUNCTION routing_trail_guard();

CREATE FUNCTION routing_groups_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        IF EXISTS (SELECT 1 FROM routing_trail WHERE group_id = OLD.id AND drained_at IS NULL) THEN
            RAISE EXCEPTION 'group "%" has undrained epochs: deleting it would strand what its queues hold', OLD.name
                USING ERRCODE = 'GR006',
                      HINT = 'move its devices to another group and let the worker drain it first';
        END IF;
        RETURN OLD;
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.queue <> OLD.queue THEN
        RAISE EXCEPTION 'group "%" keeps its queue "%": renamed, what that queue holds would be stranded', OLD.name, OLD.queue
            USING ERRCODE = 'GR007',
                  HINT = 'create a new group on the new queue (georelay admin group add) and move the devices to it';
    END IF;
    IF NEW.moved_at > now() THEN
        RAISE EXCEPTION 'moved_at cannot be ahead of now (automatic failover would answer cooling_down until then)'
            USING ERRCODE = 'GR008',
                  HINT = 'turn automatic failover off instead: UPDATE routing_groups SET failover_enabled = false WHERE name = ''...''';
    END IF;
    -- (A group of the same name is left to the unique key: "already exists".)
    IF TG_OP = 'INSERT'
       AND EXISTS (SELECT 1 FROM routing_groups WHERE queue = NEW.queue AND name <> NEW.name) THEN
        RAISE EXCEPTION 'queue "%" belongs to another group (two workers would share one queue and reorder)', NEW.queue
            USING ERRCODE = 'GR009',
                  HINT = 'give each group a queue of its own';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER routing_groups_guard BEFORE INSERT OR UPDATE OF queue, moved_at OR DELETE ON routing_groups
    FOR EACH ROW EXECUTE FUNCTION routing_groups_guard();

CREATE FUNCTION namespaces_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.endpoint <> OLD.endpoint
       AND EXISTS (SELECT 1 FROM routing_trail WHERE namespace_id = OLD.id AND drained_at IS NULL) THEN
        RAISE EXCEPTION 'namespace "%" holds undrained epochs: its endpoint stays (the worker would read another broker''s queue)', OLD.name
            USING ERRCODE = 'GR010',
                  HINT = 'add the new endpoint as a namespace of its own (georelay admin namespace add) and move the senders to it';
    END IF;
    IF NEW.name <> OLD.name AND OLD.key_sealed IS NOT NULL
       AND NEW.key_sealed IS NOT DISTINCT FROM OLD.key_sealed THEN
        RAISE EXCEPTION 'namespace "%" has a sealed key, sealed to its name: renamed, the key would no longer open', OLD.name
            USING ERRCODE = 'GR011',
                  HINT = 'keep the name; for another name, add the namespace under it with its key (georelay admin namespace add) and move the senders';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER namespaces_guard BEFORE UPDATE OF endpoint, name ON namespaces
    FOR EACH ROW EXECUTE FUNCTION namespaces_guard();

CREATE FUNCTION devices_guard_group() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.group_id <> OLD.group_id AND OLD.enabled AND NEW.enabled THEN
        RAISE EXCEPTION 'device "%" is enabled: moved to another group while it sends, its records would be stored out of order', OLD.id
            USING ERRCODE = 'GR012',
                  HINT = 'disable it (georelay admin device disable), wait until its group''s queues are drained (georelay admin status), move it, then enable it';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER devices_guard_group BEFORE UPDATE OF group_id ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_guard_group();

-- The row trigger of 0001 does not fire on TRUNCATE.
CREATE TRIGGER failover_events_no_truncate BEFORE TRUNCATE ON failover_events
    FOR EACH STATEMENT EXECUTE FUNCTION failover_events_append_only();

-- `georelay admin trail abandon` records giving up on an epoch.
ALTER TABLE failover_events DROP CONSTRAINT failover_events_kind_check;
ALTER TABLE failover_events ADD CONSTRAINT failover_events_kind_check
    CHECK (kind IN ('group_created', 'sender_moved', 'drain_followed', 'exhausted', 'abandoned'));
