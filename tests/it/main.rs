//! Integration tests: each starts a real pushgate on 127.0.0.1:0 and talks
//! to it over real HTTP. One binary, many modules, so the suite links once.

mod auth;
mod browser;
mod common;
mod core;
mod feed_prop;
mod fuzz;
mod hardening;
mod idempotency;
mod ingest;
mod ingest_interop;
mod multinode;
mod nonreader;
mod openapi;
mod ops;
mod pg;
mod pg_store;
mod sniff;
mod sqlite_store;
mod store_suite;
mod webhooks;
mod webhooks_process;
mod ws;
