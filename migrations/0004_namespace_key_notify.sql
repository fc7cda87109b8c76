-- A rotated key (key_name / key_sealed) or a changed transport is news to
-- every process holding a connection to the namespace: notify, as for an
-- endpoint change, so the connection pools reconnect at once (they also
-- compare the whole triplet at every poll).
DROP TRIGGER namespaces_notify ON namespaces;
CREATE TRIGGER namespaces_notify
    AFTER INSERT OR UPDATE OF enabled, health, priority, region, transport, endpoint, key_name, key_sealed
    ON namespaces
    FOR EACH ROW EXECUTE FUNCTION namespaces_notify();
