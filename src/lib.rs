//! smgate: one static binary that turns an ARM IoT gateway into a state-machine host.
//!
//! The map, in the order a request meets it:
//! - [`cli`]: what each `smgate` subcommand does, after `main.rs` has parsed it.
//! - [`server`]: start-up and orderly shutdown; the one place that wires every part together.
//! - [`config`]: typed TOML configuration with `SMGATE_*` overrides; defaults boot on a laptop.
//! - [`http`]: TLS accept loop and warp routes, one file per API area; handlers parse, call
//!   the domain, map errors. No domain logic lives there.
//! - [`auth`]: accounts (ZIDs), `zeq_ak_`/`zsm_` keys stored only as SHA-256, roles, rate limits.
//! - [`machines`]: spec 000 machines: slugs, ownership, visibility.
//! - [`pages`]: spec 001 machine pages: immutable versions, proof digests, content-addressed
//!   HTML with precomputed gzip/brotli; served publicly under `/s/<slug>/` by `http::pages`.
//! - [`instances`]: statechart versions and instances (specs 002/003), durable timers; the
//!   glue between `chart` and `store`.
//! - [`agents`]: spec 004 agent runs: operator catalog, deterministic evolutionary search,
//!   the wallet (tally), the per-Zeqond ticker and BYOK model enrichment.
//! - [`store`]: redb tables, postcard codecs, schema version, and the one writer task
//!   ([`store::GroupCommit`]) through which every write goes.
//! - [`ledger`]: the verifiable log's pure core: row encoding, hash chain, RFC 6962 tree in
//!   Go-tlog layout, C2SP signed-note checkpoints. No I/O.
//! - [`chart`]: the pure statechart engine (XState-shaped JSON, SCXML semantics, Rhai
//!   expressions in a sandbox). No I/O, time passed in.
//! - [`mqtt`]: device heartbeats and events over MQTT applied as statechart steps in group
//!   commits, acked after commit; smgate as the devices' MQTT server; retained states.
//! - [`sync`]: each machine's log pushed upstream in signed, proof-checked batches (client
//!   and wire format).
//! - [`hub`]: `smgate hub`, the central receiver that verifies and stores those batches, on
//!   its redb file or on PostgreSQL. Only the CLI imports it.
//! - [`gateway`]: the data directory, the gateway's Ed25519 identity and TLS files (`init`).
//! - [`json`]: the compact JSON writer that `chart` and `ledger::canonical` share.
//! - [`tls`], [`systemd`], [`signals`], [`metrics`], [`clock`]: the small pieces around them;
//!   [`alloc`], the binary's allocator (mimalloc, committing memory on demand).
//!
//! Invariants: only the writer task writes; a request is answered only after its write is
//! durable; raw keys are never stored. Layers (ARCHITECTURE.md, checked by `tests/layers.rs`):
//! pure cores → store → domain → adapters (http, mqtt, sync, config) → server → command line.

pub mod agents;
pub mod alloc;
pub mod auth;
pub mod chart;
pub mod cli;
pub mod clock;
pub mod config;
pub mod gateway;
pub mod http;
pub mod hub;
pub mod instances;
pub mod json;
pub mod ledger;
pub mod machines;
pub mod metrics;
pub mod mqtt;
pub mod pages;
pub mod server;
pub mod signals;
pub mod store;
pub mod sync;
pub mod systemd;
pub mod tls;
