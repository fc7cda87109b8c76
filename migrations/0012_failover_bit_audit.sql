-- The failover bit is audited like a move: whoever turns a group's automatic
-- failover on or off (CLI, console, or a raw UPDATE) is in failover_events,
-- with georelay.actor/georelay.reason when set, else the database user.
ALTER TABLE failover_events DROP CONSTRAINT failover_events_kind_check;
ALTER TABLE failover_events ADD CONSTRAINT failover_events_kind_check
    CHECK (kind IN ('group_created', 'sender_moved', 'drain_followed', 'exhausted', 'abandoned',
                    'failover_on', 'failover_off'));

CREATE FUNCTION routing_groups_audit_failover() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO failover_events (group_id, kind, epoch, actor, reason)
    VALUES (NEW.id, CASE WHEN NEW.failover_enabled THEN 'failover_on' ELSE 'failover_off' END,
            NEW.epoch, georelay_actor(), georelay_reason());
    RETURN NULL;
END
$$;
CREATE TRIGGER routing_groups_audit_failover AFTER UPDATE OF failover_enabled ON routing_groups
    FOR EACH ROW WHEN (NEW.failover_enabled IS DISTINCT FROM OLD.failover_enabled)
    EXECUTE FUNCTION routing_groups_audit_failover();
