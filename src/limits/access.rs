//! Access lists: which client addresses a listener serves at all.
//!
//! Pure data, checked by the worker right after accept (or after the PROXY protocol header),
//! before any count is taken. The rule, as xinetd's `only_from` / `no_access`:
//! - the *most specific* matching prefix wins, from `allow` and `deny` together (a `/32` in
//!   `deny` beats a `/8` in `allow`, and the other way round);
//! - between an `allow` and a `deny` prefix of the same length, `deny` wins;
//! - an address no prefix matches is allowed when `allow` is empty, refused otherwise (a
//!   non-empty `allow` list means "only these");
//! - an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) is matched as the IPv4 address, so
//!   IPv4 rules cover IPv4 clients of a dual-stack listener or behind a PROXY protocol
//!   proxy; IPv6 prefixes never match it.

use std::net::IpAddr;

use ipnet::IpNet;

use super::unmap;

/// A listener's `allow` and `deny` prefixes. The default allows everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessList {
    /// `allow`: prefixes served; when not empty, every other address is refused.
    pub allow: Vec<IpNet>,
    /// `deny`: prefixes refused.
    pub deny: Vec<IpNet>,
    /// The `allow` rules in their order with the variables each gives the programs run for
    /// its clients (tcprules' `127.:allow,RELAYCLIENT=""`); empty unless a rule carries
    /// some. The first rule that matches a client decides, as in tcprules.
    pub env_rules: Vec<EnvRule>,
}

/// An `allow` rule and the environment it gives the programs run for its clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvRule {
    /// The rule's prefix.
    pub net: IpNet,
    /// `NAME`, `VALUE` pairs, possibly none.
    pub env: Vec<(String, String)>,
}

impl AccessList {
    /// Whether `ip` may connect, by the rule in the module documentation.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = unmap(ip);
        let longest = |list: &[IpNet]| {
            list.iter().filter(|net| net.contains(&ip)).map(IpNet::prefix_len).max()
        };
        match (longest(&self.allow), longest(&self.deny)) {
            (Some(allow), Some(deny)) => allow > deny,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => self.allow.is_empty(),
        }
    }

    /// Whether the list refuses nobody (the worker skips the check then).
    pub fn is_open(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// The variables of the first `allow` rule that matches `ip` (empty when that rule has
    /// none, or none matches).
    pub fn env_for(&self, ip: IpAddr) -> &[(String, String)] {
        let ip = unmap(ip);
        self.env_rules.iter().find(|rule| rule.net.contains(&ip)).map_or(&[], |r| &r.env)
    }
}

/// Whether `ip` (IPv4-mapped IPv6 taken as IPv4) is in one of `nets`.
pub fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = unmap(ip);
    nets.iter().any(|net| net.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(allow: &[&str], deny: &[&str]) -> AccessList {
        let nets = |l: &[&str]| l.iter().map(|n| n.parse().unwrap()).collect();
        AccessList { allow: nets(allow), deny: nets(deny), env_rules: Vec::new() }
    }

    #[test]
    fn the_first_matching_rule_gives_the_environment() {
        let rule = |net: &str, env: &[(&str, &str)]| EnvRule {
            net: net.parse().unwrap(),
            env: env.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
        };
        let mut access = list(&["127.0.0.0/8", "127.0.0.2/32"], &[]);
        access.env_rules = vec![
            rule("127.0.0.2/32", &[("RELAYCLIENT", "")]),
            rule("127.0.0.0/8", &[]),
            rule("127.0.0.3/32", &[("NEVER", "first one wins")]),
        ];
        assert_eq!(access.env_for(ip("127.0.0.2")), [("RELAYCLIENT".into(), String::new())]);
        assert_eq!(access.env_for(ip("::ffff:127.0.0.2")).len(), 1, "mapped IPv4");
        assert!(access.env_for(ip("127.0.0.3")).is_empty(), "the /8 comes first");
        assert!(access.env_for(ip("10.0.0.1")).is_empty());
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn the_most_specific_prefix_wins() {
        let deny_one = list(&["127.0.0.0/8"], &["127.0.0.2/32"]);
        assert!(deny_one.allows(ip("127.0.0.3")));
        assert!(!deny_one.allows(ip("127.0.0.2")), "the /32 deny beats the /8 allow");
        assert!(!deny_one.allows(ip("10.0.0.1")), "not in a non-empty allow list");
        let allow_one = list(&["127.0.0.5/32"], &["127.0.0.0/24"]);
        assert!(allow_one.allows(ip("127.0.0.5")), "the /32 allow beats the /24 deny");
        assert!(!allow_one.allows(ip("127.0.0.6")));
        assert!(list(&[], &["127.0.0.0/24"]).allows(ip("10.1.2.3")), "no allow list: open");
    }

    #[test]
    fn deny_wins_a_tie() {
        assert!(!list(&["127.0.0.0/24"], &["127.0.0.0/24"]).allows(ip("127.0.0.1")));
    }

    #[test]
    fn ipv4_mapped_addresses_match_ipv4_rules_only() {
        let rules = list(&[], &["192.0.2.0/24"]);
        assert!(!rules.allows(ip("::ffff:192.0.2.7")));
        assert!(rules.allows(ip("::ffff:198.51.100.7")));
        let v6_rule = list(&[], &["::ffff:0:0/96"]);
        assert!(v6_rule.allows(ip("::ffff:192.0.2.7")), "an IPv6 prefix never matches it");
        let v6 = list(&["2001:db8::/32"], &["2001:db8:bad::/48"]);
        assert!(v6.allows(ip("2001:db8:1::1")));
        assert!(!v6.allows(ip("2001:db8:bad::1")));
        assert!(!v6.allows(ip("::1")));
        assert!(contains(&["127.0.0.0/8".parse().unwrap()], ip("::ffff:127.0.0.1")));
    }
}
