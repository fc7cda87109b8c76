-- georelay control plane and telemetry store.
--
-- Table and column names are the external contract of DESIGN.md: SREs read and
-- steer the system with plain SQL against them. docs/architecture.md explains
-- each table; docs/operations.md shows the statements an SRE runs.

-- A "triplet": where a region's queue lives and how to authenticate to it.
CREATE TABLE namespaces (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name              text NOT NULL UNIQUE
                      CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    region            text NOT NULL CHECK (region ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    transport         text NOT NULL CHECK (transport IN ('nats', 'servicebus')),
    endpoint          text NOT NULL CHECK (length(endpoint) BETWEEN 1 AND 1024),
    key_name          text CHECK (length(key_name) BETWEEN 1 AND 256),
    -- The issuer key sealed with the master key (georelay_core::secret); never plaintext.
    key_sealed        bytea,
    priority          integer NOT NULL,
    enabled           boolean NOT NULL DEFAULT true,
    health            text NOT NULL DEFAULT 'healthy' CHECK (health IN ('healthy', 'degraded', 'down')),
    health_changed_at timestamptz NOT NULL DEFAULT now(),
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT namespaces_key_pair CHECK ((key_name IS NULL) = (key_sealed IS NULL)),
    CONSTRAINT namespaces_servicebus_needs_key CHECK (transport <> 'servicebus' OR key_sealed IS NOT NULL)
);

-- The pairing of plug computers, senders, worker and queue.
CREATE TABLE routing_groups (
    id                  bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    -- Queue (Service Bus) or stream (NATS) name inside every namespace: the
    -- characters both brokers accept.
    queue               text NOT NULL CHECK (queue ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$'),
    failover_enabled    boolean NOT NULL DEFAULT true,
    sender_namespace_id bigint NOT NULL REFERENCES namespaces (id),
    drain_namespace_id  bigint NOT NULL REFERENCES namespaces (id),
    epoch               bigint NOT NULL DEFAULT 1 CHECK (epoch >= 1),
    -- When the senders last moved; the automatic-failover cool-down reads it.
    moved_at            timestamptz NOT NULL DEFAULT now(),
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- One row per epoch of a group; the worker walks it in epoch order.
CREATE TABLE routing_trail (
    group_id     bigint NOT NULL REFERENCES routing_groups (id),
    epoch        bigint NOT NULL CHECK (epoch >= 1),
    namespace_id bigint NOT NULL REFERENCES namespaces (id),
    opened_at    timestamptz NOT NULL DEFAULT now(),
    sealed_at    timestamptz,   -- no sender will write to this epoch again
    drained_at   timestamptz,   -- the worker emptied it
    PRIMARY KEY (group_id, epoch),
    CONSTRAINT routing_trail_drained_after_sealed CHECK (drained_at IS NULL OR sealed_at IS NOT NULL)
);
CREATE INDEX routing_trail_undrained ON routing_trail (group_id, epoch) WHERE drained_at IS NULL;

-- Every ingest and drain process. Leases are in database time.
CREATE TABLE instances (
    id           uuid PRIMARY KEY,
    role         text NOT NULL CHECK (role IN ('ingest', 'drain')),
    hostname     text NOT NULL,
    pid          integer,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    lease_until  timestamptz NOT NULL,
    CONSTRAINT instances_lease_after_heartbeat CHECK (lease_until >= heartbeat_at)
);
CREATE INDEX instances_role_lease ON instances (role, lease_until);

-- The epoch an ingest instance writes to, per group. An instance raises it
-- only after its in-flight publishes to older epochs have finished or timed
-- out: the worker's seal barrier reads this table.
CREATE TABLE instance_epochs (
    instance_id uuid NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    group_id    bigint NOT NULL REFERENCES routing_groups (id),
    epoch       bigint NOT NULL CHECK (epoch >= 1),
    acked_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (instance_id, group_id)
);
CREATE INDEX instance_epochs_group ON instance_epochs (group_id, epoch);

-- Append-only audit of every move of senders or worker.
CREATE TABLE failover_events (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at                timestamptz NOT NULL DEFAULT now(),
    group_id          bigint NOT NULL REFERENCES routing_groups (id),
    kind              text NOT NULL CHECK (kind IN (
                          'group_created',   -- senders start on their first namespace
                          'sender_moved',    -- senders moved (failover, failback, SRE)
                          'drain_followed',  -- the worker finished an epoch and followed
                          'exhausted'        -- no namespace could take the senders
                      )),
    from_namespace_id bigint REFERENCES namespaces (id),
    to_namespace_id   bigint REFERENCES namespaces (id),
    epoch             bigint NOT NULL,
    actor             text NOT NULL,
    reason            text
);
CREATE INDEX failover_events_group_at ON failover_events (group_id, at);

CREATE TABLE devices (
    id         text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$'),
    group_id   bigint NOT NULL REFERENCES routing_groups (id),
    -- The AES-256 device key sealed with the master key; never plaintext.
    key_sealed bytea NOT NULL,
    enabled    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_group ON devices (group_id);

CREATE TABLE telemetry (
    device_id    text NOT NULL REFERENCES devices (id),
    seq          bigint NOT NULL CHECK (seq >= 1),
    payload      jsonb NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
    received_at  timestamptz NOT NULL,
    stored_at    timestamptz NOT NULL DEFAULT now(),
    namespace_id bigint NOT NULL REFERENCES namespaces (id),
    epoch        bigint NOT NULL,
    -- The order rows were stored in: the per-device order invariant reads it.
    store_order  bigint GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (device_id, seq)
);

-- Records that can never be stored. Raw bytes are the queue message as
-- received: still sealed under the device key.
CREATE TABLE dead_letters (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    group_id     bigint REFERENCES routing_groups (id),
    namespace_id bigint REFERENCES namespaces (id),
    epoch        bigint,
    message_id   text,
    device_id    text,   -- as claimed by the message; may name no device
    seq          bigint,
    reason       text NOT NULL CHECK (reason IN ('undecodable', 'unknown_device', 'bad_tag', 'not_json_object')),
    detail       text,
    raw          bytea NOT NULL
);

-- ---------------------------------------------------------------------------
-- Notifications. One channel, JSON payloads: {"table": ..., "id": ..., ...}.
-- Ingest instances LISTEN to refresh their caches; they also poll, because a
-- NOTIFY is lost while a listener is disconnected.
-- ---------------------------------------------------------------------------

CREATE FUNCTION georelay_actor() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT coalesce(nullif(current_setting('georelay.actor', true), ''), session_user::text)
$$;

CREATE FUNCTION georelay_reason() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT nullif(current_setting('georelay.reason', true), '')
$$;

-- The one place a group's senders move. Fires on every change of
-- sender_namespace_id, whoever makes it: code, CLI or an SRE's raw UPDATE.
CREATE FUNCTION routing_groups_before_move() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    target record;
BEGIN
    SELECT name, enabled INTO target FROM namespaces WHERE id = NEW.sender_namespace_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cannot move group "%" to namespace id %: no such namespace', NEW.name, NEW.sender_namespace_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF NOT target.enabled THEN
        RAISE EXCEPTION 'cannot move group "%" to namespace "%": it is disabled', NEW.name, target.name
            USING ERRCODE = 'GR001',
                  HINT = 'enable it first: UPDATE namespaces SET enabled = true WHERE name = ''' || target.name || '''';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        NEW.epoch := OLD.epoch + 1;
    ELSE
        NEW.epoch := 1;
        NEW.drain_namespace_id := NEW.sender_namespace_id;
    END IF;
    NEW.moved_at := now();
    RETURN NEW;
END
$$;

CREATE FUNCTION routing_groups_after_move() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO routing_trail (group_id, epoch, namespace_id)
    VALUES (NEW.id, NEW.epoch, NEW.sender_namespace_id);
    INSERT INTO failover_events (group_id, kind, from_namespace_id, to_namespace_id, epoch, actor, reason)
    VALUES (NEW.id,
            CASE TG_OP WHEN 'INSERT' THEN 'group_created' ELSE 'sender_moved' END,
            CASE TG_OP WHEN 'INSERT' THEN NULL ELSE OLD.sender_namespace_id END,
            NEW.sender_namespace_id, NEW.epoch, georelay_actor(), georelay_reason());
    PERFORM pg_notify('georelay', json_build_object(
        'table', 'routing_groups', 'id', NEW.id, 'name', NEW.name,
        'epoch', NEW.epoch, 'sender_namespace_id', NEW.sender_namespace_id)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER routing_groups_before_insert BEFORE INSERT ON routing_groups
    FOR EACH ROW EXECUTE FUNCTION routing_groups_before_move();
CREATE TRIGGER routing_groups_before_move BEFORE UPDATE OF sender_namespace_id ON routing_groups
    FOR EACH ROW WHEN (NEW.sender_namespace_id IS DISTINCT FROM OLD.sender_namespace_id)
    EXECUTE FUNCTION routing_groups_before_move();
CREATE TRIGGER routing_groups_after_insert AFTER INSERT ON routing_groups
    FOR EACH ROW EXECUTE FUNCTION routing_groups_after_move();
CREATE TRIGGER routing_groups_after_move AFTER UPDATE OF sender_namespace_id ON routing_groups
    FOR EACH ROW WHEN (NEW.sender_namespace_id IS DISTINCT FROM OLD.sender_namespace_id)
    EXECUTE FUNCTION routing_groups_after_move();

-- Epoch and trail follow sender_namespace_id only: nobody edits them by hand.
CREATE FUNCTION routing_groups_guard_epoch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.epoch IS DISTINCT FROM OLD.epoch
       AND NEW.sender_namespace_id IS NOT DISTINCT FROM OLD.sender_namespace_id THEN
        RAISE EXCEPTION 'routing_groups.epoch changes only when sender_namespace_id does'
            USING ERRCODE = 'GR002';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER routing_groups_guard_epoch BEFORE UPDATE OF epoch ON routing_groups
    FOR EACH ROW EXECUTE FUNCTION routing_groups_guard_epoch();

CREATE FUNCTION routing_groups_notify_settings() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('georelay', json_build_object(
        'table', 'routing_groups', 'id', NEW.id, 'name', NEW.name, 'epoch', NEW.epoch,
        'sender_namespace_id', NEW.sender_namespace_id,
        'drain_namespace_id', NEW.drain_namespace_id,
        'failover_enabled', NEW.failover_enabled)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER routing_groups_notify_settings AFTER UPDATE OF failover_enabled, drain_namespace_id ON routing_groups
    FOR EACH ROW WHEN (NEW.failover_enabled IS DISTINCT FROM OLD.failover_enabled
                       OR NEW.drain_namespace_id IS DISTINCT FROM OLD.drain_namespace_id)
    EXECUTE FUNCTION routing_groups_notify_settings();

CREATE FUNCTION namespaces_before_health() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.health_changed_at := now();
    RETURN NEW;
END
$$;
CREATE TRIGGER namespaces_before_health BEFORE UPDATE OF health ON namespaces
    FOR EACH ROW WHEN (NEW.health IS DISTINCT FROM OLD.health)
    EXECUTE FUNCTION namespaces_before_health();

CREATE FUNCTION namespaces_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('georelay', json_build_object(
        'table', 'namespaces', 'id', NEW.id, 'name', NEW.name,
        'enabled', NEW.enabled, 'health', NEW.health)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER namespaces_notify AFTER INSERT OR UPDATE OF enabled, health, priority, region, endpoint ON namespaces
    FOR EACH ROW EXECUTE FUNCTION namespaces_notify();

CREATE FUNCTION devices_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('georelay', json_build_object(
        'table', 'devices', 'id', NEW.id, 'enabled', NEW.enabled)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION devices_notify();

-- The audit trail is append-only.
CREATE FUNCTION failover_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'failover_events is append-only' USING ERRCODE = 'GR003';
END
$$;
CREATE TRIGGER failover_events_append_only BEFORE UPDATE OR DELETE ON failover_events
    FOR EACH ROW EXECUTE FUNCTION failover_events_append_only();
