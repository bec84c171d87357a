//! The admin listener: `/metrics` (Prometheus), `/stats` (JSON), `/healthz`.

pub mod metrics;
pub mod report;
pub mod stats;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::proxy::Proxy;

/// Serves the admin endpoints until the process ends.
pub async fn serve(sock: TcpListener, proxy: Arc<Proxy>) {
    loop {
        let (stream, _) = match sock.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(route(req, proxy).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn route(req: Request<Incoming>, proxy: Arc<Proxy>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/reload" if req.method() == http::Method::POST => {
            match tokio::task::spawn_blocking(move || proxy.reload()).await {
                Ok(Ok(())) => {
                    tracing::info!("configuration reloaded (admin request)");
                    text(StatusCode::OK, "text/plain", "reloaded\n".into())
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "reload refused; the running configuration stays");
                    text(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "text/plain",
                        format!("reload refused, the running configuration stays: {e}\n"),
                    )
                }
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/metrics" => {
            match tokio::task::spawn_blocking(move || metrics::render(&stats::snapshot(&proxy)))
                .await
            {
                Ok(body) => text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    body,
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    e.to_string(),
                ),
            }
        }
        "/stats" => match tokio::task::spawn_blocking(move || {
            serde_json::to_string_pretty(&stats::snapshot(&proxy))
        })
        .await
        {
            Ok(Ok(body)) => text(StatusCode::OK, "application/json", body),
            Ok(Err(e)) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string(),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    resp
}
