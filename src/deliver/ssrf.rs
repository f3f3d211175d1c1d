//! Which addresses an outbound webhook may reach (SSRF guard).
//!
//! Owns the address policy and the DNS resolver the delivery client uses.
//! Invariants:
//! - every address is classified on its canonical form, so an IPv4 address
//!   hidden in IPv6 (`::ffff:10.0.0.1`, NAT64, 6to4, IPv4-compatible) is
//!   refused like the address itself; IPv4-mapped addresses are refused
//!   outright;
//! - names are checked on the addresses they resolve to, and the resolver
//!   hands the HTTP client only the addresses that passed: the connection
//!   goes to a checked address, so a second lookup (DNS rebinding) cannot
//!   change where it lands;
//! - literal addresses never reach the resolver, so the caller checks them
//!   with [`TargetPolicy::check_url`] before sending;
//! - `allow_targets` CIDRs win over every refusal; `allow_private_targets`
//!   lifts the guard entirely (development).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use hickory_resolver::TokioResolver;
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use tokio::sync::OnceCell;
use url::Url;

use crate::config::DeliveryConfig;

/// Why a target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "{0} is a {1} address; outbound webhooks may not target it (allow it with delivery.allow_targets)"
    )]
    Address(IpAddr, &'static str),
    #[error(
        "`{host}` resolves only to refused addresses ({}); outbound webhooks may not target it (allow it with delivery.allow_targets)",
        .refused.iter().map(|(ip, class)| format!("{ip}: {class}")).collect::<Vec<_>>().join(", ")
    )]
    Name {
        host: String,
        refused: Vec<(IpAddr, &'static str)>,
    },
}

#[derive(Debug, Clone)]
pub struct TargetPolicy {
    allow_private: bool,
    allow: Vec<IpNet>,
}

impl TargetPolicy {
    pub fn new(config: &DeliveryConfig) -> TargetPolicy {
        TargetPolicy {
            allow_private: config.allow_private_targets,
            // `Config::load` has validated every CIDR.
            allow: config
                .allow_targets
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect(),
        }
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        if self.allow_private {
            return Ok(());
        }
        let canonical = ip.to_canonical();
        if self
            .allow
            .iter()
            .any(|net| net.contains(&ip) || net.contains(&canonical))
        {
            return Ok(());
        }
        match classify(ip) {
            Some(class) => Err(Refusal::Address(ip, class)),
            None => Ok(()),
        }
    }

    /// Checks a URL whose host is a literal address; names pass here and are
    /// checked by the resolver when they are looked up.
    pub fn check_url(&self, url: &Url) -> Result<(), Refusal> {
        match url.host() {
            Some(url::Host::Ipv4(v4)) => self.check(IpAddr::V4(v4)),
            Some(url::Host::Ipv6(v6)) => self.check(IpAddr::V6(v6)),
            _ => Ok(()),
        }
    }
}

/// The class of an address that outbound webhooks must not reach, or `None`
/// for a globally routable one.
pub fn classify(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u8) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> Option<&'static str> {
    const RANGES: &[([u8; 4], u8, &str)] = &[
        ([0, 0, 0, 0], 8, "\"this network\" (0.0.0.0/8)"),
        ([10, 0, 0, 0], 8, "private (10.0.0.0/8)"),
        (
            [100, 64, 0, 0],
            10,
            "shared/carrier-grade NAT (100.64.0.0/10)",
        ),
        ([127, 0, 0, 0], 8, "loopback (127.0.0.0/8)"),
        ([169, 254, 0, 0], 16, "link-local (169.254.0.0/16)"),
        ([172, 16, 0, 0], 12, "private (172.16.0.0/12)"),
        (
            [192, 0, 0, 0],
            24,
            "IETF protocol assignment (192.0.0.0/24)",
        ),
        ([192, 0, 2, 0], 24, "documentation (192.0.2.0/24)"),
        ([192, 88, 99, 0], 24, "6to4 relay anycast (192.88.99.0/24)"),
        ([192, 168, 0, 0], 16, "private (192.168.0.0/16)"),
        ([198, 18, 0, 0], 15, "benchmarking (198.18.0.0/15)"),
        ([198, 51, 100, 0], 24, "documentation (198.51.100.0/24)"),
        ([203, 0, 113, 0], 24, "documentation (203.0.113.0/24)"),
        ([224, 0, 0, 0], 4, "multicast (224.0.0.0/4)"),
        ([240, 0, 0, 0], 4, "reserved (240.0.0.0/4)"),
    ];
    RANGES
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map(|(_, _, class)| *class)
}

fn classify_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified (::)");
    }
    if ip.is_loopback() {
        return Some("loopback (::1)");
    }
    if ip.to_ipv4_mapped().is_some() {
        return Some("IPv4-mapped IPv6 (::ffff:0:0/96)");
    }
    if s[0..6] == [0; 6] {
        return Some("IPv4-compatible IPv6 (::/96)");
    }
    if s[0..6] == [0x64, 0xff9b, 0, 0, 0, 0] || s[0..3] == [0x64, 0xff9b, 1] {
        return Some("NAT64 (64:ff9b::/96, 64:ff9b:1::/48)");
    }
    if s[0..4] == [0x100, 0, 0, 0] {
        return Some("discard-only (100::/64)");
    }
    if s[0] == 0x2001 && s[1] == 0 {
        return Some("Teredo (2001::/32)");
    }
    if s[0] == 0x2001 && s[1] == 0xdb8 {
        return Some("documentation (2001:db8::/32)");
    }
    if s[0] == 0x2002 {
        // 6to4 embeds an IPv4 address in bits 16..48.
        let v4 = Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
        if classify_v4(v4).is_some() {
            return Some("6to4 (2002::/16) around a refused IPv4 address");
        }
    }
    if s[0] & 0xfe00 == 0xfc00 {
        return Some("unique-local (fc00::/7)");
    }
    if s[0] & 0xffc0 == 0xfe80 {
        return Some("link-local (fe80::/10)");
    }
    if s[0] & 0xffc0 == 0xfec0 {
        return Some("site-local (fec0::/10)");
    }
    if s[0] & 0xff00 == 0xff00 {
        return Some("multicast (ff00::/8)");
    }
    None
}

/// A reqwest resolver that looks names up with hickory and keeps only the
/// addresses the policy allows. reqwest connects to exactly what it returns.
#[derive(Clone)]
pub struct GuardedResolver {
    policy: Arc<TargetPolicy>,
    /// Built on first use: reading the system's resolver configuration
    /// fails on machines without one, and that must not stop start-up.
    resolver: Arc<OnceCell<TokioResolver>>,
}

impl GuardedResolver {
    pub fn new(policy: Arc<TargetPolicy>) -> GuardedResolver {
        GuardedResolver {
            policy,
            resolver: Arc::new(OnceCell::new()),
        }
    }

    async fn lookup(
        &self,
        host: &str,
    ) -> Result<Vec<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
        let resolver = self
            .resolver
            .get_or_try_init(|| async {
                TokioResolver::builder_tokio().map(|mut b| {
                    b.options_mut().ip_strategy =
                        hickory_resolver::config::LookupIpStrategy::Ipv4AndIpv6;
                    b.build()
                })
            })
            .await?;
        let lookup = resolver.lookup_ip(host).await?;
        let mut allowed = Vec::new();
        let mut refused = Vec::new();
        for ip in lookup.iter() {
            match self.policy.check(ip) {
                Ok(()) => allowed.push(SocketAddr::new(ip, 0)),
                Err(Refusal::Address(ip, class)) => refused.push((ip, class)),
                Err(Refusal::Name { .. }) => unreachable!("check refuses addresses only"),
            }
        }
        if allowed.is_empty() && !refused.is_empty() {
            return Err(Box::new(Refusal::Name {
                host: host.to_string(),
                refused,
            }));
        }
        Ok(allowed)
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let this = self.clone();
        Box::pin(async move {
            let addrs = this.lookup(name.as_str()).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Finds a [`Refusal`] in an error's source chain (reqwest wraps resolver errors).
pub fn find_refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(r) = err.downcast_ref::<Refusal>() {
            return Some(r);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow_private: bool, allow: &[&str]) -> TargetPolicy {
        TargetPolicy::new(&DeliveryConfig {
            allow_private_targets: allow_private,
            allow_targets: allow.iter().map(|s| s.to_string()).collect(),
            ..DeliveryConfig::default()
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_refused_range_is_refused() {
        let p = policy(false, &[]);
        for addr in [
            "0.0.0.0",
            "0.1.2.3",
            "10.0.0.1",
            "10.255.255.255",
            "100.64.0.1",
            "100.127.255.254",
            "127.0.0.1",
            "127.0.0.2",
            "127.255.255.254",
            "169.254.169.254",
            "172.16.0.1",
            "172.31.255.255",
            "192.0.0.8",
            "192.0.2.1",
            "192.88.99.1",
            "192.168.1.1",
            "198.18.0.1",
            "198.19.255.255",
            "198.51.100.7",
            "203.0.113.9",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "::ffff:8.8.8.8",
            "::10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "100::1",
            "2001::1",
            "2001:db8::1",
            "2002:a00:1::1",
            "2002:7f00:1::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "ff0e::1",
        ] {
            let err = p.check(ip(addr)).expect_err(addr);
            assert!(err.to_string().contains("may not target"), "{addr}: {err}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        let p = policy(false, &[]);
        for addr in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "169.253.0.1",
            "192.169.0.1",
            "11.0.0.1",
            "2606:4700::1111",
            "2a00:1450::1",
            "2002:808:808::1",
        ] {
            assert_eq!(p.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn allow_targets_and_allow_private_lift_the_guard() {
        let p = policy(false, &["127.0.0.2/32", "fd00::/8"]);
        assert_eq!(p.check(ip("127.0.0.2")), Ok(()));
        assert_eq!(
            p.check(ip("::ffff:127.0.0.2")),
            Ok(()),
            "mapped form of an allowed address"
        );
        assert_eq!(p.check(ip("fd00::5")), Ok(()));
        assert!(
            p.check(ip("127.0.0.1")).is_err(),
            "positive control: the neighbour is refused"
        );
        assert!(p.check(ip("fc00::1")).is_err());
        let open = policy(true, &[]);
        for addr in ["127.0.0.1", "10.0.0.1", "::1", "fe80::1", "::ffff:10.0.0.1"] {
            assert_eq!(open.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn literal_urls_are_checked_names_are_left_to_the_resolver() {
        let p = policy(false, &[]);
        let check = |u: &str| p.check_url(&Url::parse(u).unwrap());
        assert!(check("http://127.0.0.1:8080/hook").is_err());
        assert!(check("http://[::1]/hook").is_err());
        assert!(check("http://[::ffff:127.0.0.1]/hook").is_err());
        assert!(check("http://[fe80::1]/hook").is_err());
        assert!(check("http://169.254.169.254/latest/meta-data").is_err());
        // The URL parser turns these spellings into 127.0.0.1 and 10.0.0.1.
        assert!(check("http://2130706433/").is_err());
        assert!(check("http://0x7f.1/").is_err());
        assert!(check("http://012.0.0.1/").is_err());
        assert_eq!(check("http://8.8.8.8/hook"), Ok(()));
        assert_eq!(check("https://example.com/hook"), Ok(()));
    }
}
