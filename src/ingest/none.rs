//! `kind = "none"`: no signature at all, for development and for senders
//! behind a trusted network. Refused at load unless the source sets
//! `allow_unsigned = true`. Dedupe key: `id_header`/`id_field`, by default
//! the body `id`; type: `type_header`/`type_field`, by default body `type`.
//!
//! Invariant: since nothing is verified, every delivery counts against the
//! client's `limits.invalid_per_client` budget before its body is read
//! (`api::webhooks`, `Limits::check_unverified`).

use serde_json::Value;

use super::{Delivery, Identity, IdentityFields, Rejection, Verifier};

pub struct Unsigned {
    fields: IdentityFields,
}

impl Unsigned {
    pub fn new(fields: IdentityFields) -> Unsigned {
        Unsigned { fields }
    }
}

impl Verifier for Unsigned {
    fn verify(&self, _d: &Delivery<'_>) -> Result<(), Rejection> {
        Ok(())
    }

    fn identify(&self, d: &Delivery<'_>, payload: &Value) -> Identity {
        self.fields.read(d, payload, Some("id"), Some("type"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use serde_json::json;

    #[test]
    fn body_id_and_type_by_default() {
        let u = Unsigned::new(IdentityFields::default());
        let h = HeaderMap::new();
        let d = Delivery {
            headers: &h,
            body: b"",
            now: 0,
        };
        assert_eq!(u.verify(&d), Ok(()));
        let id = u.identify(&d, &json!({"id": 7, "type": "ping"}));
        assert_eq!(id.source_id.as_deref(), Some("7"));
        assert_eq!(id.kind.as_deref(), Some("ping"));
        assert_eq!(u.identify(&d, &json!([1])), Identity::default());
    }
}
