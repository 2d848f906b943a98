//! Server names (SNI, RFC 6066 section 3) as certificates and configurations write them:
//! exact DNS names, and `*.example.org` wildcards that stand for exactly one whole label
//! (RFC 6125 section 6.4.3). Pure.

use std::collections::HashMap;
use std::net::IpAddr;

/// Whether `name` is a server name a configuration may give: a DNS name of letters, digits
/// and `-` in labels of 1 to 63 characters (at most 253 in all), not an IP address, or
/// `*.` followed by such a name of at least two labels. Case is not checked (names are
/// compared lowercase).
pub fn is_server_name(name: &str) -> bool {
    let host = name.strip_prefix("*.").unwrap_or(name);
    let label = |l: &str| {
        (1..=63).contains(&l.len())
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.len() <= 253
        && host.split('.').all(label)
        && host.parse::<IpAddr>().is_err()
        && (host.contains('.') || !name.starts_with("*."))
}

/// Whether a certificate name (`www.example.org`, `*.example.org`) covers the configured SNI
/// name (lowercase; a wildcard entry must be covered by the same wildcard): RFC 6125 6.4.3,
/// a wildcard stands for exactly one whole label.
pub fn covers(certificate_name: &str, name: &str) -> bool {
    if certificate_name.eq_ignore_ascii_case(name) {
        return true;
    }
    match (certificate_name.strip_prefix("*."), name.split_once('.')) {
        (Some(suffix), Some((label, rest))) => {
            !label.is_empty() && label != "*" && suffix.eq_ignore_ascii_case(rest)
        }
        _ => false,
    }
}

/// Values by server name: an exact name first, then a wildcard entry for the name's parent
/// (`*.example.org` for `www.example.org`, not for `a.www.example.org`), else none. Names
/// have no case. Immutable once built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByName<T> {
    /// Exact names, lowercase.
    exact: HashMap<String, T>,
    /// `*.example.org` entries, by `example.org`.
    wildcard: HashMap<String, T>,
}

impl<T> ByName<T> {
    /// The map of `entries` (`(name, value)`; a `*.` prefix makes a wildcard entry). A name
    /// given twice keeps its first value.
    pub fn new(entries: impl IntoIterator<Item = (String, T)>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (name, value) in entries {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => wildcard.entry(parent.to_owned()).or_insert(value),
                None => exact.entry(name).or_insert(value),
            };
        }
        ByName { exact, wildcard }
    }

    /// The value for server name `name` (as a client sent it, any case), if any.
    pub fn get(&self, name: &str) -> Option<&T> {
        let name = name.to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return Some(found);
        }
        let parent = name.split_once('.').map(|(_, parent)| parent)?;
        self.wildcard.get(parent)
    }

    /// Whether it has no entry.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_stand_for_one_label() {
        assert!(covers("www.example.org", "www.example.org"));
        assert!(covers("WWW.example.org", "www.example.org"));
        assert!(covers("*.example.org", "a.example.org"));
        assert!(covers("*.example.org", "*.example.org"));
        assert!(!covers("*.example.org", "a.b.example.org"));
        assert!(!covers("*.example.org", "example.org"));
        assert!(!covers("www.example.org", "*.example.org"));
    }

    #[test]
    fn exact_names_come_first_then_one_label_wildcards() {
        let map = ByName::new([
            ("a.example.org".to_owned(), 1),
            ("*.example.org".to_owned(), 2),
            ("A.example.org".to_owned(), 3),
        ]);
        assert_eq!(map.get("a.example.org"), Some(&1));
        assert_eq!(map.get("A.EXAMPLE.ORG"), Some(&1), "no case; the first entry stays");
        assert_eq!(map.get("b.example.org"), Some(&2));
        assert_eq!(map.get("x.b.example.org"), None, "one label only");
        assert_eq!(map.get("example.org"), None);
        assert_eq!(map.get(""), None);
        assert!(!map.is_empty() && ByName::<u8>::new([]).is_empty());
    }

    #[test]
    fn server_names_are_dns_names_or_wildcards() {
        for good in ["localhost", "www.example.org", "*.example.org", "a-b.c1"] {
            assert!(is_server_name(good), "{good}");
        }
        for bad in ["", "*.org", "127.0.0.1", "a..b", "-a.b", "a_b.c", "*", "a.*.b", "x.*"] {
            assert!(!is_server_name(bad), "{bad}");
        }
    }
}
