//! The SQLite writer thread: the only connection that writes.
//!
//! Invariants: it drains every write waiting in its queue into one
//! transaction (group commit), each request in its own savepoint so one bad
//! request cannot undo its neighbours; it assigns seqs from its in-memory
//! head inside that transaction (commit order is seq order); it sends each
//! committed batch to the commit feed after the commit, in seq order.

use std::sync::Arc;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::inbound::insert_inbound;
use super::log::append_messages;
use super::pragmas;
use crate::store::{
    Appended, Event, InboundId, NewInbound, NewMessage, Retention, Seq, StoreError, now_ms,
};

/// Requests the writer takes in one transaction, at most.
const MAX_GROUP: usize = 512;
/// Events deleted per retention transaction, so pruning never stalls appends for long.
pub(super) const PRUNE_CHUNK: i64 = 20_000;

pub(super) enum WriteCmd {
    Append {
        messages: Vec<NewMessage>,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    },
    Webhook {
        message: NewMessage,
        inbound: NewInbound,
        reply: oneshot::Sender<Result<(Appended, InboundId), StoreError>>,
    },
    Rejected {
        inbound: NewInbound,
        reply: oneshot::Sender<Result<InboundId, StoreError>>,
    },
    Prune {
        retention: Retention,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Pragmas {
        reply: oneshot::Sender<rusqlite::Result<(String, i64)>>,
    },
    /// Any other write, run on the writer's connection with the current head
    /// (outbound webhooks); it replies through its own channel.
    Run(WriterJob),
}

pub(super) type WriterJob = Box<dyn FnOnce(&mut Connection, Seq) + Send>;
/// The writes of one group commit, each run in its own savepoint.
enum Job {
    Append {
        messages: Vec<NewMessage>,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    },
    Webhook {
        message: NewMessage,
        inbound: NewInbound,
        reply: oneshot::Sender<Result<(Appended, InboundId), StoreError>>,
    },
    Rejected {
        inbound: NewInbound,
        reply: oneshot::Sender<Result<InboundId, StoreError>>,
    },
}

enum Outcome {
    Appended(Vec<Appended>),
    Webhook(Appended, InboundId),
    Recorded(InboundId),
}

impl Job {
    /// Answers the job's caller; a reply that does not fit the job cannot
    /// happen (outcomes are made from their own job) and reads as internal.
    fn reply(self, outcome: Result<Outcome, StoreError>) {
        let mismatch = || StoreError::internal("mismatched write outcome");
        match self {
            Job::Append { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Appended(a) => Ok(a),
                    _ => Err(mismatch()),
                }));
            }
            Job::Webhook { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Webhook(a, id) => Ok((a, id)),
                    _ => Err(mismatch()),
                }));
            }
            Job::Rejected { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Recorded(id) => Ok(id),
                    _ => Err(mismatch()),
                }));
            }
        }
    }
}

pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) head: Seq,
    pub(super) pruned_through: Seq,
    pub(super) feed: mpsc::Sender<Arc<[Event]>>,
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<WriteCmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(cmd) => group.push(cmd),
                    Err(_) => break,
                }
            }
            self.run_group(group);
        }
        // Channel closed: every sender is gone, all queued work is done.
    }

    fn run_group(&mut self, group: Vec<WriteCmd>) {
        let mut jobs = Vec::new();
        for cmd in group {
            match cmd {
                WriteCmd::Append { messages, reply } => jobs.push(Job::Append { messages, reply }),
                WriteCmd::Webhook {
                    message,
                    inbound,
                    reply,
                } => jobs.push(Job::Webhook {
                    message,
                    inbound,
                    reply,
                }),
                WriteCmd::Rejected { inbound, reply } => {
                    jobs.push(Job::Rejected { inbound, reply })
                }
                WriteCmd::Prune { retention, reply } => {
                    let _ = reply.send(self.prune(retention).map_err(StoreError::from));
                }
                WriteCmd::Pragmas { reply } => {
                    let _ = reply.send(pragmas(&self.conn));
                }
                WriteCmd::Run(f) => f(&mut self.conn, self.head),
            }
        }
        if jobs.is_empty() {
            return;
        }
        let head_before = self.head;
        let mut committed: Vec<Event> = Vec::new();
        let outcomes = match self.run_jobs(&jobs, &mut committed) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                self.head = head_before;
                let e = StoreError::from(e);
                tracing::error!(error = %e, "append transaction failed");
                for job in jobs {
                    job.reply(Err(e.replicate()));
                }
                return;
            }
        };
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            job.reply(outcome);
        }
        if !committed.is_empty() {
            // Blocking here is the backpressure that keeps the hub's queue bounded.
            let _ = self.feed.blocking_send(committed.into());
        }
    }

    /// Runs every job of a group in one transaction, each in its own savepoint.
    fn run_jobs(
        &mut self,
        jobs: &[Job],
        committed: &mut Vec<Event>,
    ) -> rusqlite::Result<Vec<Result<Outcome, StoreError>>> {
        let mut tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
            let head_before = self.head;
            let committed_before = committed.len();
            let mut sp = tx.savepoint()?;
            let result = match job {
                Job::Append { messages, .. } => {
                    append_messages(&sp, messages, now, &mut self.head, committed)
                        .map(Outcome::Appended)
                }
                Job::Webhook {
                    message, inbound, ..
                } => append_messages(
                    &sp,
                    std::slice::from_ref(message),
                    now,
                    &mut self.head,
                    committed,
                )
                .and_then(|mut out| {
                    let appended = out.pop().expect("one outcome per message");
                    let id = insert_inbound(&sp, inbound, Some((message, &appended)), now)?;
                    Ok(Outcome::Webhook(appended, id))
                }),
                Job::Rejected { inbound, .. } => {
                    insert_inbound(&sp, inbound, None, now).map(Outcome::Recorded)
                }
            };
            match result {
                Ok(out) => {
                    sp.commit()?;
                    outcomes.push(Ok(out));
                }
                Err(e) => {
                    sp.rollback()?;
                    drop(sp);
                    self.head = head_before;
                    committed.truncate(committed_before);
                    outcomes.push(Err(StoreError::from(e)));
                }
            }
        }
        tx.commit()?;
        Ok(outcomes)
    }

    fn prune(&mut self, retention: Retention) -> rusqlite::Result<u64> {
        let now = now_ms();
        let mut removed = 0u64;
        loop {
            let age_cutoff = now.saturating_sub(retention.max_age_ms);
            // The first event young enough to keep; everything before it goes.
            let first_young: Option<Seq> = self
                .conn
                .query_row(
                    "SELECT seq FROM events WHERE time_ms >= ?1 ORDER BY seq LIMIT 1",
                    params![age_cutoff],
                    |r| r.get(0),
                )
                .optional()?;
            let mut keep_from = first_young.unwrap_or(self.head + 1);
            if retention.max_events > 0 {
                keep_from = keep_from.max(self.head + 1 - retention.max_events as i64);
            }
            let oldest: Option<Seq> =
                self.conn
                    .query_row("SELECT MIN(seq) FROM events", [], |r| r.get(0))?;
            let Some(oldest) = oldest.filter(|o| *o < keep_from) else {
                break;
            };
            let upto = keep_from.min(oldest + PRUNE_CHUNK) - 1;
            let tx = self.conn.transaction()?;
            let n = tx.execute("DELETE FROM events WHERE seq <= ?1", params![upto])?;
            tx.execute(
                "DELETE FROM inbound WHERE capped = 0 AND first_seq <= ?1",
                params![upto],
            )?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('pruned_through', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![upto.to_string()],
            )?;
            tx.commit()?;
            self.pruned_through = upto;
            removed += n as u64;
        }
        if retention.dedupe_window_ms < i64::MAX {
            self.conn.execute(
                "DELETE FROM dedupe WHERE time_ms < ?1",
                params![now.saturating_sub(retention.dedupe_window_ms)],
            )?;
        }
        Ok(removed)
    }
}
