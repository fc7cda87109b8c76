-- NATS credentials live in the sealed key columns, like Service Bus keys:
-- key_name `user:NAME` with the password as the key, or `token` with the
-- token as the key. An endpoint carries none (nats://user:pass@host was
-- printed by `admin namespace list` and logged); rows from before are left
-- as they are (NOT VALID) and are printed with the credentials masked:
-- move them with `admin namespace set-key` and an endpoint without them.
ALTER TABLE namespaces ADD CONSTRAINT namespaces_endpoint_no_credentials
    CHECK (endpoint !~ '^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*@') NOT VALID;
ALTER TABLE namespaces ADD CONSTRAINT namespaces_nats_key_name
    CHECK (transport <> 'nats' OR key_name IS NULL OR key_name = 'token' OR key_name ~ '^user:.+$') NOT VALID;
