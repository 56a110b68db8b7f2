//! The cell agent: runs in every cell and serves the wallet and order data
//! of the cell's own users (accounts, an append-only ledger, orders with
//! try/confirm/cancel, same-cell and cross-cell transfers) over its own
//! SQLite shard, behind a guard that refuses users the cell does not own.

pub mod api;
pub mod auth;
pub mod body;
pub mod check;
mod control_plane;
pub mod guard;
pub mod handover;
pub mod internal;
pub mod listener;
pub mod metrics;
pub mod prune;
pub mod reconcile;
pub mod relay;
pub mod replication;
pub mod rules;
pub mod server;
pub mod shards;
pub mod store;
pub mod switchover;

pub use server::{start, start_bound, start_on, AgentConfig, RunningAgent};
