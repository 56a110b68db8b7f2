//! cellgate's rule engine: the rules document model, its validation, the
//! versioned hash contract, the compiled O(1) routing table, diffs between
//! rule sets and consistent-hash rebalancing. Pure: no I/O, no async.
//!
//! ```
//! use routing_rules::{parse_rules, RoutingTable, RouteAttrs, AllHealthy};
//! let rules = parse_rules(r#"
//! slots = 4
//! [cells.a]
//! blue = ["127.0.0.1:9001"]
//! [[ranges]]
//! from = 0
//! to = 3
//! cell = "a"
//! "#).unwrap();
//! let table = RoutingTable::compile(rules, 1).unwrap();
//! let d = table.route(Some(b"alice"), &RouteAttrs::default(), &AllHealthy).unwrap();
//! assert_eq!(table.cell_name(d.serving_cell), "a");
//! ```

#[cfg(feature = "client")]
pub mod auth;
pub mod canary;
pub mod diff;
pub mod edit;
pub mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod files;
pub mod hash;
pub mod key;
pub mod model;
#[cfg(feature = "client")]
pub mod net;
pub mod rebalance;
pub mod revision;
#[cfg(feature = "client")]
pub mod signal;
#[cfg(feature = "client")]
pub mod switchover;
pub mod table;
pub mod validate;

pub use diff::{diff, RulesDiff};
pub use error::{RulesError, ValidationError};
pub use hash::KeyProblem;
pub use model::*;
pub use rebalance::{rebalance, RebalanceError, RebalancePlan};
pub use revision::{next_document, RevisionError, Versioned};
pub use table::{
    AllHealthy, CellIdx, CellReason, ColourReason, HealthView, RouteAttrs, RouteDecision,
    RouteExplanation, RoutingTable, StaticHealth,
};
pub use validate::{parse_rules, parse_versioned, valid_cell_name, DEFAULT_MAX_DOCUMENT_BYTES};
