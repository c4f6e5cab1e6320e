//! Server discovery: from a server name to the host and port to connect to, the `Host` header
//! and the name the TLS certificate must be valid for.
//!
//! The pure steps (IP literals, explicit ports, the `m.server` of `.well-known/matrix/server`,
//! SRV answers) live here as functions; the lookups that feed them (HTTP, DNS) live in
//! [`crate::Client`].
//!
//! [Resolving server names](https://spec.matrix.org/v1.16/server-server-api/#resolving-server-names)

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ruma::ServerName;

/// The default federation port.
pub const DEFAULT_PORT: u16 = 8448;

/// Where to send a request for a server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Destination {
    /// The host to connect to: an IP literal or a name to resolve (A/AAAA).
    pub connect_host: String,
    /// The port to connect to.
    pub port: u16,
    /// The `Host` header of requests.
    pub host_header: String,
    /// The name the TLS certificate must be valid for (and the SNI name); an IP literal when
    /// the server is addressed by IP.
    pub tls_name: String,
}

/// A host: an IP literal or a DNS name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// An IP literal (`[...]` stripped for IPv6).
    Ip(IpAddr),
    /// A DNS name.
    Name(String),
}

/// Splits `host[:port]` (with `[v6]` literals) into host and port.
pub fn split_host_port(text: &str) -> Option<(Host, Option<u16>)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        let address: Ipv6Addr = literal.parse().ok()?;
        let port = match after {
            "" => None,
            after => Some(after.strip_prefix(':')?.parse().ok()?),
        };
        return Some((Host::Ip(IpAddr::V6(address)), port));
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port.parse::<u16>().ok()?)),
            None => (text, None),
        }
    };
    if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.') {
        return None;
    }
    let host = match host.parse::<Ipv4Addr>() {
        Ok(address) => Host::Ip(IpAddr::V4(address)),
        Err(_) => Host::Name(host.to_ascii_lowercase()),
    };
    Some((host, port))
}

fn host_text(host: &Host) -> String {
    match host {
        Host::Ip(IpAddr::V6(address)) => format!("[{address}]"),
        Host::Ip(address) => address.to_string(),
        Host::Name(name) => name.clone(),
    }
}

fn connect_text(host: &Host) -> String {
    match host {
        Host::Ip(address) => address.to_string(),
        Host::Name(name) => name.clone(),
    }
}

/// Steps 1 and 2: an IP literal, or a name with an explicit port, is contacted directly.
/// `None` means the name needs `.well-known` and SRV lookups.
pub fn direct_destination(server_name: &ServerName) -> Option<Destination> {
    let (host, port) = split_host_port(server_name.as_str())?;
    match (&host, port) {
        (Host::Ip(_), _) | (Host::Name(_), Some(_)) => Some(Destination {
            connect_host: connect_text(&host),
            port: port.unwrap_or(DEFAULT_PORT),
            host_header: server_name.to_string(),
            tls_name: connect_text(&host),
        }),
        (Host::Name(_), None) => None,
    }
}

/// The `m.server` of a `.well-known/matrix/server` body, if the body is valid: a JSON object
/// whose `m.server` is `host[:port]`. Anything else counts as an error (spec step 4).
pub fn parse_well_known(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let server = value.as_object()?.get("m.server")?.as_str()?;
    split_host_port(server)?;
    Some(server.to_owned())
}

/// Steps 3.1 and 3.2: a delegated IP literal or a delegated name with a port is contacted
/// directly. `Ok(None)` means SRV lookups for the delegated name come next.
pub fn delegated_destination(delegated: &str) -> Option<Result<Destination, String>> {
    let Some((host, port)) = split_host_port(delegated) else {
        return Some(Err(format!("invalid m.server {delegated:?}")));
    };
    match (&host, port) {
        (Host::Ip(_), _) | (Host::Name(_), Some(_)) => Some(Ok(Destination {
            connect_host: connect_text(&host),
            port: port.unwrap_or(DEFAULT_PORT),
            host_header: delegated.to_owned(),
            tls_name: connect_text(&host),
        })),
        (Host::Name(_), None) => None,
    }
}

/// A destination found by SRV (`target:port`) for `hostname`: the certificate and `Host`
/// header stay those of `hostname`.
pub fn srv_destination(hostname: &str, target: &str, port: u16) -> Destination {
    Destination {
        connect_host: target.trim_end_matches('.').to_ascii_lowercase(),
        port,
        host_header: hostname.to_owned(),
        tls_name: hostname.to_owned(),
    }
}

/// The last step: the name itself on port 8448.
pub fn fallback_destination(hostname: &str) -> Destination {
    Destination {
        connect_host: hostname.to_owned(),
        port: DEFAULT_PORT,
        host_header: hostname.to_owned(),
        tls_name: hostname.to_owned(),
    }
}

/// The SRV names to try for a hostname, in order: `_matrix-fed._tcp` then the deprecated
/// `_matrix._tcp`.
pub fn srv_names(hostname: &str) -> [String; 2] {
    [format!("_matrix-fed._tcp.{hostname}."), format!("_matrix._tcp.{hostname}.")]
}

/// How long a `.well-known` answer is cached: its `Cache-Control: max-age`, else 24 hours,
/// never more than 48 hours.
pub fn well_known_cache_duration(cache_control: Option<&str>) -> Duration {
    const DEFAULT: Duration = Duration::from_secs(24 * 3600);
    const MAX: Duration = Duration::from_secs(48 * 3600);
    let Some(cache_control) = cache_control else { return DEFAULT };
    for directive in cache_control.split(',') {
        let directive = directive.trim().to_ascii_lowercase();
        if directive == "no-store" || directive == "no-cache" {
            return Duration::ZERO;
        }
        if let Some(seconds) = directive.strip_prefix("max-age=")
            && let Ok(seconds) = seconds.trim_matches('"').parse::<u64>()
        {
            return Duration::from_secs(seconds).min(MAX);
        }
    }
    DEFAULT
}

/// How long a failed `.well-known` lookup is remembered.
pub const WELL_KNOWN_ERROR_CACHE: Duration = Duration::from_secs(3600);

/// Whether an address is one a federation peer must not resolve to unless private addresses
/// are allowed: loopback, private, link-local, unspecified, shared (CGNAT), multicast,
/// broadcast, documentation and unique-local ranges.
pub fn is_non_public(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(address) => {
            let [a, b, ..] = address.octets();
            address.is_loopback()
                || address.is_private()
                || address.is_link_local()
                || address.is_unspecified()
                || address.is_broadcast()
                || address.is_multicast()
                || address.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (b == 18 || b == 19))
                || a >= 240
        }
        IpAddr::V6(address) => {
            if let Some(mapped) = address.to_ipv4_mapped() {
                return is_non_public(IpAddr::V4(mapped));
            }
            let first = address.segments()[0];
            address.is_loopback()
                || address.is_unspecified()
                || address.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && address.segments()[1] == 0x0db8
        }
    }
}

/// Wraps a host for a URL: IPv6 literals in brackets.
pub fn url_host(host: &str) -> String {
    match host.parse::<Ipv6Addr>() {
        Ok(_) => format!("[{host}]"),
        Err(_) => host.to_owned(),
    }
}

/// `host_text` for callers that hold a [`Host`].
pub fn display_host(host: &Host) -> String {
    host_text(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(server_name: &str, expected: Option<(&str, u16, &str, &str)>) {
        let name = ServerName::parse(server_name).unwrap();
        let found = direct_destination(&name);
        let expected = expected.map(|(connect_host, port, host_header, tls_name)| Destination {
            connect_host: connect_host.into(),
            port,
            host_header: host_header.into(),
            tls_name: tls_name.into(),
        });
        assert_eq!(found, expected, "{server_name}");
    }

    #[test]
    fn ip_literals_and_explicit_ports_are_direct() {
        check("127.0.0.2:8481", Some(("127.0.0.2", 8481, "127.0.0.2:8481", "127.0.0.2")));
        check("10.1.2.3", Some(("10.1.2.3", 8448, "10.1.2.3", "10.1.2.3")));
        check("[::1]:9000", Some(("::1", 9000, "[::1]:9000", "::1")));
        check("[2001:db8::1]", Some(("2001:db8::1", 8448, "[2001:db8::1]", "2001:db8::1")));
        check("hs2.test:8448", Some(("hs2.test", 8448, "hs2.test:8448", "hs2.test")));
        check("Example.ORG:443", Some(("example.org", 443, "Example.ORG:443", "example.org")));
        check("example.org", None);
        check("matrix.example.org", None);
    }

    #[test]
    fn well_known_bodies_follow_the_error_rules() {
        assert_eq!(
            parse_well_known(br#"{"m.server": "m.example.org:443"}"#).as_deref(),
            Some("m.example.org:443")
        );
        assert_eq!(
            parse_well_known(br#"{"m.server": "m.example.org"}"#).as_deref(),
            Some("m.example.org")
        );
        for bad in [
            &b"not json"[..],
            b"[]",
            b"{}",
            br#"{"m.server": 5}"#,
            br#"{"m.server": "bad host!"}"#,
            br#"{"m.server": "a.org:99999"}"#,
        ] {
            assert_eq!(parse_well_known(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn delegation_keeps_the_delegated_name_for_tls_and_host() {
        assert_eq!(
            delegated_destination("m.example.org:443"),
            Some(Ok(Destination {
                connect_host: "m.example.org".into(),
                port: 443,
                host_header: "m.example.org:443".into(),
                tls_name: "m.example.org".into()
            }))
        );
        assert_eq!(
            delegated_destination("192.0.2.7"),
            Some(Ok(Destination {
                connect_host: "192.0.2.7".into(),
                port: 8448,
                host_header: "192.0.2.7".into(),
                tls_name: "192.0.2.7".into()
            }))
        );
        assert_eq!(delegated_destination("m.example.org"), None);
        assert!(matches!(delegated_destination("bad name!"), Some(Err(_))));
        let srv = srv_destination("m.example.org", "fed.example.net.", 8000);
        assert_eq!(srv.connect_host, "fed.example.net");
        assert_eq!(
            (srv.port, srv.host_header.as_str(), srv.tls_name.as_str()),
            (8000, "m.example.org", "m.example.org")
        );
        assert_eq!(fallback_destination("example.org").port, 8448);
        assert_eq!(
            srv_names("example.org"),
            ["_matrix-fed._tcp.example.org.".to_owned(), "_matrix._tcp.example.org.".to_owned()]
        );
    }

    #[test]
    fn cache_control_bounds_the_well_known_cache() {
        let hours = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(well_known_cache_duration(None), hours(24));
        assert_eq!(well_known_cache_duration(Some("public, max-age=60")), Duration::from_secs(60));
        assert_eq!(well_known_cache_duration(Some("max-age=999999999")), hours(48));
        assert_eq!(well_known_cache_duration(Some("no-store")), Duration::ZERO);
        assert_eq!(well_known_cache_duration(Some("private")), hours(24));
    }

    #[test]
    fn private_ranges_are_recognised() {
        for address in [
            "127.0.0.2",
            "10.0.0.1",
            "172.16.5.5",
            "192.168.1.1",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::",
        ] {
            assert!(is_non_public(address.parse().unwrap()), "{address}");
        }
        for address in ["1.1.1.1", "93.184.216.34", "2606:4700::1111", "172.32.0.1"] {
            assert!(!is_non_public(address.parse().unwrap()), "{address}");
        }
    }
}
