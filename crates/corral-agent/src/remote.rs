//! The controller as a host agent on another machine reaches it: its agent endpoint, over mutually
//! authenticated TLS. Reads are the store's ([`ReadStore`]); writes are the typed host protocol
//! ([`HostLink`]), decided by the controller from what is stored and which host asks.
//!
//! Also the join: fetch the CA over TLS without trusting it yet, check it against the fingerprint in
//! the join token, then send the token over a connection that verifies the controller with that CA.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use corral_api::host_protocol::{
    HaReply, HaReport, HostLink, HostWrite, JoinRequest, JoinResponse, LinkError, Written,
};
use corral_api::ApiErrorBody;
use corral_pki::Identity;
use corral_store::{KeyValue, ReadStore, Revision, StoreError, WatchPage, WatchStream};
use serde::de::DeserializeOwned;
use ureq::tls::{Certificate, ClientCert, PrivateKey, RootCerts, TlsConfig};

use crate::AgentError;

/// What the agent keeps after joining, in `DATA_DIR/agent/`.
pub struct Credentials {
    /// The host name the certificate was issued to.
    pub host: String,
    pub ca_pem: String,
    pub identity: Identity,
}

impl Credentials {
    fn dir(data_dir: &Path) -> std::path::PathBuf {
        data_dir.join("agent")
    }

    pub fn load(data_dir: &Path) -> Option<Credentials> {
        let d = Self::dir(data_dir);
        let read = |f: &str| std::fs::read_to_string(d.join(f)).ok();
        Some(Credentials {
            host: read("host")?.trim().to_string(),
            ca_pem: read("ca.crt")?,
            identity: Identity {
                cert_pem: read("host.crt")?,
                key_pem: read("host.key")?,
            },
        })
    }

    fn save(&self, data_dir: &Path) -> Result<(), AgentError> {
        let d = Self::dir(data_dir);
        let w = |f: &str, t: &str| {
            let path = d.join(f);
            corral_pki::write_private(&path, t.as_bytes())
                .map_err(|e| AgentError::io("writing", &path, e))
        };
        // host.crt last: `load` needs every file, so a crash part-way is not half a credential.
        w("ca.crt", &self.ca_pem)?;
        w("host", &self.host)?;
        w("host.key", &self.identity.key_pem)?;
        w("host.crt", &self.identity.cert_pem)
    }
}

fn agent_with(tls: TlsConfig, timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build()
        .into()
}

/// Joins the cluster at `url` with `token` as host `host`, and keeps the credentials in `data_dir`.
pub fn join(
    url: &str,
    token: &str,
    host: &str,
    data_dir: &Path,
) -> Result<Credentials, AgentError> {
    let fp = token
        .split('.')
        .next()
        .filter(|f| f.len() == 64)
        .ok_or(AgentError::MalformedToken)?;
    let base = url.trim_end_matches('/');
    let unreachable = |e: ureq::Error| AgentError::Unreachable {
        url: base.to_string(),
        source: Box::new(e),
    };
    // The CA is public; it is checked against the token's fingerprint before anything is trusted.
    let insecure = agent_with(
        TlsConfig::builder().disable_verification(true).build(),
        Duration::from_secs(10),
    );
    let mut res = insecure
        .get(format!("{base}/agent/v1/ca"))
        .call()
        .map_err(unreachable)?;
    let ca_pem = res.body_mut().read_to_string().map_err(unreachable)?;
    let ca = corral_pki::first_cert(&ca_pem)?;
    if corral_pki::fingerprint(ca.as_ref()) != fp {
        return Err(AgentError::WrongController {
            url: base.to_string(),
        });
    }
    let verified = agent_with(tls(&ca_pem, None)?, Duration::from_secs(30));
    let mut res = verified
        .post(format!("{base}/agent/v1/join"))
        .send_json(JoinRequest {
            token: token.to_string(),
            host: host.to_string(),
        })
        .map_err(unreachable)?;
    if !res.status().is_success() {
        let body: Result<ApiErrorBody, _> = res.body_mut().read_json();
        return Err(AgentError::JoinRefused {
            url: base.to_string(),
            message: body
                .map(|b| b.message)
                .unwrap_or_else(|_| format!("the controller answered {}", res.status())),
        });
    }
    let r: JoinResponse = res.body_mut().read_json().map_err(unreachable)?;
    let creds = Credentials {
        host: host.to_string(),
        ca_pem: r.ca_pem,
        identity: Identity {
            cert_pem: r.cert_pem,
            key_pem: r.key_pem,
        },
    };
    creds.save(data_dir)?;
    Ok(creds)
}

fn tls(ca_pem: &str, identity: Option<&Identity>) -> Result<TlsConfig, AgentError> {
    let bad = |what| {
        move |e| AgentError::Credentials {
            what,
            source: Box::new(e),
        }
    };
    let ca = Certificate::from_pem(ca_pem.as_bytes()).map_err(bad("the cluster CA"))?;
    let mut b = TlsConfig::builder().root_certs(RootCerts::Specific(Arc::new(vec![ca])));
    if let Some(id) = identity {
        let cert =
            Certificate::from_pem(id.cert_pem.as_bytes()).map_err(bad("the host certificate"))?;
        let key = PrivateKey::from_pem(id.key_pem.as_bytes()).map_err(bad("the host key"))?;
        b = b.client_cert(Some(ClientCert::new_with_certs(&[cert], key)));
    }
    Ok(b.build())
}

/// The controller, reached through its agent endpoint.
#[derive(Clone)]
pub struct RemoteStore {
    base: String,
    agent: ureq::Agent,
}

fn unreachable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend {
        path: "the controller".into(),
        message: e.to_string(),
    }
}

impl RemoteStore {
    pub fn new(url: &str, creds: &Credentials) -> Result<Self, AgentError> {
        // Long polls take up to 20 s.
        let agent = agent_with(
            tls(&creds.ca_pem, Some(&creds.identity))?,
            Duration::from_secs(40),
        );
        Ok(Self {
            base: url.trim_end_matches('/').to_string(),
            agent,
        })
    }

    /// GET `path`, or POST `body` to it: the answer, or the status and sentence of a refusal.
    async fn call<T: DeserializeOwned + Send + 'static>(
        &self,
        path: String,
        body: Option<serde_json::Value>,
    ) -> Result<Result<T, (u16, String)>, StoreError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let url = format!("{}{path}", me.base);
            let res = match body {
                Some(body) => me.agent.post(&url).send_json(&body),
                None => me.agent.get(&url).call(),
            };
            let mut res = res.map_err(unreachable)?;
            let status = res.status().as_u16();
            if (200..300).contains(&status) {
                return res.body_mut().read_json::<T>().map(Ok).map_err(unreachable);
            }
            let msg = res
                .body_mut()
                .read_json::<ApiErrorBody>()
                .map(|b| b.message)
                .unwrap_or_default();
            Ok(Err((status, msg)))
        })
        .await
        .map_err(unreachable)?
    }

    /// A read: a refusal is the store's error.
    async fn read<T: DeserializeOwned + Send + 'static>(
        &self,
        path: String,
    ) -> Result<T, StoreError> {
        match self.call(path, None).await? {
            Ok(t) => Ok(t),
            Err((410, _)) => Err(StoreError::WatchLagged),
            Err((status, msg)) => Err(unreachable(format!("{status}: {msg}"))),
        }
    }
}

fn q(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[async_trait]
impl crate::ha::HaLink for RemoteStore {
    async fn report(&self, report: HaReport) -> Result<HaReply, AgentError> {
        let body = serde_json::to_value(report).map_err(StoreError::from)?;
        match self.call("/agent/v1/ha".into(), Some(body)).await? {
            Ok(reply) => Ok(reply),
            Err((status, msg)) => Err(unreachable(format!("{status}: {msg}")).into()),
        }
    }
}

#[async_trait]
impl HostLink for RemoteStore {
    async fn write(&self, write: HostWrite) -> Result<Written, LinkError> {
        let body = serde_json::to_value(write)
            .map_err(|e| LinkError::Unavailable(format!("encoding the write: {e}")))?;
        match self.call("/agent/v1/write".into(), Some(body)).await {
            Ok(Ok(written)) => Ok(written),
            Ok(Err((400..=499, msg))) => Err(LinkError::Refused(msg)),
            Ok(Err((status, msg))) => Err(LinkError::Unavailable(format!("{status}: {msg}"))),
            Err(e) => Err(LinkError::Unavailable(e.to_string())),
        }
    }
}

#[async_trait]
impl ReadStore for RemoteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.read(format!("/agent/v1/get?key={}", q(key))).await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.read(format!("/agent/v1/list?prefix={}", q(prefix)))
            .await
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let from = if from == 0 {
            self.current_revision().await? + 1
        } else {
            from
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let me = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut from = from;
            loop {
                let path = format!("/agent/v1/watch?prefix={}&from={from}", q(&prefix));
                let page: WatchPage = tokio::select! {
                    page = me.read(path) => match page {
                        Ok(p) => p,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    },
                    _ = tx.closed() => return,
                };
                from = page.next;
                for e in page.events {
                    if tx.send(Ok(e)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.read("/agent/v1/revision".into()).await
    }
}
