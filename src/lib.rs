//! georelay's end-to-end test package.
//!
//! It holds no code of its own: the tests in `tests/` run the real `georelay`
//! binary against a real PostgreSQL (and, for the transport and chaos tests,
//! real `nats-server` processes), using the helpers of `georelay-testkit`.
