//! A minimal HTTP/1.1 responder for the metrics: `GET /metrics` (and `/`) answer the
//! exposition text, anything else a short error. One request per connection (`Connection:
//! close`), a bounded request head and a read timeout, so a scraper that misbehaves costs one
//! task for a few seconds and nothing else. No HTTP library is pulled in for one read-only page.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read; a scraper's GET is a few hundred bytes.
pub const REQUEST_HEAD_BYTES_MAX: usize = 8 << 10;
/// How long a client may take to send its request and read the answer.
pub const CLIENT_TIMEOUT_MS: u64 = 5_000;
/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Renders the page for each scrape.
pub type Source = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Judges a request head (pure).
pub fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::BadRequest;
    };
    let mut parts = text.lines().next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    if method != "GET" && method != "HEAD" {
        return Route::MethodNotAllowed;
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" | "/" => Route::Metrics,
        _ => Route::NotFound,
    }
}

fn response(status: &str, content_type: &str, body: &str, head_only: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body.as_bytes());
    }
    r
}

/// Reads up to the end of the request head; `None` when it is too long or the client is gone.
async fn read_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Some(buf);
        }
        if buf.len() > REQUEST_HEAD_BYTES_MAX {
            return None;
        }
    }
}

async fn answer(mut stream: TcpStream, source: Source) {
    let timeout = Duration::from_millis(CLIENT_TIMEOUT_MS);
    let Ok(Some(head)) = tokio::time::timeout(timeout, read_head(&mut stream)).await else {
        return;
    };
    let head_only = head.starts_with(b"HEAD ");
    let reply = match route(&head) {
        Route::Metrics => response("200 OK", CONTENT_TYPE, &source().await, head_only),
        Route::NotFound => response(
            "404 Not Found",
            "text/plain",
            "not found: the metrics are at /metrics\n",
            head_only,
        ),
        Route::MethodNotAllowed => response(
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n",
            head_only,
        ),
        Route::BadRequest => response("400 Bad Request", "text/plain", "bad request\n", false),
    };
    let _ = tokio::time::timeout(timeout, async {
        let _ = stream.write_all(&reply).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// Serves until the task is aborted.
pub async fn serve(listener: TcpListener, source: Source) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, source.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_by_method_and_path() {
        assert_eq!(
            route(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Route::Metrics
        );
        assert_eq!(route(b"GET /?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /other HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"garbage\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(&[0xff, 0xfe, b'\n', b'\n']), Route::BadRequest);
    }

    #[tokio::test]
    async fn a_scrape_gets_the_rendered_page() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let source: Source = Arc::new(|| Box::pin(async { "x 1\n".to_string() }));
        let task = tokio::spawn(serve(listener, source));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).await.unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(got.contains(CONTENT_TYPE), "{got}");
        assert!(got.ends_with("\r\n\r\nx 1\n"), "{got}");
        task.abort();
    }
}
