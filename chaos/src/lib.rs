//! `cellchaos`: failover drills for cellgate, and the evidence they leave.
//!
//! This first part is the offline checker ([`offline`]): the invariants a
//! stopped topology's SQLite files must hold after any drill — every shard
//! and replica sound on its own, exactly one primary copy per cell, every
//! cross-cell credit matched with its debit, replicas never ahead of their
//! primary. [`fault_proxy`] is the TCP proxy a drill puts on a link to slow,
//! cut or reset it without root. The drill runner (recording client,
//! faults on a timeline, RTO/RPO report) builds on both.

pub mod fault_proxy;
pub mod offline;
pub mod workload;
