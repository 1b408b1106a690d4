//! The CLI's client of a node's HTTP API (ureq; https:// verified with the node's CA or
//! the system's bundle; the bearer token sent when given), shared by the commands (`cli`)
//! and the long-operation followers (`follow`).
//!
//! Invariant: every request that changes anything says JSON (the API refuses others); a
//! refusal by the API is told apart from no usable answer ([`Failure`]).

use anyhow::{bail, Context};
use serde_json::Value;

/// The CLI's connection to a node's HTTP API.
pub struct Client {
    base: String,
    agent: ureq::Agent,
    token: Option<String>,
}

/// Where the system keeps its CA bundle (Debian's, then Red Hat's); `SSL_CERT_FILE`
/// names another.
const SYSTEM_CA_BUNDLES: [&str; 2] =
    ["/etc/ssl/certs/ca-certificates.crt", "/etc/pki/tls/certs/ca-bundle.crt"];

/// The CA certificates an https:// API is verified with: `cacert` (a file, or a
/// credential directory holding `ca-cert.pem`), else the system's bundle.
fn ca_certificates(
    cacert: Option<&std::path::Path>,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let path = match cacert {
        Some(p) if p.is_dir() => p.join(crate::tls::CA_CERT),
        Some(p) => p.to_owned(),
        None => {
            let env = std::env::var_os("SSL_CERT_FILE").map(std::path::PathBuf::from);
            let system = SYSTEM_CA_BUNDLES.iter().map(std::path::PathBuf::from);
            env.into_iter().chain(system).find(|p| p.is_file()).with_context(|| {
                "no CA certificates to verify the node's HTTPS with: give --cacert FILE \
                 (the ca-cert.pem of the node's tls_dir)"
            })?
        }
    };
    let certs = CertificateDer::pem_file_iter(&path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("read the CA certificates {}: {e}", path.display()))?;
    if certs.is_empty() {
        bail!("{}: no CA certificate in it", path.display());
    }
    Ok(certs)
}

impl Client {
    /// A client of the API at `api`, sending a bearer token: `token`, else the one in
    /// `token_file`. An https:// API is verified with the CA of `cacert` (a file, or a
    /// directory holding `ca-cert.pem`), else with the system's CA bundle.
    pub fn new(
        api: &str,
        token: Option<&str>,
        token_file: Option<&std::path::Path>,
        cacert: Option<&std::path::Path>,
    ) -> anyhow::Result<Client> {
        let token = match (token, token_file) {
            (_, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .with_context(|| format!("read the API token file {}", file.display()))?,
            ),
            (token, None) => token.map(str::to_owned),
        };
        let mut config = ureq::Agent::config_builder().http_status_as_error(false);
        if api.starts_with("https://") {
            let roots = ureq::tls::RootCerts::new_with_certs(
                &ca_certificates(cacert)?
                    .into_iter()
                    .map(|c| ureq::tls::Certificate::from_der(&c).to_owned())
                    .collect::<Vec<_>>(),
            );
            let tls = ureq::tls::TlsConfig::builder()
                .provider(ureq::tls::TlsProvider::Rustls)
                .unversioned_rustls_crypto_provider(crate::tls::provider())
                .root_certs(roots)
                .build();
            config = config.tls_config(tls);
        }
        let agent: ureq::Agent = config.build().into();
        let token = token.map(|t| format!("Bearer {}", t.trim()));
        Ok(Client { base: api.trim_end_matches('/').to_owned(), agent, token })
    }

    fn auth<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.token {
            Some(t) => request.header("authorization", t),
            None => request,
        }
    }

    /// Calls the API; an error says what it answered, or that it did not.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.try_call(method, path, body).map_err(|f| match f {
            Failure::Refused { code, message } => anyhow::anyhow!("{message} ({code})"),
            Failure::Unreachable(e) => e,
        })
    }

    /// Calls the API, telling a refusal (the API answered with an error code) from no
    /// usable answer (the node down, unreachable, or answering garbage).
    pub fn try_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base);
        // Every request that changes anything says JSON, body or not (the API refuses
        // others: a web page of another site could send them).
        const JSON: &str = "application/json";
        let response = match (method, body) {
            ("GET", _) => self.auth(self.agent.get(&url)).call(),
            ("DELETE", _) => self.auth(self.agent.delete(&url)).header("content-type", JSON).call(),
            ("PUT", Some(body)) => self.auth(self.agent.put(&url)).send_json(body),
            (_, Some(body)) => self.auth(self.agent.post(&url)).send_json(body),
            (_, None) => self.auth(self.agent.post(&url)).header("content-type", JSON).send_empty(),
        };
        let mut response =
            response.map_err(|e| self.unreachable(e)).map_err(Failure::Unreachable)?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .context("read the API response")
            .map_err(Failure::Unreachable)?;
        let value: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .with_context(|| format!("the API answered {status} with non-JSON"))
                .map_err(Failure::Unreachable)?
        };
        if !status.is_success() {
            let message = value["message"].as_str().unwrap_or("no message").to_owned();
            let code = value["code"].as_str().unwrap_or("unknown").to_owned();
            return Err(Failure::Refused { code, message });
        }
        Ok(value)
    }

    /// No answer from the API: why, with a hint when TLS failed.
    fn unreachable(&self, e: ureq::Error) -> anyhow::Error {
        let text = e.to_string();
        let hint = if text.contains("InvalidContentType") || text.contains("corrupt message") {
            format!(
                " (the node seems to serve plain HTTP: use --api {})",
                self.base.replacen("https://", "http://", 1)
            )
        } else if text.contains("certificate") || text.contains("UnknownIssuer") {
            " (verify it with the CA that signed the node's certificate: --cacert FILE, \
             the ca-cert.pem of its tls_dir)"
                .to_owned()
        } else {
            String::new()
        };
        anyhow::Error::new(e).context(format!("cannot reach the Strata API at {}{hint}", self.base))
    }

    /// The API's address.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A client of another node's API at `api`, with this one's token.
    pub fn other(&self, api: &str) -> Client {
        let base = api.trim_end_matches('/').to_owned();
        Client { base, agent: self.agent.clone(), token: self.token.clone() }
    }
}

/// Why an API call failed.
pub enum Failure {
    /// The API answered with an error.
    Refused {
        /// The error's code (`not_found`, `busy`, …).
        code: String,
        /// Its message.
        message: String,
    },
    /// No usable answer.
    Unreachable(anyhow::Error),
}

/// Percent-encodes a path segment (names are validated server-side; this keeps odd input
/// from changing the URL's shape).
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
