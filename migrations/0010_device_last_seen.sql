-- Device liveness (docs/operations.md, "GeorelaySilentDevices"): when the
-- newest record of each device that the worker stored was received. The
-- worker notes it per stored batch in memory and writes it every 30 s in
-- one statement (written in each batch's statement it cost the drain 8-14 %).
ALTER TABLE devices ADD COLUMN last_seen_at timestamptz;

-- last_seen_at changes with every stored batch: only the columns ingest
-- caches (and the id) notify it, or every batch would flush its key cache.
DROP TRIGGER devices_notify ON devices;
CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OF id, group_id, key_sealed, enabled ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_notify();
