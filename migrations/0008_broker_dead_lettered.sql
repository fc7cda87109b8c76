-- A message the broker itself set aside (a Service Bus queue's
-- $DeadLetterQueue: MaxDeliveryCountExceeded on a queue made before
-- georelay raised its MaxDeliveryCount, TTL expiry, or an operator's
-- tooling): the worker reads the sub-queue and keeps each message here,
-- detail naming the broker's DeadLetterReason, so an accepted record is
-- never lost there unseen (docs/architecture.md, "Service Bus").
--   broker_dead_lettered  read from the broker's dead-letter sub-queue
ALTER TABLE dead_letters DROP CONSTRAINT dead_letters_reason_check;
ALTER TABLE dead_letters ADD CONSTRAINT dead_letters_reason_check
    CHECK (reason IN ('undecodable', 'unknown_device', 'bad_tag', 'not_json_object', 'seq_conflict',
                      'wrong_epoch', 'key_unopenable', 'refused_by_database', 'unreadable',
                      'broker_dead_lettered'));
