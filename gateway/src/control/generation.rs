//! What the data path reads: one immutable generation of the rules with
//! each cell's runtime (colour groups of instances, the in-flight limiter)
//! and the health views routing decisions are made against.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;
use prometheus::IntGauge;

use routing_rules::{CellIdx, Colour, HealthView, RoutingTable};

use crate::metrics::BoundMetrics;
use crate::upstream::Instance;

/// Caps the requests in flight to one serving cell.
#[derive(Debug)]
pub struct CellLimiter {
    pub(super) inflight: AtomicUsize,
    pub(super) cap: usize,
    pub(super) gauge: IntGauge,
}

/// One in-flight slot of a cell; released on drop.
#[derive(Debug)]
pub struct InflightGuard(Arc<CellLimiter>);

impl CellLimiter {
    /// Takes a slot, or `None` when the cell is at its cap.
    #[inline]
    pub fn try_acquire(self: &Arc<Self>) -> Option<InflightGuard> {
        let n = self.inflight.fetch_add(1, Ordering::Relaxed);
        if n >= self.cap {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        self.gauge.inc();
        Some(InflightGuard(self.clone()))
    }

    /// Requests in flight now.
    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
        self.0.gauge.dec();
    }
}

/// The instances of one (cell, colour) and its metric handles.
#[derive(Debug)]
pub struct ColourGroup {
    /// Instances, in rules order.
    pub instances: Vec<Arc<Instance>>,
    pub(super) rr: AtomicUsize,
    /// Pre-bound metrics.
    pub metrics: BoundMetrics,
}

impl ColourGroup {
    /// True when any instance is up at `now`.
    #[inline]
    pub fn any_up(&self, now: u64) -> bool {
        self.instances.iter().any(|i| i.is_up(now))
    }

    /// Round-robin pick of an up instance not in `tried`; failing that, any
    /// instance not tried (health may lag).
    pub fn pick(&self, now: u64, tried: &[Arc<Instance>]) -> Option<Arc<Instance>> {
        let n = self.instances.len();
        if n == 0 {
            return None;
        }
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let untried = |i: &&Arc<Instance>| !tried.iter().any(|t| Arc::ptr_eq(t, i));
        (0..n)
            .map(|k| &self.instances[(start + k) % n])
            .filter(untried)
            .find(|i| i.is_up(now))
            .or_else(|| self.instances.iter().find(untried))
            .cloned()
    }
}

/// Runtime state of one cell in a generation.
#[derive(Debug)]
pub struct CellRuntime {
    /// Cell name, as a header value (stamps).
    pub name_header: HeaderValue,
    /// In-flight cap.
    pub limiter: Arc<CellLimiter>,
    /// Blue and green.
    pub colours: [ColourGroup; 2],
}

impl CellRuntime {
    /// Whether `inst` may be ejected now: never the last up instance of
    /// its colour, and never more than `max_ejection_percent` of the cell's
    /// instances at once (at least one may be).
    pub fn may_eject(&self, inst: &Instance, now: u64) -> bool {
        let all = || self.colours.iter().flat_map(|g| g.instances.iter());
        let total = all().count() as u64;
        let ejected = all().filter(|i| i.is_ejected(now)).count() as u64;
        let cap = (total * inst.settings().max_ejection_percent as u64 / 100).max(1);
        if ejected >= cap {
            return false;
        }
        self.colours[inst.colour as usize]
            .instances
            .iter()
            .any(|i| !std::ptr::eq(i.as_ref(), inst) && i.is_up(now))
    }
}

/// One accepted version of the rules with everything the data path needs.
#[derive(Debug)]
pub struct Generation {
    /// The compiled routing table.
    pub table: Arc<RoutingTable>,
    /// Per cell, by [`CellIdx`].
    pub cells: Vec<CellRuntime>,
    /// The revision, as a header value.
    pub rev_header: HeaderValue,
    /// When it was loaded.
    pub loaded_at: SystemTime,
}

impl Generation {
    /// The group of a (cell, colour).
    #[inline]
    pub fn group(&self, cell: CellIdx, colour: Colour) -> &ColourGroup {
        &self.cells[cell as usize].colours[colour as usize]
    }

    /// The routing health view (active probes).
    pub fn health(&self) -> GenerationHealth<'_> {
        GenerationHealth { gen: self }
    }

    /// Health view at `now` in which the `tried` instances count as down
    /// (re-routing a request after attempts failed).
    pub fn health_excluding<'a>(
        &'a self,
        now: u64,
        tried: &'a [Arc<Instance>],
    ) -> ExcludingHealth<'a> {
        ExcludingHealth {
            gen: self,
            now,
            tried,
        }
    }
}

/// Live health minus instances already tried for this request.
#[derive(Debug, Clone, Copy)]
pub struct ExcludingHealth<'a> {
    gen: &'a Generation,
    now: u64,
    tried: &'a [Arc<Instance>],
}

impl HealthView for ExcludingHealth<'_> {
    fn is_up(&self, cell: CellIdx, colour: Colour) -> bool {
        self.gen
            .group(cell, colour)
            .instances
            .iter()
            .any(|i| i.is_up(self.now) && !self.tried.iter().any(|t| Arc::ptr_eq(t, i)))
    }
}

/// The routing health of a generation's instances: their active probes.
#[derive(Debug, Clone, Copy)]
pub struct GenerationHealth<'a> {
    gen: &'a Generation,
}

impl HealthView for GenerationHealth<'_> {
    /// Routing (cell failover, colour fallback) follows the active probes
    /// only: passive ejections steer requests between the instances of a
    /// colour, never users between cells.
    #[inline]
    fn is_up(&self, cell: CellIdx, colour: Colour) -> bool {
        self.gen
            .group(cell, colour)
            .instances
            .iter()
            .any(|i| i.active_up())
    }
}
