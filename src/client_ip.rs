//! The client's address as the agent should believe it: the TCP peer, or, when the peer is a
//! trusted proxy, the address that proxy reported in `X-Forwarded-For`.
//!
//! Walks the `X-Forwarded-For` chain from the right (the entry the nearest proxy appended) and
//! stops at the first address that is not a trusted proxy, as nginx's `real_ip_recursive on`
//! does. Entries left of that were written by the client or by an untrusted hop and prove
//! nothing. With no trusted proxies (the default) the header is never read.

use serde::{de, Deserialize, Deserializer};
use std::net::IpAddr;

/// An address block: `10.0.0.0/8`, `::1/128`, or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `IP` or `IP/prefix`.
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR block"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{s}`: the prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Is `ip` inside this block?
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// The `trusted_proxies` list (empty by default: `X-Forwarded-For` is not believed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<Cidr>);

impl<'de> Deserialize<'de> for TrustedProxies {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let list = Vec::<String>::deserialize(d)?;
        list.iter()
            .map(|s| Cidr::parse(s).map_err(de::Error::custom))
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }
}

impl TrustedProxies {
    /// No proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client address for a request from `peer` carrying these `X-Forwarded-For` values.
    pub fn client_ip<'h>(
        &self,
        peer: Option<IpAddr>,
        xff: impl DoubleEndedIterator<Item = &'h http::HeaderValue>,
    ) -> Option<IpAddr> {
        let peer = peer?.to_canonical();
        if self.is_empty() || !self.trusts(peer) {
            return Some(peer);
        }
        let mut client = peer;
        // Later header lines were appended later: walk them, and each line's entries, backwards.
        for value in xff.rev() {
            let Ok(line) = value.to_str() else {
                return Some(client);
            };
            for entry in line.rsplit(',') {
                let entry = entry.trim();
                if entry.is_empty() {
                    continue;
                }
                match parse_forwarded_ip(entry) {
                    Some(ip) => {
                        client = ip;
                        if !self.trusts(ip) {
                            return Some(ip);
                        }
                    }
                    // Garbage in the chain: stop believing it at this point.
                    None => return Some(client),
                }
            }
        }
        Some(client)
    }
}

/// An `X-Forwarded-For` entry: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:80`.
fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    if let Ok(ip) = entry.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    entry
        .parse::<std::net::SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

/// The client address of a request (see the module documentation).
pub fn of_request(
    trusted: &TrustedProxies,
    peer: Option<IpAddr>,
    req: &pingora::http::RequestHeader,
) -> Option<IpAddr> {
    if trusted.is_empty() {
        return peer.map(|p| p.to_canonical());
    }
    trusted.client_ip(peer, req.headers.get_all("x-forwarded-for").iter())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies(list.iter().map(|s| Cidr::parse(s).unwrap()).collect())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(values: &[&str]) -> Vec<http::HeaderValue> {
        values
            .iter()
            .map(|v| http::HeaderValue::from_str(v).unwrap())
            .collect()
    }

    #[test]
    fn cidr_parsing_and_membership() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains(ip("10.200.1.1")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(!Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.2")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(!Cidr::parse("fd00::/8").unwrap().contains(ip("10.0.0.1")));
        // An IPv4-mapped peer address is the IPv4 address.
        assert!(c.contains(ip("::ffff:10.1.2.3")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("example.com").is_err());
    }

    #[test]
    fn untrusted_peer_is_the_client_whatever_it_claims() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = xff(&["1.2.3.4"]);
        assert_eq!(
            t.client_ip(Some(ip("192.0.2.9")), h.iter()),
            Some(ip("192.0.2.9"))
        );
        let none = TrustedProxies::default();
        assert_eq!(
            none.client_ip(Some(ip("10.0.0.1")), h.iter()),
            Some(ip("10.0.0.1"))
        );
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        let t = trusted(&["10.0.0.0/8", "127.0.0.1"]);
        // client spoofs 6.6.6.6; a real client 203.0.113.7 went through two trusted proxies.
        let h = xff(&["6.6.6.6, 203.0.113.7", "10.1.1.1"]);
        assert_eq!(
            t.client_ip(Some(ip("127.0.0.1")), h.iter()),
            Some(ip("203.0.113.7"))
        );
        // Everything trusted: the leftmost address is as far as we can see.
        let h = xff(&["10.9.9.9, 10.1.1.1"]);
        assert_eq!(
            t.client_ip(Some(ip("127.0.0.1")), h.iter()),
            Some(ip("10.9.9.9"))
        );
        // No header: the peer.
        assert_eq!(
            t.client_ip(Some(ip("127.0.0.1")), std::iter::empty()),
            Some(ip("127.0.0.1"))
        );
        // Ports and brackets are accepted; garbage stops the walk.
        let h = xff(&["[2001:db8::1]:443"]);
        assert_eq!(
            t.client_ip(Some(ip("127.0.0.1")), h.iter()),
            Some(ip("2001:db8::1"))
        );
        let h = xff(&["203.0.113.7, junk"]);
        assert_eq!(
            t.client_ip(Some(ip("127.0.0.1")), h.iter()),
            Some(ip("127.0.0.1"))
        );
    }
}
