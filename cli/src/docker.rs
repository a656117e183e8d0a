//! Connecting the Docker executor when a daemon answers.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use strata_engine::exec::docker::DockerExecutor;
use strata_engine::exec::Executor;

/// How long the daemon gets to answer before `ci` goes on without it.
const CONNECT_WAIT: Duration = Duration::from_secs(3);

/// The Docker executor, when Docker is reachable; `None` otherwise (tasks
/// with an image then fail with a message saying how to start Docker).
///
/// Containers and networks that an earlier `ci` on this machine left behind
/// when it was killed are removed here, and each removal is printed.
pub async fn connect() -> Option<Arc<dyn Executor>> {
    let docker = DockerExecutor::connect(CONNECT_WAIT).await.ok()?;
    match docker.remove_leftovers().await {
        Ok(removed) => {
            let mut err = std::io::stderr().lock();
            for line in removed {
                let _ = writeln!(err, "note: {line}");
            }
        }
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "warning: cannot look for leftover containers: {e}"
            );
        }
    }
    Some(Arc::new(docker))
}
