//! Routing: which channels a webhook's event goes to.
//!
//! Owns channel templates (`user:{data.object.metadata.user_id}`), per-type
//! rules and the fallback. Invariants:
//! - every template is parsed and checked when the configuration loads, so
//!   a mistake is a start-up error naming `sources[i].…`, never a surprise at
//!   the first webhook;
//! - routing never refuses: a field that is missing, is not a string or a
//!   number, is empty, or renders an invalid channel name sends that channel
//!   to the fallback (never to a channel named `user:`);
//! - a message goes to each channel at most once.

use http::{HeaderMap, HeaderName};
use serde_json::Value;

use crate::channel::valid_channel;
use crate::config::{ConfigError, SourceConfig};

/// Where a template field is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    /// A dotted path into the JSON body; numeric segments index arrays.
    Body(Vec<String>),
    /// `headers.<name>`: a request header.
    Header(HeaderName),
}

impl Field {
    /// Parses `data.object.id` or `headers.x-shopify-shop-domain`.
    pub fn parse(path: &str) -> Result<Field, String> {
        if path.is_empty() {
            return Err("empty field path".into());
        }
        if let Some(name) = path.strip_prefix("headers.") {
            return HeaderName::from_bytes(name.as_bytes())
                .map(Field::Header)
                .map_err(|_| format!("`{name}` is not a header name"));
        }
        let segments: Vec<String> = path.split('.').map(str::to_string).collect();
        if segments.iter().any(String::is_empty) {
            return Err(format!("`{path}` has an empty segment"));
        }
        Ok(Field::Body(segments))
    }

    /// The field's text: a non-empty string, or a number as written.
    pub fn text(&self, body: &Value, headers: &HeaderMap) -> Option<String> {
        match self {
            Field::Body(path) => scalar_text(lookup(body, path)?),
            Field::Header(name) => headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string),
        }
    }
}

/// Follows a dotted path through objects (by key) and arrays (by index).
pub fn lookup<'a>(mut value: &'a Value, path: &[String]) -> Option<&'a Value> {
    for segment in path {
        value = match value {
            Value::Object(map) => map.get(segment)?,
            Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Strings (non-empty) and numbers have a text; nothing else does.
pub fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(Field),
}

/// A channel name with `{field}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parses and checks a template: braces balanced, fields well formed,
    /// the literal text made of channel-name characters, and a template
    /// without fields a valid channel name on its own.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Literal(rest.to_string()));
                    rest = "";
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(format!("`{text}`: `}}` without a matching `{{`"));
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Literal(rest[..i].to_string()));
                    }
                    let after = &rest[i + 1..];
                    let close = after
                        .find(['{', '}'])
                        .filter(|j| after.as_bytes()[*j] == b'}')
                        .ok_or_else(|| format!("`{text}`: `{{` without a matching `}}`"))?;
                    let field = Field::parse(after[..close].trim())
                        .map_err(|e| format!("`{text}`: {e}"))?;
                    parts.push(Part::Field(field));
                    rest = &after[close + 1..];
                }
            }
        }
        for part in &parts {
            if let Part::Literal(lit) = part
                && !lit
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:@=/-".contains(&b))
            {
                return Err(format!(
                    "`{text}`: `{lit}` has characters not allowed in channel names ([A-Za-z0-9_.:@=/-])"
                ));
            }
        }
        let template = Template { parts };
        if !template.has_fields() && !valid_channel(text) {
            return Err(format!(
                "`{text}` is not a channel name: 1-200 bytes of [A-Za-z0-9_.:@=/-]"
            ));
        }
        Ok(template)
    }

    fn has_fields(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Field(_)))
    }

    /// The channel this template names for one delivery, if every field has
    /// a text and the result is a valid channel name.
    pub fn render(&self, body: &Value, headers: &HeaderMap) -> Option<String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(lit) => out.push_str(lit),
                Part::Field(field) => out.push_str(&field.text(body, headers)?),
            }
            if out.len() > 200 {
                return None;
            }
        }
        valid_channel(&out).then_some(out)
    }
}

/// `*` matches any run of characters (also none); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            backtrack = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((star, at)) = backtrack {
            pi = star + 1;
            ti = at + 1;
            backtrack = Some((star, at + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

#[derive(Debug, Clone)]
struct Rule {
    types: Vec<String>,
    channels: Vec<Template>,
}

/// A source's routing, checked at load.
#[derive(Debug, Clone)]
pub struct Routes {
    rules: Vec<Rule>,
    channel: Option<Template>,
    fallback: String,
}

impl Routes {
    /// `index` is the source's position in `sources`, for error messages.
    pub fn from_config(cfg: &SourceConfig, index: usize) -> Result<Routes, ConfigError> {
        let key = |k: &str| format!("sources[{index}].{k}");
        let fallback = match &cfg.fallback_channel {
            Some(f) => {
                if !valid_channel(f) {
                    return Err(ConfigError::invalid(
                        key("fallback_channel"),
                        format!(
                            "`{f}` is not a channel name: 1-200 bytes of [A-Za-z0-9_.:@=/-] (no templates)"
                        ),
                    ));
                }
                f.clone()
            }
            // Source names are valid channel names (checked by the registry).
            None => cfg.name.clone(),
        };
        let channel = cfg
            .channel
            .as_deref()
            .map(|t| Template::parse(t).map_err(|e| ConfigError::invalid(key("channel"), e)))
            .transpose()?;
        let mut rules = Vec::with_capacity(cfg.routes.len());
        for (r, route) in cfg.routes.iter().enumerate() {
            if route.types.is_empty() {
                return Err(ConfigError::invalid(
                    key(&format!("routes[{r}].types")),
                    "list at least one event type or glob (e.g. \"invoice.*\", or \"*\" for all)",
                ));
            }
            if route.channels.is_empty() {
                return Err(ConfigError::invalid(
                    key(&format!("routes[{r}].channels")),
                    "list at least one channel",
                ));
            }
            if let Some(t) = route.types.iter().find(|t| t.is_empty()) {
                return Err(ConfigError::invalid(
                    key(&format!("routes[{r}].types")),
                    format!("`{t}`: an empty type matches nothing"),
                ));
            }
            let channels = route
                .channels
                .iter()
                .enumerate()
                .map(|(c, t)| {
                    Template::parse(t).map_err(|e| {
                        ConfigError::invalid(key(&format!("routes[{r}].channels[{c}]")), e)
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            rules.push(Rule {
                types: route.types.clone(),
                channels,
            });
        }
        Ok(Routes {
            rules,
            channel,
            fallback,
        })
    }

    pub fn fallback(&self) -> &str {
        &self.fallback
    }

    /// The channels of one event: the first rule whose types match, else the
    /// source's `channel`, else the fallback. Never empty.
    pub fn route(&self, kind: &str, body: &Value, headers: &HeaderMap) -> Vec<String> {
        let templates: &[Template] = match self
            .rules
            .iter()
            .find(|rule| rule.types.iter().any(|g| glob_match(g, kind)))
        {
            Some(rule) => &rule.channels,
            None => self.channel.as_slice(),
        };
        let mut out: Vec<String> = Vec::with_capacity(templates.len().max(1));
        for template in templates {
            let channel = template
                .render(body, headers)
                .unwrap_or_else(|| self.fallback.clone());
            if !out.contains(&channel) {
                out.push(channel);
            }
        }
        if out.is_empty() {
            out.push(self.fallback.clone());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;
    use serde_json::json;

    fn source(channel: Option<&str>, routes: Vec<(Vec<&str>, Vec<&str>)>) -> SourceConfig {
        SourceConfig {
            name: "stripe".into(),
            kind: "stripe".into(),
            channel: channel.map(str::to_string),
            fallback_channel: Some("stripe".into()),
            routes: routes
                .into_iter()
                .map(|(t, c)| RouteConfig {
                    types: t.into_iter().map(str::to_string).collect(),
                    channels: c.into_iter().map(str::to_string).collect(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn templates_render_strings_and_numbers_and_fall_back_otherwise() {
        let t = Template::parse("user:{data.object.metadata.user_id}").unwrap();
        let h = HeaderMap::new();
        let body = |v: Value| json!({"data": {"object": {"metadata": {"user_id": v}}}});
        assert_eq!(t.render(&body(json!("42")), &h).as_deref(), Some("user:42"));
        assert_eq!(t.render(&body(json!(42)), &h).as_deref(), Some("user:42"));
        assert_eq!(t.render(&body(json!("")), &h), None, "never `user:`");
        assert_eq!(t.render(&body(json!(null)), &h), None);
        assert_eq!(t.render(&body(json!({"a": 1})), &h), None);
        assert_eq!(t.render(&body(json!(true)), &h), None);
        assert_eq!(t.render(&body(json!("a b")), &h), None, "invalid channel");
        assert_eq!(t.render(&body(json!("x".repeat(300))), &h), None);
        assert_eq!(t.render(&json!({}), &h), None);
        assert_eq!(t.render(&json!([1, 2]), &h), None);
        let items = Template::parse("item:{items.1.id}").unwrap();
        assert_eq!(
            items
                .render(&json!({"items": [{"id": "a"}, {"id": "b"}]}), &h)
                .as_deref(),
            Some("item:b")
        );
    }

    #[test]
    fn templates_read_headers() {
        let t = Template::parse("shop:{headers.x-shopify-shop-domain}").unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(t.render(&json!({}), &h), None);
        h.insert(
            "x-shopify-shop-domain",
            "demo.myshopify.com".parse().unwrap(),
        );
        assert_eq!(
            t.render(&json!({}), &h).as_deref(),
            Some("shop:demo.myshopify.com")
        );
    }

    #[test]
    fn template_errors_are_found_at_load() {
        for bad in [
            "user:{",
            "user:}",
            "user:{}",
            "user:{a..b}",
            "user {id}",
            "user:{id}{",
            "",
            "{headers.bad header}",
            "ü:{id}",
        ] {
            assert!(Template::parse(bad).is_err(), "{bad:?} should not parse");
        }
        for good in ["stripe", "user:{id}", "{a}:{b.c}", "{headers.x-a}/x"] {
            assert!(Template::parse(good).is_ok(), "{good:?} should parse");
        }
        let mut cfg = source(Some("user:{id"), vec![]);
        let e = Routes::from_config(&cfg, 3).unwrap_err().to_string();
        assert!(e.contains("sources[3].channel"), "{e}");
        cfg.channel = None;
        cfg.routes = vec![RouteConfig {
            types: vec!["invoice.*".into()],
            channels: vec!["ok".into(), "bad channel".into()],
        }];
        let e = Routes::from_config(&cfg, 0).unwrap_err().to_string();
        assert!(e.contains("sources[0].routes[0].channels[1]"), "{e}");
        cfg.routes[0].channels = vec![];
        let e = Routes::from_config(&cfg, 0).unwrap_err().to_string();
        assert!(e.contains("sources[0].routes[0].channels"), "{e}");
        cfg.routes.clear();
        cfg.fallback_channel = Some("user:{id}".into());
        let e = Routes::from_config(&cfg, 1).unwrap_err().to_string();
        assert!(e.contains("sources[1].fallback_channel"), "{e}");
    }

    #[test]
    fn rules_first_then_channel_then_fallback() {
        let routes = Routes::from_config(
            &source(
                Some("user:{data.object.metadata.user_id}"),
                vec![(
                    vec!["invoice.*", "customer.subscription.*"],
                    vec!["billing:{data.object.customer}", "billing"],
                )],
            ),
            0,
        )
        .unwrap();
        let h = HeaderMap::new();
        let body = json!({"data": {"object": {"customer": "cus_1", "metadata": {"user_id": "7"}}}});
        assert_eq!(
            routes.route("invoice.paid", &body, &h),
            vec!["billing:cus_1", "billing"]
        );
        assert_eq!(
            routes.route("customer.subscription.updated", &body, &h),
            vec!["billing:cus_1", "billing"]
        );
        assert_eq!(
            routes.route("payment_intent.succeeded", &body, &h),
            vec!["user:7"]
        );
        assert_eq!(
            routes.route("payment_intent.succeeded", &json!({}), &h),
            vec!["stripe"]
        );
        // Both templates fall back: the fallback channel once.
        let routes =
            Routes::from_config(&source(None, vec![(vec!["*"], vec!["a:{x}", "b:{y}"])]), 0)
                .unwrap();
        assert_eq!(routes.route("t", &json!({}), &h), vec!["stripe"]);
        let routes = Routes::from_config(&source(None, vec![]), 0).unwrap();
        assert_eq!(routes.route("t", &json!({}), &h), vec!["stripe"]);
    }

    #[test]
    fn globs() {
        assert!(glob_match("invoice.*", "invoice.paid"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("*.paid", "invoice.paid"));
        assert!(glob_match("a*b*c", "a-x-b-y-c"));
        assert!(glob_match("push", "push"));
        assert!(!glob_match("push", "pushed"));
        assert!(!glob_match("invoice.*", "invoices.paid"));
        assert!(!glob_match("a*b", "a-x-c"));
    }
}
