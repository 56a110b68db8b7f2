//! The cell's data: accounts, an append-only ledger, orders, transfers,
//! the cross-cell outbox and inbox, and idempotency records.
//!
//! [`Store`] is the storage boundary: the HTTP layer speaks only
//! [`WriteOp`] / [`ReadOp`] and gets JSON back, so a server database can
//! replace SQLite ([`sqlite::SqliteStore`]) behind the same trait.

pub mod sqlite;

use std::future::Future;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A domain error: the HTTP status it maps to, a code and a message.
/// Nothing is written when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct DomainError {
    /// HTTP status.
    pub status: u16,
    /// Machine-readable code (`insufficient_funds`, ...).
    pub code: &'static str,
    /// Human message.
    pub message: String,
    /// With a 421: the cell that owns the user.
    pub owner_cell: Option<String>,
    /// With a journal refusal: the replica's LSN.
    pub lsn: Option<i64>,
}

impl DomainError {
    /// A new error.
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        DomainError {
            status,
            code,
            message: message.into(),
            owner_cell: None,
            lsn: None,
        }
    }
    /// Names the replica's LSN (journal refusals).
    pub fn with_lsn(mut self, lsn: i64) -> Self {
        self.lsn = Some(lsn);
        self
    }
    /// Names the owning cell (for a 421).
    pub fn with_owner(mut self, owner: Option<&str>) -> Self {
        self.owner_cell = owner.map(str::to_string);
        self
    }
    /// Whether the client may retry the same request later (the cell was
    /// busy, fenced or behind), as opposed to a definitive refusal.
    pub fn retryable(&self) -> bool {
        self.status >= 500 || self.status == 408 || self.status == 429
    }
    /// 400.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "bad_request", message)
    }
    /// 404.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(404, code, message)
    }
    /// 409.
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(409, code, message)
    }
    /// 422.
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(422, code, message)
    }
    /// 503 (storage unavailable, busy).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(503, "storage_unavailable", message)
    }
}

/// What to do to an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderAction {
    /// Freeze the amount.
    Try,
    /// Debit the frozen amount.
    Confirm,
    /// Unfreeze (or drop an untried order).
    Cancel,
    /// Try and confirm in one step.
    Pay,
}

impl OrderAction {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderAction::Try => "try",
            OrderAction::Confirm => "confirm",
            OrderAction::Cancel => "cancel",
            OrderAction::Pay => "pay",
        }
    }
}

/// The slot a write acts on and the ownership epoch it was routed with.
///
/// The store checks it inside the write's own transaction: the slot's
/// `slot_owner` row must be open at exactly this epoch (an open row at an
/// older epoch is raised to it: the epoch comes from the agent's rules,
/// which give the slot to this cell at that epoch). `None` on a write
/// skips the check: a user placed by a per-user cell override is fenced by
/// the guard only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SlotStamp {
    /// The slot.
    pub slot: u32,
    /// Its epoch.
    pub epoch: u64,
}

/// A write, executed atomically (all or nothing) and durably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    /// Credit a user's account from outside (creates the account).
    Deposit {
        /// The user.
        user: String,
        /// Minor units, > 0.
        amount: i64,
        /// Idempotency key.
        key: String,
        /// The user's slot.
        slot: u32,
        /// The slot fence.
        at: Option<SlotStamp>,
    },
    /// Create an order in state `created`.
    CreateOrder {
        /// The payer.
        user: String,
        /// Minor units, > 0.
        amount: i64,
        /// Merchant id.
        merchant: String,
        /// Idempotency key.
        key: String,
        /// The user's slot fence.
        at: Option<SlotStamp>,
    },
    /// Try / confirm / cancel / pay an order (idempotent by state).
    Order {
        /// Order id.
        id: String,
        /// The user the request is for; the order must be theirs.
        user: String,
        /// Action.
        action: OrderAction,
        /// The user's slot fence.
        at: Option<SlotStamp>,
    },
    /// Move money to another user. `to_cell` is `None` when the payee is in
    /// this cell (one local transaction), else the payee's cell: the debit
    /// and an outbox record are written together.
    Transfer {
        /// Payer.
        from: String,
        /// Payee.
        to: String,
        /// Minor units, > 0.
        amount: i64,
        /// Idempotency key.
        key: String,
        /// Payee's cell when not this one.
        to_cell: Option<String>,
        /// Payee's slot (for a local payee's account).
        to_slot: u32,
        /// The payer's slot fence.
        at: Option<SlotStamp>,
        /// The payee's slot fence (checked when the payee is local).
        to_at: Option<SlotStamp>,
    },
    /// An incoming cross-cell credit, idempotent by `transfer_id`.
    Credit {
        /// The payer cell's transfer id.
        transfer_id: String,
        /// The payer's cell (authenticated).
        from_cell: String,
        /// The payer (in the payer's cell).
        from: String,
        /// Payee (in this cell).
        to: String,
        /// Minor units, > 0.
        amount: i64,
        /// Payee's slot.
        slot: u32,
        /// The payee's slot fence.
        at: Option<SlotStamp>,
        /// When the transfer was made, at the sender (unix ms; 0 = unknown:
        /// the row is then never pruned).
        transfer_created_ms: i64,
        /// The sender's watermark: every transfer it made before this
        /// (unix ms) is settled and will never be sent again.
        settled_before_ms: i64,
    },
    /// The outbox record was acknowledged by the payee's cell.
    Delivered {
        /// Outbox id.
        outbox_id: i64,
    },
    /// A delivery attempt failed; retry at `next_attempt_ms` (unix ms).
    DeliveryFailed {
        /// Outbox id.
        outbox_id: i64,
        /// When to retry.
        next_attempt_ms: i64,
        /// Why it failed.
        error: String,
    },
    /// Deletes records older than the retention, at most `limit` of each
    /// kind: idempotency records, closed outbox records, and inbox records
    /// below their sender's watermark.
    Prune {
        /// Records older than this (unix ms) may go.
        before_ms: i64,
        /// Inbox records go only when made this far (ms) below their
        /// sender's watermark.
        margin_ms: i64,
        /// Most rows of each kind per call.
        limit: u32,
    },
    /// The payee's owner cell definitively refused the credit: the
    /// transfer ends `failed` and the payer is refunded (exactly once).
    TransferRefused {
        /// Outbox id.
        outbox_id: i64,
        /// The refusal, as the payee's cell gave it.
        reason: String,
        /// The payer's slot fence (the refund is a write to their account).
        at: Option<SlotStamp>,
    },
    /// First start of a store: opens `ranges` (the slots the rules give
    /// this cell at the first epoch) unless the store has claimed slots
    /// before. Later slots arrive only by hand-over ([`WriteOp::OpenSlots`]).
    ClaimSlots {
        /// Inclusive slot ranges.
        ranges: Vec<(u32, u32)>,
    },
    /// Bans slots at `epoch` (the epoch of their next owner): ordered after
    /// every write queued before it; once it commits, no write of an older
    /// epoch commits here. Replies with the ban's journal position (LSN).
    BanSlots {
        /// First slot.
        from: u32,
        /// Last slot (inclusive).
        to: u32,
        /// The new epoch (above the slots' current one).
        epoch: u64,
    },
    /// A switchover's first step on the shard's primary: bans every range
    /// at its new epoch and makes this copy a replica (every later write is
    /// refused), in one batch; replies with its LSN. See
    /// [`sqlite::shard`].
    Demote {
        /// `(from, to, epoch)`: all of the shard's slots at their new epochs.
        ranges: Vec<(u32, u32, u64)>,
    },
    /// Opens slots at `epoch` here (a hand-over: the old owner banned them
    /// at this epoch).
    OpenSlots {
        /// First slot.
        from: u32,
        /// Last slot (inclusive).
        to: u32,
        /// The epoch (above any ban recorded here).
        epoch: u64,
    },
}

/// A read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOp {
    /// Balance, frozen, available.
    Account {
        /// The user.
        user: String,
    },
    /// Ledger entries, newest first; `before` is an entry id for paging.
    Ledger {
        /// The user.
        user: String,
        /// Page size (1..=500).
        limit: u32,
        /// Only entries with a smaller id.
        before: Option<i64>,
    },
    /// One order.
    Order {
        /// Order id.
        id: String,
    },
    /// A user's orders, newest first.
    UserOrders {
        /// The user.
        user: String,
        /// Page size.
        limit: u32,
        /// Only orders created before this order id (paging).
        before: Option<i64>,
    },
    /// One transfer.
    Transfer {
        /// Transfer id.
        id: String,
    },
}

/// An outbox record to deliver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboxItem {
    /// Outbox id.
    pub id: i64,
    /// Transfer id (the payee's idempotency key).
    pub transfer_id: String,
    /// Payer (in this cell).
    pub from: String,
    /// Payee.
    pub to: String,
    /// Payee's cell when the transfer was made (the relay re-resolves the
    /// payee's owner on every attempt).
    pub to_cell: String,
    /// Amount.
    pub amount: i64,
    /// Attempts so far.
    pub attempts: i64,
    /// When the transfer was made (unix ms).
    pub created_ms: i64,
}

/// Figures for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Sum of balances in the cell (128 bits: it may exceed `i64`).
    pub balance_total: i128,
    /// Orders by state.
    pub orders_by_state: Vec<(String, i64)>,
    /// Undelivered outbox records.
    pub outbox_backlog: i64,
    /// Age of the oldest undelivered record, ms.
    pub outbox_oldest_age_ms: i64,
    /// Undelivered records older than the alert threshold.
    pub outbox_overdue: i64,
    /// Cross-cell transfers that ended `failed` (refunded).
    pub transfers_failed: i64,
}

/// A successful write or read: HTTP status and JSON body.
pub type Reply = (u16, Value);

/// The storage boundary of a cell.
pub trait Store: Clone + Send + Sync + 'static {
    /// Runs a write atomically and durably.
    fn write(&self, op: WriteOp) -> impl Future<Output = Result<Reply, DomainError>> + Send;
    /// Runs a read.
    fn read(&self, op: ReadOp) -> impl Future<Output = Result<Reply, DomainError>> + Send;
    /// Outbox records due for delivery at `now_ms`.
    fn due_outbox(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxItem>, DomainError>> + Send;
    /// The cell's watermark for its peers: the creation time (unix ms) of
    /// its oldest unsettled cross-cell transfer, or `now_ms` when none.
    fn oldest_unsettled_ms(
        &self,
        now_ms: i64,
    ) -> impl Future<Output = Result<i64, DomainError>> + Send;
    /// Figures for `/metrics`; records unacknowledged for longer than
    /// `alert_after_ms` count as overdue.
    fn stats(&self, alert_after_ms: i64)
        -> impl Future<Output = Result<Stats, DomainError>> + Send;
}

/// Checks an amount: > 0.
pub fn check_amount(amount: i64) -> Result<i64, DomainError> {
    if amount <= 0 {
        return Err(DomainError::unprocessable(
            "invalid_amount",
            format!("amount must be a positive number of minor units, got {amount}"),
        ));
    }
    Ok(amount)
}
