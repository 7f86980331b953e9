//! Carries out the core's HTTP requests with `fetch`, bounded by their timeout.

use crate::http::{Outcome, Request};
use futures::FutureExt;
use std::time::Duration;
use worker::{Delay, Fetch, Headers, Method, RequestInit, RequestRedirect};

pub async fn send(request: &Request) -> Outcome {
    let attempt = async {
        let headers = Headers::new();
        for (k, v) in &request.headers {
            headers.set(k, v)?;
        }
        let mut init = RequestInit::new();
        // A redirect is answered as it is, not followed: a webhook tool's https URL that
        // redirects to http (or elsewhere) would otherwise get the caller's details there.
        init.with_method(Method::from(request.method.clone()))
            .with_headers(headers)
            .with_redirect(RequestRedirect::Manual)
            .with_body(Some(request.body.clone().into()));
        let req = worker::Request::new_with_init(&request.url, &init)?;
        let mut resp = Fetch::Request(req).send().await?;
        let status = resp.status_code();
        let body = resp.text().await.unwrap_or_default();
        Ok::<_, worker::Error>(Outcome::Response { status, body })
    }
    .fuse();
    let timeout = Delay::from(Duration::from_millis(request.timeout_ms)).fuse();
    futures::pin_mut!(attempt, timeout);
    futures::select! {
        r = attempt => r.unwrap_or_else(|e| Outcome::Failed { reason: e.to_string() }),
        _ = timeout => Outcome::Failed { reason: "timeout".into() },
    }
}
