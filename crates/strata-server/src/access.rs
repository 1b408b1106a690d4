//! Per-volume NBD access lists: checking a list's entries, and matching a client against
//! it. The list itself (`strata_types::AccessList`, stored in the catalog and in volume
//! records) is data; the rules are here. An empty list admits every client (what volumes
//! made before access lists had); a non-empty one admits a client whose verified
//! certificate subject it names, or whose address lies in one of its networks.

use crate::error::{ApiError, ApiResult};
use std::net::IpAddr;
use strata_nbd::Client;
use strata_types::AccessList;

/// Entries each of a list's two parts may hold (subjects; networks): every NBD open
/// scans them.
pub const ACCESS_ENTRIES_MAX: usize = 256;
/// The longest subject in characters (an X.509 CN is at most 64; some CAs go beyond).
const SUBJECT_CHARS_MAX: usize = 256;

/// Builds a list, checking every entry ([`check`]).
pub fn checked(allow: Vec<String>, allow_net: Vec<String>) -> ApiResult<AccessList> {
    let list = AccessList { allow, allow_net };
    check(&list)?;
    Ok(list)
}

/// Refuses malformed entries and lists beyond [`ACCESS_ENTRIES_MAX`].
pub fn check(list: &AccessList) -> ApiResult<()> {
    if list.allow.len() > ACCESS_ENTRIES_MAX || list.allow_net.len() > ACCESS_ENTRIES_MAX {
        return Err(ApiError::invalid(format!(
            "allow and allow_net hold at most {ACCESS_ENTRIES_MAX} entries each"
        )));
    }
    for subject in &list.allow {
        let chars = subject.chars().count();
        if chars == 0 || chars > SUBJECT_CHARS_MAX || subject.chars().any(char::is_control) {
            return Err(ApiError::invalid(format!(
                "allow {subject:?}: a certificate subject (CN) is 1 to \
                 {SUBJECT_CHARS_MAX} characters, none a control character"
            )));
        }
    }
    for net in &list.allow_net {
        Network::parse(net)?;
    }
    Ok(())
}

/// Whether `client` may open the exports of a volume with access list `list`.
pub fn admits(list: &AccessList, client: &Client) -> bool {
    if list.is_empty() {
        return true;
    }
    let by_subject = client.subject.as_ref().is_some_and(|s| list.allow.contains(s));
    by_subject
        || list
            .allow_net
            .iter()
            .filter_map(|n| Network::parse(n).ok())
            .any(|n| n.contains(client.address))
}

/// An IP network: an address and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `ADDR/PREFIX` or a lone address (a network of one).
    pub fn parse(text: &str) -> ApiResult<Network> {
        let bad = || {
            ApiError::invalid(format!(
                "allow_net {text:?} is not a network like 10.0.0.0/8, fd00::/8 or 192.0.2.7"
            ))
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let address: IpAddr = addr.parse().map_err(|_| bad())?;
        let bits = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            // Digits without a leading zero (as the OpenAPI document's pattern says).
            Some(p)
                if (p == "0" || !p.starts_with('0'))
                    && !p.is_empty()
                    && p.len() <= 3
                    && p.bytes().all(|b| b.is_ascii_digit()) =>
            {
                p.parse::<u8>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
            None => bits,
        };
        if prefix > bits {
            return Err(bad());
        }
        Ok(Network { address, prefix })
    }

    /// Whether `ip` lies in the network (an IPv4-mapped IPv6 address counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.address, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(address: &str, subject: Option<&str>) -> Client {
        Client { address: address.parse().unwrap(), subject: subject.map(Into::into), tls: true }
    }

    #[test]
    fn a_list_admits_named_subjects_and_networks_only() {
        let open = AccessList::default();
        assert!(admits(&open, &client("192.0.2.1", None)), "no list: anyone");
        let list = checked(vec!["client-a".into()], vec!["10.0.0.0/8".into()]).unwrap();
        assert!(admits(&list, &client("127.0.0.1", Some("client-a"))));
        assert!(!admits(&list, &client("127.0.0.1", Some("client-b"))));
        assert!(!admits(&list, &client("127.0.0.1", None)));
        assert!(admits(&list, &client("10.1.2.3", None)));
        assert!(admits(&list, &client("::ffff:10.1.2.3", None)), "v4-mapped");
        assert!(!admits(&list, &client("11.0.0.1", None)));
        let v6 = checked(vec![], vec!["fd00::/8".into(), "192.0.2.7".into()]).unwrap();
        assert!(admits(&v6, &client("fd12::1", None)));
        assert!(admits(&v6, &client("192.0.2.7", None)));
        assert!(!admits(&v6, &client("192.0.2.8", None)));
        let all = checked(vec![], vec!["0.0.0.0/0".into()]).unwrap();
        assert!(admits(&all, &client("203.0.113.9", None)));
    }

    #[test]
    fn malformed_entries_are_refused() {
        for net in [
            "10.0.0.0/33",
            "10.0.0/8",
            "fd00::/129",
            "x",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/08",
            "010.0.0.0/8",
        ] {
            assert!(checked(vec![], vec![net.into()]).is_err(), "{net}");
        }
        assert!(checked(vec![String::new()], vec![]).is_err());
        assert!(checked(vec!["a\nb".into()], vec![]).is_err());
        assert!(checked(vec!["é".repeat(SUBJECT_CHARS_MAX)], vec![]).is_ok());
        let many = vec!["x".to_owned(); ACCESS_ENTRIES_MAX + 1];
        assert!(checked(many, vec![]).is_err());
    }
}
