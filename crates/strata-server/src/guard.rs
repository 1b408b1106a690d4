//! What the HTTP API refuses so that no web page can drive it: any page its operator
//! visits can make the browser send requests to `http://127.0.0.1:8080`, and a page on a
//! name the attacker points at 127.0.0.1 (DNS rebinding) can even read the answers. One
//! middleware, before authentication, on every route (the dashboard and `/metrics` too):
//!
//! 1. `Host` must name this node: `localhost`, a loopback address, the listen address
//!    (with a wildcard listener: the address the connection came in on), or a name of
//!    `http_allowed_hosts`. Else 421 Misdirected Request: the request was meant for
//!    another server (a rebinding page believes it talks to its own site), and 421 says
//!    exactly that, where a 403 would blame the client's rights. Only the host is
//!    compared, not the port: a browser reaches this node on its own port whatever
//!    name it uses, and a proxy in front may say another.
//! 2. `Origin`, when sent (browsers send it on every cross-origin request and on every
//!    POST or DELETE), must be this API's own: `http(s)://HOST[:PORT]` of the request.
//!    `Sec-Fetch-Site` must not be `cross-site` or `same-site` (another port of
//!    `localhost` is same-site) — except for a GET or HEAD navigation, so a link to the
//!    dashboard from another site still opens it (a navigation changes nothing and its
//!    answer goes to the user, not to the linking page). Else 403.
//! 3. A request of a method that is not safe (anything but GET, HEAD, OPTIONS, TRACE)
//!    must say `Content-Type: application/json`, with or without a body. Else 415: an
//!    HTML form or a `no-cors` fetch can send a cross-site POST without asking the
//!    server first, but only as `text/plain`, a form or multipart — never JSON.

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// The address a connection came in on (the listener's for a specific address; with a
/// wildcard listener, the one the client reached), as the connection's `ConnectInfo`.
#[derive(Clone, Copy, Debug)]
pub struct Local(pub SocketAddr);

/// What the API answers to.
#[derive(Clone, Debug)]
pub struct Guard {
    /// The HTTP listen address.
    listen: SocketAddr,
    /// `https` or `http`.
    scheme: &'static str,
    /// Further host names (`http_allowed_hosts`), lowercase, without a trailing dot.
    allowed: Arc<Vec<String>>,
}

/// A refused request: its status, stable code and message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    /// 421, 403 or 415.
    pub status: StatusCode,
    /// `misdirected_request`, `forbidden` or `unsupported_media_type`.
    pub code: &'static str,
    /// For humans: what was refused and what to do.
    pub message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"code": self.code, "message": self.message});
        (self.status, axum::Json(body)).into_response()
    }
}

fn refuse(status: StatusCode, code: &'static str, message: String) -> Refusal {
    Refusal { status, code, message }
}

/// A host name as compared: lowercase, without a trailing dot.
fn canonical(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Splits `HOST[:PORT]` (an IPv6 address in brackets); `None` if malformed.
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    match port {
        Some(p) => Some((host, Some(p.parse().ok()?))),
        None => Some((host, None)),
    }
}

impl Guard {
    /// A guard for an API listening on `listen`, over HTTPS if `https`, that also answers
    /// to the names `allowed`.
    pub fn new(listen: SocketAddr, https: bool, allowed: &[String]) -> Guard {
        // A name written with a port (`strata.example:8080`) is the name.
        let name = |n: &String| split_authority(n.trim()).map(|(host, _)| canonical(host));
        let allowed = allowed.iter().filter_map(name).filter(|n| !n.is_empty()).collect();
        Guard { listen, scheme: if https { "https" } else { "http" }, allowed: Arc::new(allowed) }
    }

    /// `router` with every route (and the fallback) behind this guard, which runs before
    /// anything else, authentication included.
    pub fn around(self, router: axum::Router) -> axum::Router {
        router.layer(axum::middleware::from_fn_with_state(self, middleware))
    }

    /// Whether `host` (no port) names this node, reached at `local`.
    fn names_this_node(&self, host: &str, local: SocketAddr) -> bool {
        let host = canonical(host);
        if host == "localhost" || self.allowed.contains(&host) {
            return true;
        }
        match host.parse::<IpAddr>() {
            Ok(ip) => ip.is_loopback() || ip == self.listen.ip() || ip == local.ip(),
            Err(_) => false,
        }
    }

    /// Checks a request's headers (`local`: the address it came in on). The order is
    /// the response's: a foreign host first, then a foreign origin, then the body type.
    pub fn check(
        &self,
        method: &Method,
        headers: &HeaderMap,
        local: SocketAddr,
    ) -> Result<(), Refusal> {
        let text = |name: HeaderName| headers.get(name).map(|v| v.to_str().unwrap_or("\u{fffd}"));
        // Browsers always send Host; a request without one (HTTP/1.0) is no page's.
        let host = text(header::HOST);
        let this = host.and_then(split_authority);
        if let Some(given) = host {
            if !this.is_some_and(|(name, _)| self.names_this_node(name, local)) {
                return Err(refuse(
                    StatusCode::MISDIRECTED_REQUEST,
                    "misdirected_request",
                    format!(
                        "this node does not answer to the host {given:?} (a web page on a \
                         name pointed at this node is refused: DNS rebinding); use its \
                         address, localhost, or add the name to http_allowed_hosts \
                         (strata up --http-allowed-host NAME)"
                    ),
                ));
            }
        }
        if let Some(origin) = text(header::ORIGIN) {
            if !self.same_origin(origin, this) {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    format!(
                        "a request from the web page at {origin:?} is refused: only this \
                         API's own pages ({}://{}) may call it",
                        self.scheme,
                        host.unwrap_or("its address")
                    ),
                ));
            }
        }
        let site = text(SEC_FETCH_SITE);
        let navigation = (method == Method::GET || method == Method::HEAD)
            && text(SEC_FETCH_MODE) == Some("navigate");
        if matches!(site, Some("cross-site" | "same-site")) && !navigation {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "a {} request from another site's web page is refused (Sec-Fetch-Site: \
                     {}): only this API's own pages may call it",
                    method,
                    site.unwrap_or_default()
                ),
            ));
        }
        if !method.is_safe() && !is_json(text(header::CONTENT_TYPE)) {
            return Err(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "a {method} request must say Content-Type: application/json (with or \
                     without a body), not {}: what a web page of another site can send \
                     without asking is refused",
                    text(header::CONTENT_TYPE).map_or("none".into(), |t| format!("{t:?}"))
                ),
            ));
        }
        Ok(())
    }

    /// Whether `origin` is `SCHEME://HOST[:PORT]` of this request (`this`, from its Host),
    /// ports compared with the scheme's default filled in.
    fn same_origin(&self, origin: &str, this: Option<(&str, Option<u16>)>) -> bool {
        let default = if self.scheme == "https" { 443 } else { 80 };
        let Some(rest) = origin.strip_prefix(self.scheme).and_then(|r| r.strip_prefix("://"))
        else {
            return false; // another scheme, or "null" (a sandboxed or file:// page)
        };
        let (Some((host, port)), Some((this_host, this_port))) = (split_authority(rest), this)
        else {
            return false;
        };
        canonical(host) == canonical(this_host)
            && port.unwrap_or(default) == this_port.unwrap_or(default)
    }
}

/// `application/json`, any parameters (`; charset=utf-8`) after it.
fn is_json(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|t| t.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

/// Fetch metadata (sent by every current browser): the requesting page's relation to
/// this origin, and the kind of request.
const SEC_FETCH_SITE: HeaderName = HeaderName::from_static("sec-fetch-site");
const SEC_FETCH_MODE: HeaderName = HeaderName::from_static("sec-fetch-mode");

/// The middleware: refuses what [`Guard::check`] refuses, before anything else runs.
async fn middleware(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    let local = request
        .extensions()
        .get::<ConnectInfo<Local>>()
        .map_or(guard.listen, |ConnectInfo(Local(a))| *a);
    match guard.check(request.method(), request.headers(), local) {
        Ok(()) => next.run(request).await,
        Err(refusal) => {
            tracing::debug!(
                method = %request.method(),
                path = request.uri().path(),
                status = refusal.status.as_u16(),
                "refused a request a web page could have sent"
            );
            refusal.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(guard: &Guard, method: Method, headers: &[(&str, &str)]) -> Result<(), u16> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        let local: SocketAddr = "10.0.0.2:8080".parse().unwrap();
        guard.check(&method, &map, local).map_err(|r| r.status.as_u16())
    }

    const JSON: (&str, &str) = ("content-type", "application/json");

    #[test]
    fn a_foreign_host_is_misdirected_and_this_nodes_names_are_not() {
        let names = ["Strata.Example.".into(), "other.example:8443".into()];
        let g = Guard::new("0.0.0.0:8080".parse().unwrap(), false, &names);
        for host in [
            "127.0.0.1:8080",
            "127.9.9.9",
            "[::1]:8080",
            "localhost:8080",
            "LOCALHOST",
            "strata.example",
            "strata.example.:8080",
            "10.0.0.2:8080",
            "other.example",
        ] {
            assert_eq!(check(&g, Method::GET, &[("host", host)]), Ok(()), "{host}");
        }
        assert_eq!(check(&g, Method::GET, &[]), Ok(()), "HTTP/1.0 without Host");
        for host in ["evil.example", "evil.example:8080", "10.0.0.3:8080", "", ":80", "[::1"] {
            assert_eq!(check(&g, Method::GET, &[("host", host)]), Err(421), "{host:?}");
        }
        let g = Guard::new("192.168.1.5:8080".parse().unwrap(), false, &[]);
        assert_eq!(check(&g, Method::GET, &[("host", "192.168.1.5:8080")]), Ok(()));
    }

    #[test]
    fn only_this_apis_own_origin_and_site_may_change_anything() {
        let g = Guard::new("127.0.0.1:8080".parse().unwrap(), false, &[]);
        let host = ("host", "127.0.0.1:8080");
        let ok = [
            vec![host, JSON],
            vec![host, JSON, ("origin", "http://127.0.0.1:8080")],
            vec![host, JSON, ("sec-fetch-site", "same-origin")],
            vec![host, JSON, ("sec-fetch-site", "none")],
            vec![("host", "localhost:80"), JSON, ("origin", "http://localhost")],
        ];
        for headers in ok {
            assert_eq!(check(&g, Method::POST, &headers), Ok(()), "{headers:?}");
        }
        for origin in [
            "http://evil.example",
            "null",
            "https://127.0.0.1:8080",
            "http://127.0.0.1:8081",
            "http://localhost:8080",
        ] {
            let headers = [host, JSON, ("origin", origin)];
            assert_eq!(check(&g, Method::POST, &headers), Err(403), "{origin}");
            assert_eq!(check(&g, Method::GET, &headers), Err(403), "{origin} reading");
        }
        for site in ["cross-site", "same-site"] {
            let headers = [host, JSON, ("sec-fetch-site", site)];
            assert_eq!(check(&g, Method::POST, &headers), Err(403), "{site}");
            assert_eq!(check(&g, Method::GET, &headers), Err(403), "{site} fetch");
            let link = [host, ("sec-fetch-site", site), ("sec-fetch-mode", "navigate")];
            assert_eq!(check(&g, Method::GET, &link), Ok(()), "a link to the dashboard");
            assert_eq!(check(&g, Method::POST, &link), Err(403), "a form's navigation");
        }
        let https = Guard::new("127.0.0.1:443".parse().unwrap(), true, &[]);
        let headers = [("host", "127.0.0.1"), JSON, ("origin", "https://127.0.0.1:443")];
        assert_eq!(check(&https, Method::DELETE, &headers), Ok(()));
    }

    #[test]
    fn a_request_that_changes_anything_must_say_json() {
        let g = Guard::new("127.0.0.1:8080".parse().unwrap(), false, &[]);
        for ct in ["application/json", "application/json; charset=utf-8", "Application/JSON"] {
            for method in [Method::POST, Method::DELETE, Method::PUT, Method::PATCH] {
                assert_eq!(check(&g, method, &[("content-type", ct)]), Ok(()), "{ct}");
            }
        }
        for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""] {
            assert_eq!(check(&g, Method::POST, &[("content-type", ct)]), Err(415), "{ct}");
        }
        assert_eq!(check(&g, Method::POST, &[]), Err(415), "no content type");
        assert_eq!(check(&g, Method::DELETE, &[]), Err(415), "no content type");
        for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
            assert_eq!(check(&g, method, &[]), Ok(()));
        }
    }
}
