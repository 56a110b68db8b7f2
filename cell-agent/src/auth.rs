//! Authentication of cell-to-cell calls: see [`routing_rules::auth`].

pub use routing_rules::auth::*;
