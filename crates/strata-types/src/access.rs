//! A volume's NBD access list, as records and the catalog store it: the certificate
//! subjects (CN) and networks that may open the volume's exports. The data only; checking
//! entries and matching a client against them is the node's (`strata-server`'s `access`).
//! An empty list admits every client (what volumes made before access lists had).

use serde::{Deserialize, Serialize};

/// Who may open a volume's exports. Unknown fields are refused (a list is a security
/// boundary: a misspelt field must not read as "anyone").
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AccessList {
    /// Client certificate subjects (CN) admitted.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Networks (CIDR, `10.0.0.0/8`, `fd00::/8`, or one address) admitted.
    #[serde(default)]
    pub allow_net: Vec<String>,
}

impl AccessList {
    /// True when there is no list (everyone is admitted).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.allow_net.is_empty()
    }

    /// One line for humans: `client-a, 10.0.0.0/8` or `anyone`.
    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "anyone".to_owned();
        }
        let all: Vec<&str> = self.allow.iter().chain(&self.allow_net).map(String::as_str).collect();
        all.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_list_is_anyone_and_a_list_describes_its_entries() {
        assert!(AccessList::default().is_empty());
        assert_eq!(AccessList::default().describe(), "anyone");
        let list =
            AccessList { allow: vec!["client-a".into()], allow_net: vec!["10.0.0.0/8".into()] };
        assert!(!list.is_empty());
        assert_eq!(list.describe(), "client-a, 10.0.0.0/8");
    }
}
