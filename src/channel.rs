//! Channel names and channel patterns: the vocabulary every other module
//! uses to say "where an event goes" and "who may see it".
//!
//! Owns the one definition of a valid channel name and of a pattern
//! (exact, or a prefix ending in `*`). Invariant: this module sits at the
//! bottom of the crate and imports nothing from it, so config, auth,
//! ingest routing, deliver and the store all agree on one grammar.

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 200;

/// Channel names: 1–200 bytes of `[A-Za-z0-9_.:@=/-]`.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_CHANNEL_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.:@=/-".contains(&b))
}

/// A name that is not a channel name. Its message shows at most the first
/// 64 characters of what was sent, so an error never echoes a huge input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a channel name: 1-200 bytes of [A-Za-z0-9_.:@=/-]")]
pub struct InvalidChannel(String);

impl InvalidChannel {
    pub fn new(name: &str) -> InvalidChannel {
        InvalidChannel(name.chars().take(64).collect())
    }
}

/// `Ok` for a valid channel name, else the error that names it.
pub fn check_channel(name: &str) -> Result<(), InvalidChannel> {
    if valid_channel(name) {
        Ok(())
    } else {
        Err(InvalidChannel::new(name))
    }
}

/// A channel pattern from a grant, `public_channels` or an endpoint's
/// subscription: exact, or a prefix ending in `*` that matches one or more
/// further characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(p: &str) -> Pattern {
        Pattern(p.to_string())
    }

    pub fn matches(&self, channel: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => channel.len() > prefix.len() && channel.starts_with(prefix),
            None => self.0 == channel,
        }
    }

    /// Whether `p` is a pattern a grant or `public_channels` may hold: a
    /// channel name, optionally ending in `*`, or `*` alone.
    pub fn is_valid(p: &str) -> bool {
        match p.strip_suffix('*') {
            Some("") => true,
            Some(prefix) => valid_channel(prefix),
            None => valid_channel(p),
        }
    }
}

pub fn any_matches(patterns: &[Pattern], channel: &str) -> bool {
    patterns.iter().any(|p| p.matches(channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        assert!(valid_channel("user:42"));
        assert!(valid_channel("a.b/c@d=e-f_g"));
        assert!(valid_channel(&"x".repeat(200)));
        assert!(!valid_channel(&"x".repeat(201)));
        assert!(!valid_channel(""));
        assert!(!valid_channel("user 42"));
        assert!(!valid_channel("user:42\n"));
        assert!(!valid_channel("ü"));
    }

    #[test]
    fn patterns() {
        assert!(Pattern::new("user:*").matches("user:1"));
        assert!(!Pattern::new("user:*").matches("user:"));
        assert!(Pattern::new("*").matches("x"));
        assert!(Pattern::new("orders").matches("orders"));
        assert!(!Pattern::new("orders").matches("orders2"));
        assert!(Pattern::is_valid("*") && Pattern::is_valid("a:*") && Pattern::is_valid("a"));
        assert!(!Pattern::is_valid("a b*") && !Pattern::is_valid(""));
    }

    #[test]
    fn invalid_channel_errors_are_bounded() {
        let e = check_channel(&"é".repeat(500)).unwrap_err();
        assert!(e.to_string().len() < 200, "{e}");
        assert!(check_channel("ok").is_ok());
    }
}
