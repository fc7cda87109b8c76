-- Poison a queue can carry that the worker now keeps instead of retrying
-- forever (docs/architecture.md, "Poison"):
--   wrong_epoch          the envelope names an epoch the trail does not put
--                        on this namespace (no ingest could have sent it there)
--   key_unopenable       the device's sealed key does not open (its row was
--                        tampered with, or sealed under another master key)
--   refused_by_database  PostgreSQL refused this one record (a value it cannot
--                        store); detail holds its message
--   unreadable           the broker message itself could not be read as usual
--                        (NATS headers the client cannot parse)
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_reason_check;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_reason_check
    CHECK (reason IN ('undecodable', 'unknown_device', 'bad_tag', 'not_json_object', 'seq_conflict',
                      'wrong_epoch', 'key_unopenable', 'refused_by_database', 'unreadable'));
