//! Token-based cost of LLM API calls (an action's `llm` pricing): a reservation before the
//! call, settled to the usage the response reports when it ends.
//!
//! - **Reservation** ([`reservation`]): an upper bound of the call's cost. Input tokens are
//!   bounded by the request body's length in bytes (a BPE token is at least one byte of its
//!   text), output tokens by the request's `max_tokens` / `max_completion_tokens` (times `n`),
//!   or the policy's `max_output_tokens` when the request sets none. Because the reservation
//!   bounds the cost, concurrent calls charged atomically cannot overspend the budget.
//! - **Settlement** ([`MeteredBody`]): the response body is passed through unchanged while its
//!   `usage` is read: a JSON body (OpenAI `usage.prompt_tokens`/`completion_tokens`, Anthropic
//!   `usage.input_tokens`/`output_tokens`), or Server-Sent Events (`text/event-stream`: OpenAI's
//!   final chunk with `stream_options.include_usage`, Anthropic's `message_start` and
//!   cumulative `message_delta`). When the body ends, the budget is adjusted by actual minus
//!   reserved. A response that reports no usage, or is cut off, keeps the reservation charged
//!   (the tokens were likely spent).

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use hyper::body::{Body, Bytes, Frame, SizeHint};

use crate::policy::LlmPricing;

/// JSON response bodies buffered at most for reading `usage`, in bytes (SSE is read line by
/// line and needs no such buffer beyond one event).
const MAX_JSON: usize = 1 << 20;
/// Longest SSE line kept, in bytes; longer lines are skipped (usage events are small).
const MAX_LINE: usize = 256 * 1024;

/// Token counts a response reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Prices of one model, USD per million tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prices {
    pub input: f64,
    pub output: f64,
}

/// The prices of the request's `model` (the most expensive listed when it is not listed, so an
/// unknown model is never under-reserved).
pub fn prices(pricing: &LlmPricing, model: Option<&str>) -> Prices {
    if let Some(p) = model.and_then(|m| pricing.models.get(m)) {
        return Prices {
            input: p.input_usd_per_mtok,
            output: p.output_usd_per_mtok,
        };
    }
    pricing.models.values().fold(
        Prices {
            input: 0.0,
            output: 0.0,
        },
        |acc, p| Prices {
            input: acc.input.max(p.input_usd_per_mtok),
            output: acc.output.max(p.output_usd_per_mtok),
        },
    )
}

/// Cost of `usage` at `prices`, in micro-USD (rounded up).
pub fn cost_micros(usage: Usage, prices: Prices) -> u64 {
    // USD per million tokens is micro-USD per token.
    let micros =
        usage.input_tokens as f64 * prices.input + usage.output_tokens as f64 * prices.output;
    micros.ceil().max(0.0) as u64
}

/// The reservation of a call with request `body` (JSON): its prices and bounding usage.
pub fn reservation(pricing: &LlmPricing, body: &[u8]) -> (Prices, Usage) {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| json.as_ref().and_then(|v| v.get(name)?.as_u64());
    let model = json.as_ref().and_then(|v| v.get("model")?.as_str());
    let per_choice = field("max_completion_tokens")
        .or_else(|| field("max_tokens"))
        .unwrap_or(u64::from(pricing.max_output_tokens));
    let choices = field("n").unwrap_or(1).max(1);
    (
        prices(pricing, model),
        Usage {
            input_tokens: body.len() as u64,
            output_tokens: per_choice.saturating_mul(choices),
        },
    )
}

/// Reads `usage` out of a response as it streams by.
#[derive(Debug)]
pub struct UsageReader {
    sse: bool,
    buf: Vec<u8>,
    overflow: bool,
    usage: Option<Usage>,
}

impl UsageReader {
    /// A reader for a response of `content_type`.
    pub fn new(content_type: Option<&str>) -> UsageReader {
        let sse = content_type.is_some_and(|ct| {
            ct.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        });
        UsageReader {
            sse,
            buf: Vec::new(),
            overflow: false,
            usage: None,
        }
    }

    /// Feeds the next body bytes.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !self.sse {
            if self.buf.len() + bytes.len() > MAX_JSON {
                self.overflow = true;
                self.buf = Vec::new();
            } else if !self.overflow {
                self.buf.extend_from_slice(bytes);
            }
            return;
        }
        for &b in bytes {
            if b == b'\n' {
                let line = std::mem::take(&mut self.buf);
                if !self.overflow {
                    self.sse_line(&line);
                }
                self.overflow = false;
            } else if self.buf.len() < MAX_LINE {
                self.buf.push(b);
            } else {
                self.overflow = true;
            }
        }
    }

    fn sse_line(&mut self, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(data) = line.strip_prefix(b"data:") else {
            return;
        };
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data.trim_ascii()) {
            self.merge(&v);
        }
    }

    /// Takes the larger of what is known and what `v` reports (Anthropic's counts are
    /// cumulative, OpenAI reports once).
    fn merge(&mut self, v: &serde_json::Value) {
        let usage = v
            .get("usage")
            .or_else(|| v.get("message").and_then(|m| m.get("usage")));
        let Some(u) = usage.filter(|u| u.is_object()) else {
            return;
        };
        let n = |k: &str| u.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let input = n("prompt_tokens")
            + n("input_tokens")
            + n("cache_creation_input_tokens")
            + n("cache_read_input_tokens");
        let output = n("completion_tokens") + n("output_tokens");
        let known = self.usage.unwrap_or_default();
        self.usage = Some(Usage {
            input_tokens: known.input_tokens.max(input),
            output_tokens: known.output_tokens.max(output),
        });
    }

    /// The usage reported by the whole response, once it has ended.
    pub fn finish(mut self) -> Option<Usage> {
        if self.sse {
            let rest = std::mem::take(&mut self.buf);
            if !rest.is_empty() && !self.overflow {
                self.sse_line(&rest);
            }
        } else if !self.overflow
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.buf)
        {
            self.merge(&v);
        }
        self.usage
    }
}

/// What becomes of a metered response: the usage it reported (`None`: none, or the body
/// failed or was dropped before its end).
pub type Settle = Box<dyn FnOnce(Option<Usage>) + Send + Sync>;

/// A response body passed through unchanged, calling its [`Settle`] exactly once: at its end
/// (the end of the stream, or the last frame of a body of known length), on an error, or when
/// dropped before its end.
pub struct MeteredBody<B> {
    inner: B,
    reader: Option<UsageReader>,
    settle: Option<Settle>,
}

impl<B> MeteredBody<B> {
    pub fn new(inner: B, reader: UsageReader, settle: Settle) -> MeteredBody<B> {
        MeteredBody {
            inner,
            reader: Some(reader),
            settle: Some(settle),
        }
    }

    fn settle(&mut self, ended: bool) {
        if let Some(settle) = self.settle.take() {
            let usage = self
                .reader
                .take()
                .and_then(|r| if ended { r.finish() } else { None });
            settle(usage);
        }
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        self.settle(false);
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(reader)) = (frame.data_ref(), this.reader.as_mut()) {
                    reader.feed(data);
                }
                // A body of known length ends with its last frame: hyper stops polling then.
                if this.inner.is_end_stream() {
                    this.settle(true);
                }
            }
            Poll::Ready(Some(Err(_))) => this.settle(false),
            Poll::Ready(None) => this.settle(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(ct: &str, chunks: &[&str]) -> Option<Usage> {
        let mut r = UsageReader::new(Some(ct));
        for c in chunks {
            r.feed(c.as_bytes());
        }
        r.finish()
    }

    #[test]
    fn usage_is_read_from_json_and_from_streams_split_anywhere() {
        let openai = r#"{"id":"x","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        assert_eq!(
            read("application/json", &[&openai[..20], &openai[20..]]),
            Some(Usage {
                input_tokens: 12,
                output_tokens: 34
            })
        );
        let anthropic = r#"{"type":"message","usage":{"input_tokens":7,"output_tokens":9,"cache_read_input_tokens":3}}"#;
        assert_eq!(
            read("application/json", &[anthropic]),
            Some(Usage {
                input_tokens: 10,
                output_tokens: 9
            })
        );
        let sse_openai = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n\
                          data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n\
                          data: [DONE]\n\n";
        for split in [1, 17, 60, sse_openai.len() - 3] {
            assert_eq!(
                read(
                    "text/event-stream; charset=utf-8",
                    &[&sse_openai[..split], &sse_openai[split..]]
                ),
                Some(Usage {
                    input_tokens: 5,
                    output_tokens: 2
                }),
                "split at {split}"
            );
        }
        let sse_anthropic = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\r\n\r\n\
                             event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\"}\r\n\r\n\
                             event: message_delta\r\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\r\n\r\n";
        assert_eq!(
            read("text/event-stream", &[sse_anthropic]),
            Some(Usage {
                input_tokens: 25,
                output_tokens: 15
            })
        );
        assert_eq!(
            read("text/event-stream", &["data: {\"choices\":[]}\n\n"]),
            None
        );
        assert_eq!(read("application/json", &["not json"]), None);
    }

    #[test]
    fn a_reservation_bounds_the_cost() {
        let pricing: LlmPricing = serde_norway::from_str(
            "max_output_tokens: 1000\nmodels:\n  small: { input_usd_per_mtok: 1, output_usd_per_mtok: 4 }\n  big: { input_usd_per_mtok: 10, output_usd_per_mtok: 40 }\n",
        )
        .unwrap();
        let body = br#"{"model":"small","max_tokens":100,"n":2,"messages":[]}"#;
        let (p, u) = reservation(&pricing, body);
        assert_eq!(
            p,
            Prices {
                input: 1.0,
                output: 4.0
            }
        );
        assert_eq!(
            u,
            Usage {
                input_tokens: body.len() as u64,
                output_tokens: 200
            }
        );
        assert_eq!(cost_micros(u, p), body.len() as u64 + 800);
        // An unknown model is priced as the most expensive; no max_tokens: the ceiling.
        let (p, u) = reservation(&pricing, br#"{"model":"other"}"#);
        assert_eq!((p.input, p.output, u.output_tokens), (10.0, 40.0, 1000));
    }

    #[tokio::test]
    async fn a_metered_body_settles_once_at_its_end_or_with_nothing_when_dropped() {
        use std::sync::{Arc, Mutex};

        use http_body_util::{BodyExt as _, Full};

        let json = r#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#;
        let settled: Arc<Mutex<Vec<Option<Usage>>>> = Arc::default();
        let record = |s: &Arc<Mutex<Vec<Option<Usage>>>>| -> Settle {
            let s = s.clone();
            Box::new(move |u| s.lock().unwrap().push(u))
        };
        let body = MeteredBody::new(
            Full::new(Bytes::from(json)),
            UsageReader::new(Some("application/json")),
            record(&settled),
        );
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, json.as_bytes(), "passed through unchanged");
        let body = MeteredBody::new(
            Full::new(Bytes::from(json)),
            UsageReader::new(Some("application/json")),
            record(&settled),
        );
        drop(body);
        assert_eq!(
            *settled.lock().unwrap(),
            [
                Some(Usage {
                    input_tokens: 3,
                    output_tokens: 4
                }),
                None
            ]
        );
    }
}
