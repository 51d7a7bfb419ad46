//! A scripted API server for reconcile tests: `tower_test::mock::pair` behind
//! `kube::Client`. Each step names the request we expect (method and path) and the reply;
//! Event writes are collected on the side, because they are best effort. [`apply`] models
//! what the API server makes of server-side applies from two field managers.

pub mod apply;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::Client;
use serde_json::{json, Value};
use tower::filter::Filter;

use crate::context::{Clock, Context};
use crate::fence::WriteFence;
use crate::metrics::Metrics;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Responder = Box<dyn FnOnce(&Recorded) -> (u16, Value) + Send>;

/// A clock that stands still.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub Timestamp);

impl Clock for FixedClock {
    fn now(&self) -> Timestamp {
        self.0
    }
}

/// One request the reconcile under test must make, in order.
struct Step {
    method: &'static str,
    path: String,
    respond: Responder,
}

/// One request that reached the mocked API server.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query string (field manager, force, selectors).
    pub query: String,
    /// The Content-Type (which kind of patch).
    pub content_type: String,
    /// JSON body or Null.
    pub body: Value,
}

impl Recorded {
    /// A changing request (not a read).
    pub fn is_write(&self) -> bool {
        !matches!(self.method.as_str(), "GET" | "HEAD")
    }
}

/// What the mocked API server saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Request bodies (JSON or Null) of the scripted steps, in order.
    pub bodies: Vec<Value>,
    /// The scripted requests in full, in order.
    pub requests: Vec<Recorded>,
    /// Event objects written.
    pub events: Vec<Value>,
}

impl Seen {
    /// The Event reasons, in order.
    pub fn event_reasons(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    }
}

/// A scripted conversation with the API server.
#[derive(Default)]
pub struct Scenario {
    steps: VecDeque<Step>,
}

/// A Kubernetes `Status` for a missing object.
pub fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "not found", "reason": "NotFound", "code": 404}),
    )
}

/// A list reply.
pub fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": kind, "metadata": {"resourceVersion": "1"}, "items": items})
}

impl Scenario {
    /// Expects `method path` and answers 200 with `body`.
    pub fn ok(self, method: &'static str, path: &str, body: Value) -> Self {
        self.step(method, path, move |_| (200, body))
    }

    /// Expects `method path` and answers with `respond(the whole request)`.
    pub fn request(
        mut self,
        method: &'static str,
        path: &str,
        respond: impl FnOnce(&Recorded) -> (u16, Value) + Send + 'static,
    ) -> Self {
        self.steps.push_back(Step {
            method,
            path: path.to_owned(),
            respond: Box::new(respond),
        });
        self
    }

    /// Expects `method path` and answers 404.
    pub fn missing(self, method: &'static str, path: &str) -> Self {
        self.step(method, path, |_| not_found())
    }

    /// Expects `method path` and answers with `respond(request body)`.
    pub fn step(
        self,
        method: &'static str,
        path: &str,
        respond: impl FnOnce(&Value) -> (u16, Value) + Send + 'static,
    ) -> Self {
        self.request(method, path, move |r| respond(&r.body))
    }

    /// Runs `reconcile` against the script with the clock at `now`; both the reconcile and
    /// the server must finish within 1 s, and every scripted step must be used.
    pub async fn run<F, Fut, T>(self, now: Timestamp, reconcile: F) -> (T, Seen)
    where
        F: FnOnce(Arc<Context>) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        self.run_fenced(now, None, |ctx, _| reconcile(ctx)).await
    }

    /// Like [`Scenario::run`], with the reconcilers' client behind `fence` (as in
    /// production) when one is given; `scenario` also gets an unfenced client for the Lease.
    pub async fn run_fenced<F, Fut, T>(
        self,
        now: Timestamp,
        fence: Option<WriteFence>,
        scenario: F,
    ) -> (T, Seen)
    where
        F: FnOnce(Arc<Context>, Client) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let lease_client = Client::new(service.clone(), "default");
        let client = match fence {
            Some(fence) => Client::new(Filter::new(service, fence), "default"),
            None => Client::new(service, "default"),
        };
        let ctx = Arc::new(Context::new(
            client,
            Arc::new(FixedClock(now)),
            Arc::new(Metrics::new()),
        ));
        let server = tokio::spawn(self.serve(handle));
        let result = tokio::time::timeout(Duration::from_secs(1), scenario(ctx, lease_client))
            .await
            .expect("reconcile did not finish within 1 s");
        let seen = tokio::time::timeout(Duration::from_secs(1), server)
            .await
            .expect("mock API server did not finish within 1 s")
            .expect("mock API server panicked");
        (result, seen)
    }

    async fn serve(mut self, mut handle: Handle) -> Seen {
        let mut seen = Seen::default();
        while let Some((request, send)) = handle.next_request().await {
            let method = request.method().as_str().to_owned();
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            let content_type = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let bytes = request
                .into_body()
                .collect()
                .await
                .expect("request body")
                .to_bytes();
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("request body is JSON")
            };
            let (code, reply) = if path.starts_with("/apis/events.k8s.io/") {
                seen.events.push(body.clone());
                (201, body)
            } else {
                let step = self.steps.pop_front().unwrap_or_else(|| {
                    panic!("unexpected request {method} {path} after the script ended: {body}")
                });
                assert_eq!(
                    (method.as_str(), path.as_str()),
                    (step.method, step.path.as_str()),
                    "request out of script; body: {body}"
                );
                let recorded = Recorded {
                    method,
                    path,
                    query,
                    content_type,
                    body,
                };
                let reply = (step.respond)(&recorded);
                seen.bodies.push(recorded.body.clone());
                seen.requests.push(recorded);
                reply
            };
            let response = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&reply).expect("reply JSON")))
                .expect("response");
            send.send_response(response);
        }
        let left: Vec<String> = self
            .steps
            .iter()
            .map(|s| format!("{} {}", s.method, s.path))
            .collect();
        assert!(left.is_empty(), "scripted requests never made: {left:?}");
        seen
    }
}
