//! The SQLite schema, versioned: the numbered files of `migrations/sqlite/`
//! are embedded at build time and applied in order at start-up.
//!
//! Invariants: `PRAGMA user_version` is the number of the last migration
//! applied; each migration runs in one transaction together with the bump
//! of `user_version` (SQLite's DDL is transactional), so a crash leaves the
//! database at a whole version, never half-way; a database newer than this
//! build (a version it does not know) is refused instead of being written to.

use rusqlite::{Connection, TransactionBehavior};

use crate::store::StoreError;

/// `(version, SQL)`, in order, starting at 1 with no gap.
const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        include_str!("../../../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/sqlite/0002_dedupe_scope.sql"),
    ),
];

/// The version this build writes.
pub(crate) const LATEST: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

#[derive(Debug, thiserror::Error)]
#[error("the database is at schema version {found}, newer than this build's {latest}")]
struct TooNew {
    found: u32,
    latest: u32,
}

/// Brings the database to `LATEST`; returns the version it was at.
pub(super) fn run(conn: &mut Connection) -> Result<u32, StoreError> {
    // The check and the migrations run under the write lock, so two
    // processes opening one file at once apply each step once.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > LATEST {
        return Err(StoreError::internal(TooNew {
            found,
            latest: LATEST,
        }));
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version)?;
        tracing::info!(version, "sqlite schema migrated");
    }
    tx.commit()?;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_numbered_from_one_without_gaps() {
        for (i, (version, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
        }
    }

    #[test]
    fn a_new_database_is_at_latest_and_a_second_run_changes_nothing() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(run(&mut conn).unwrap(), 0);
        assert_eq!(run(&mut conn).unwrap(), LATEST);
    }

    #[test]
    fn a_database_newer_than_this_build_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", LATEST + 1)
            .unwrap();
        let err = run(&mut conn).unwrap_err();
        assert!(!err.is_transient());
        assert!(matches!(err, StoreError::Internal(_)));
        // Positive control: at LATEST it opens.
        conn.pragma_update(None, "user_version", LATEST).unwrap();
        assert_eq!(run(&mut conn).unwrap(), LATEST);
    }
}
