-- A record whose (device_id, seq) is already stored with a different
-- payload: the device reused a seq (its state was lost, or it was cloned),
-- and with it a nonce under its key. The first record stays in telemetry;
-- the second is kept here, still sealed, for an operator (re-key the device).
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_reason_check;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_reason_check
    CHECK (reason IN ('undecodable', 'unknown_device', 'bad_tag', 'not_json_object', 'seq_conflict'));
