//! Announces new approvals to a chat webhook: Slack incoming webhooks (`text` plus Block Kit
//! `blocks`) or Microsoft Teams connectors (a legacy `MessageCard`). Posts go out from a
//! background task, retried three times with backoff; a webhook that stays down is logged and
//! never holds a request up.

use std::{sync::Arc, time::Duration};

use http::{Request, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::{net::TcpStream, sync::mpsc};
use tokio_rustls::TlsConnector;

use super::Approval;

/// Payloads queued at most; beyond, announcements are dropped (and logged).
const QUEUE: usize = 1024;
/// Time allowed for one post.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
const ATTEMPTS: u32 = 3;

/// The message shape the webhook expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Slack incoming webhook: `{"text", "blocks"}`.
    Slack,
    /// Microsoft Teams connector: `{"@type": "MessageCard", ...}`.
    Teams,
}

/// A running announcer.
pub struct Webhook {
    format: Format,
    tx: mpsc::Sender<Vec<u8>>,
}

impl Webhook {
    /// Starts the background poster on the current tokio runtime, posting to `url`
    /// (`http://` or `https://`, verified against `roots`).
    ///
    /// # Errors
    /// `url` is not an absolute http(s) URL.
    pub fn start(
        url: &str,
        format: Format,
        roots: rustls::RootCertStore,
    ) -> Result<Webhook, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("webhook URL {url}: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
                Some(TlsConnector::from(Arc::new(config)))
            }
            _ => return Err(format!("webhook URL {url}: not http:// or https://")),
        };
        if uri.host().is_none() {
            return Err(format!("webhook URL {url}: no host"));
        }
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        tokio::spawn(async move {
            while let Some(payload) = rx.recv().await {
                let mut delay = Duration::from_millis(200);
                for attempt in 1..=ATTEMPTS {
                    match tokio::time::timeout(POST_TIMEOUT, post(&uri, tls.as_ref(), &payload))
                        .await
                    {
                        Ok(Ok(())) => break,
                        Ok(Err(e)) => {
                            tracing::warn!(target: "aegis::approval", attempt, error = %e, "approval webhook failed");
                        }
                        Err(_) => {
                            tracing::warn!(target: "aegis::approval", attempt, "approval webhook timed out");
                        }
                    }
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
            }
        });
        Ok(Webhook { format, tx })
    }

    /// Queues the announcement of `approval`.
    pub fn announce(&self, approval: &Approval) {
        let payload = payload(self.format, approval);
        if self.tx.try_send(payload.to_string().into_bytes()).is_err() {
            tracing::error!(target: "aegis::approval", approval_id = %approval.id, "approval webhook queue full; announcement dropped");
        }
    }
}

/// The message for `approval` in `format`.
pub fn payload(format: Format, a: &Approval) -> serde_json::Value {
    let who = format!("{}@{}", a.agent, a.tenant);
    let what = match (&a.tool, &a.action) {
        (Some(t), Some(x)) => format!("{t} / {x}"),
        _ => "(no tool)".to_owned(),
    };
    let params = serde_json::to_string_pretty(&a.params).unwrap_or_default();
    let summary = format!("Aegis: {who} needs approval for {what}");
    let command = format!(
        "aegis-agent approvals approve {id}  |  aegis-agent approvals deny {id}",
        id = a.id
    );
    match format {
        Format::Slack => serde_json::json!({
            "text": summary,
            "blocks": [
                {"type": "header", "text": {"type": "plain_text", "text": "Approval needed"}},
                {"type": "section", "fields": [
                    {"type": "mrkdwn", "text": format!("*Agent*\n{who}")},
                    {"type": "mrkdwn", "text": format!("*Tool / action*\n{what}")},
                    {"type": "mrkdwn", "text": format!("*Request*\n`{} {}`", a.method, a.url)},
                    {"type": "mrkdwn", "text": format!("*Rule*\n{}", a.rule)},
                ]},
                {"type": "section", "text": {"type": "mrkdwn", "text": format!("*Parameters (DLP-redacted)*\n```{params}```")}},
                {"type": "context", "elements": [
                    {"type": "mrkdwn", "text": format!("Approval `{}` expires <!date^{}^{{date_short_pretty}} {{time}}|at {}>. {command}", a.id, a.expires, a.expires)},
                ]},
            ],
        }),
        Format::Teams => serde_json::json!({
            "@type": "MessageCard",
            "@context": "https://schema.org/extensions",
            "summary": summary,
            "themeColor": "D97706",
            "title": "Aegis: approval needed",
            "sections": [{
                "activityTitle": summary,
                "facts": [
                    {"name": "Agent", "value": who},
                    {"name": "Tool / action", "value": what},
                    {"name": "Request", "value": format!("{} {}", a.method, a.url)},
                    {"name": "Rule", "value": a.rule},
                    {"name": "Approval id", "value": a.id},
                    {"name": "Expires (unix s)", "value": a.expires.to_string()},
                ],
                "text": format!("Parameters (DLP-redacted):\n\n```\n{params}\n```\n\n{command}"),
            }],
        }),
    }
}

async fn post(uri: &http::Uri, tls: Option<&TlsConnector>, payload: &[u8]) -> Result<(), String> {
    let host = uri.host().unwrap_or_default().to_owned();
    let port = uri
        .port_u16()
        .unwrap_or(if tls.is_some() { 443 } else { 80 });
    let host_for_connect = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let tcp = TcpStream::connect((host_for_connect.as_str(), port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let request = Request::post(uri.path_and_query().map_or("/", |pq| pq.as_str()))
        .header(
            header::HOST,
            uri.authority().map_or(host.as_str(), |a| a.as_str()),
        )
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::USER_AGENT, "aegis-agent")
        .body(Full::new(Bytes::copy_from_slice(payload)))
        .map_err(|e| e.to_string())?;
    let status = match tls {
        Some(tls) => {
            let name = ServerName::try_from(host_for_connect.clone()).map_err(|e| e.to_string())?;
            let stream = tls.connect(name, tcp).await.map_err(|e| e.to_string())?;
            send(TokioIo::new(stream), request).await?
        }
        None => send(TokioIo::new(tcp), request).await?,
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered {status}"))
    }
}

async fn send<T>(io: T, request: Request<Full<Bytes>>) -> Result<http::StatusCode, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    // Drain the (small) answer so the connection ends cleanly.
    let _ = response.into_body().collect().await;
    Ok(status)
}
