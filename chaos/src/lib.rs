//! `cellchaos`: failover drills for cellgate, and the evidence they leave.
//!
//! A drill ([`drill`]) starts a [`scenario`]'s [`topology`] as real
//! processes, runs the recording client ([`workload`]) and the faults on a
//! timeline at once (links faulted through a [`fault_proxy`], processes
//! killed, frozen, restarted; operator switchovers, failovers, splits),
//! undoes every fault, and checks: no acknowledged write lost, doubled or
//! reordered, money conserved, the [`offline`] invariants of the files, the
//! shards back in sync — then writes report.md, report.json and
//! timeline.svg with the RTO of every affected cell.
//!
//! [`demo`] is `cellgate demo`: the whole system on one machine, its smoke
//! workload and its drill (the `cellgate` binary links it; the gateway
//! library does not).

pub mod demo;
pub mod drill;
pub mod fault_proxy;
pub mod http;
pub mod offline;
pub mod scenario;
pub mod topology;
pub mod workload;
