//! The write fence of leader election. Reconcilers write through a client whose requests
//! pass this fence: while this replica does not hold a freshly renewed Lease, every
//! request that changes something (POST, PUT, PATCH, DELETE) is refused before it leaves
//! the process. A failed renewal closes it at once, so a reconcile already in flight cannot
//! write after another replica may have taken over; reads go on, so caches stay warm.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Method, Request};
use tower::BoxError;

/// Open while this replica leads.
#[derive(Debug, Clone, Default)]
pub struct WriteFence(Arc<AtomicBool>);

/// A write was attempted while the fence was closed.
#[derive(Debug, thiserror::Error)]
#[error("not the leader (no freshly renewed Lease): refused {method} {path}")]
pub struct Fenced {
    /// The refused request's method.
    pub method: Method,
    /// And its path.
    pub path: String,
}

impl WriteFence {
    /// Lets writes through (the Lease was just acquired or renewed).
    pub fn open(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Refuses writes from now on (a renewal failed, or the Lease was lost).
    pub fn close(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    /// Whether writes pass.
    pub fn is_open(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

impl<B> tower::filter::Predicate<Request<B>> for WriteFence {
    type Request = Request<B>;

    fn check(&mut self, request: Request<B>) -> Result<Request<B>, BoxError> {
        let reads = matches!(*request.method(), Method::GET | Method::HEAD);
        if reads || self.is_open() {
            return Ok(request);
        }
        Err(Box::new(Fenced {
            method: request.method().clone(),
            path: request.uri().path().to_owned(),
        }))
    }
}
