//! The JSON error every route answers with; it lives in `crate::error`
//! (where domain errors are mapped to it) and is re-exported here.

pub use crate::error::*;
