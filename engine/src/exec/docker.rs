//! The Docker executor: runs a task as a set of containers through the Docker
//! API. Service containers start first, on a network made for the task, and
//! the primary container starts once each of them answers its readiness
//! command. The task's directories are bind-mounted under `/ci`:
//!
//! | in the container | host path            | mode       |
//! |------------------|----------------------|------------|
//! | `/ci/in`         | [`TaskDirs::inputs`] | read-only  |
//! | `/ci/work`       | [`TaskDirs::work`]   | read-write |
//! | `/ci/prev`       | [`TaskDirs::prev`]   | read-only  |
//! | `/ci/prev-in`    | [`TaskDirs::prev_in`]| read-only  |
//! | `/ci/context`    | [`TaskDirs::context`]| read-write |
//!
//! Each is the task's own directory (a view of the run's inputs mount, its
//! slot's work directory and context file): nothing else of the store or of
//! the run's scratch is mounted.
//!
//! Whatever happens (success, failure, timeout, cancellation, an error of the
//! daemon), every container and network made for a task is removed before
//! [`Executor::run`] returns. Each of them carries labels naming the `ci`
//! process that made it ([`LABEL_SESSION`]), so what a `ci` killed outright
//! left behind is found and removed by the next one
//! ([`DockerExecutor::remove_leftovers`]).
//!
//! [`TaskDirs::inputs`]: super::TaskDirs::inputs
//! [`TaskDirs::work`]: super::TaskDirs::work
//! [`TaskDirs::prev`]: super::TaskDirs::prev
//! [`TaskDirs::prev_in`]: super::TaskDirs::prev_in
//! [`TaskDirs::context`]: super::TaskDirs::context

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bollard::container::LogOutput;
use bollard::errors::Error as DockerError;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HostConfig, Mount, MountType, NetworkCreateRequest,
    NetworkingConfig,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
    WaitContainerOptions,
};
use bollard::Docker;
use futures_util::{Stream as FuturesStream, StreamExt};
use tokio::task::JoinHandle;

use super::{ExecOutcome, ExecRequest, Executor, LogSink};
use crate::build::error_chain;
use crate::events::Stream;
use crate::BuildError;

/// Label: the task a container belongs to (`//pkg:name`).
pub const LABEL_TASK: &str = "strata.task";
/// Label: the `ci` process that made a container or network, as
/// `host/pid/start-time`; what a process that is gone left behind is removed.
pub const LABEL_SESSION: &str = "strata.session";
/// Label: the pid of that process alone (handy for `--filter label=…`).
pub const LABEL_PID: &str = "strata.pid";
/// Label: `primary`, `service` or `network`.
pub const LABEL_ROLE: &str = "strata.role";
/// Label on service containers: the service's name.
pub const LABEL_SERVICE: &str = "strata.service";

/// How long all the readiness commands of one task may take together.
const READY_WAIT: Duration = Duration::from_secs(60);
/// Pause between two runs of a readiness command that failed.
const READY_POLL: Duration = Duration::from_millis(200);
/// How long a pull of a missing image may take before it counts as failed.
const PULL_WAIT: Duration = Duration::from_secs(30);
/// How long the log streams get to drain once their containers are gone.
const DRAIN_WAIT: Duration = Duration::from_secs(5);
/// Longest line kept whole in the log; longer output is split.
const MAX_LINE: usize = 64 * 1024;

/// Runs tasks in containers of a Docker daemon.
pub struct DockerExecutor {
    docker: Docker,
    platform: String,
    session: Session,
    seq: AtomicU64,
}

impl DockerExecutor {
    /// Connects to the daemon named by `DOCKER_HOST` (default: the local
    /// socket) and negotiates the API version. `Err` when it does not answer
    /// within `wait`.
    pub async fn connect(wait: Duration) -> Result<DockerExecutor, BuildError> {
        let docker =
            Docker::connect_with_defaults().map_err(docker_error("connect to the daemon"))?;
        let docker = tokio::time::timeout(wait, docker.negotiate_version())
            .await
            .map_err(|_| BuildError::Docker {
                action: "connect to the daemon".into(),
                source: DockerError::RequestTimeoutError,
            })?
            .map_err(docker_error("negotiate the API version"))?;
        let version = tokio::time::timeout(wait, docker.version())
            .await
            .map_err(|_| BuildError::Docker {
                action: "ask the daemon its version".into(),
                source: DockerError::RequestTimeoutError,
            })?
            .map_err(docker_error("ask the daemon its version"))?;
        let os = version
            .os
            .unwrap_or_else(|| std::env::consts::OS.to_owned());
        let arch = match version.arch.as_deref() {
            Some("amd64") => "x86_64".to_owned(),
            Some("arm64") => "aarch64".to_owned(),
            Some(a) => a.to_owned(),
            None => std::env::consts::ARCH.to_owned(),
        };
        Ok(DockerExecutor {
            docker,
            platform: format!("docker/{os}-{arch}"),
            session: Session::current(),
            seq: AtomicU64::new(0),
        })
    }

    /// Removes the containers and networks that `ci` processes of this
    /// machine made and left behind when they were killed (their process is
    /// gone). Returns one line per object removed, for the user to read.
    /// Objects of live processes and of other machines are left alone.
    pub async fn remove_leftovers(&self) -> Result<Vec<String>, BuildError> {
        let mut removed = Vec::new();
        let filters: HashMap<&str, Vec<&str>> = HashMap::from([("label", vec![LABEL_SESSION])]);
        let containers = self
            .docker
            .list_containers(Some(
                ListContainersOptionsBuilder::default()
                    .all(true)
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(docker_error("list containers"))?;
        for c in containers {
            let labels = c.labels.unwrap_or_default();
            if !self.is_leftover(labels.get(LABEL_SESSION)) {
                continue;
            }
            let Some(id) = c.id else { continue };
            let name = c
                .names
                .and_then(|n| n.first().cloned())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| id.clone());
            match self
                .docker
                .remove_container(&id, Some(force_remove()))
                .await
            {
                Ok(())
                | Err(DockerError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {
                    let task = labels.get(LABEL_TASK).map(String::as_str).unwrap_or("?");
                    removed.push(format!(
                        "Removed container `{name}` of task `{task}`, left by an interrupted `ci`"
                    ));
                }
                Err(e) => {
                    return Err(docker_error(format!(
                        "remove the leftover container `{name}`"
                    ))(e))
                }
            }
        }
        let networks = self
            .docker
            .list_networks(Some(
                ListNetworksOptionsBuilder::default()
                    .filters(&filters)
                    .build(),
            ))
            .await
            .map_err(docker_error("list networks"))?;
        for n in networks {
            let labels = n.labels.unwrap_or_default();
            if !self.is_leftover(labels.get(LABEL_SESSION)) {
                continue;
            }
            let Some(name) = n.name else { continue };
            match self.docker.remove_network(&name).await {
                Ok(())
                | Err(DockerError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {
                    removed.push(format!(
                        "Removed network `{name}`, left by an interrupted `ci`"
                    ));
                }
                Err(e) => {
                    return Err(docker_error(format!(
                        "remove the leftover network `{name}`"
                    ))(e))
                }
            }
        }
        Ok(removed)
    }

    fn is_leftover(&self, session: Option<&String>) -> bool {
        match session.and_then(|s| Session::parse(s)) {
            Some(s) => s.host == self.session.host && !s.is_alive(),
            None => false,
        }
    }

    /// A container or network name unique to this process: `strata-<pid>-<n>-<what>`.
    fn name(&self, what: &str) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let mut slug = crate::build::slug(what);
        slug.truncate(48);
        format!("strata-{}-{n}-{slug}", self.session.pid)
    }

    fn labels(&self, task: &str, role: &str) -> HashMap<String, String> {
        HashMap::from([
            (LABEL_TASK.to_owned(), task.to_owned()),
            (LABEL_SESSION.to_owned(), self.session.id()),
            (LABEL_PID.to_owned(), self.session.pid.to_string()),
            (LABEL_ROLE.to_owned(), role.to_owned()),
        ])
    }

    /// Pulls `image`; `Err` names the image and says how to get it locally.
    async fn pull(&self, image: &str) -> Result<(), BuildError> {
        let reference = with_tag(image);
        let opts = CreateImageOptionsBuilder::default()
            .from_image(&reference)
            .build();
        let mut stream = self.docker.create_image(Some(opts), None, None);
        let unavailable = |source| BuildError::ImageUnavailable {
            image: image.to_owned(),
            registry: registry_of(image),
            source,
        };
        let pulled = tokio::time::timeout(PULL_WAIT, async {
            while let Some(item) = stream.next().await {
                item?;
            }
            Ok::<(), DockerError>(())
        })
        .await;
        match pulled {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(unavailable(e)),
            Err(_) => Err(unavailable(DockerError::RequestTimeoutError)),
        }
    }

    /// Creates the task's containers, runs them, and says how the primary
    /// ended. Registers every object in `set` before creating it, so the
    /// caller removes it whatever happens here.
    async fn run_set(
        &self,
        req: &ExecRequest,
        image: &str,
        stop: &Stopper,
        set: &mut ContainerSet,
    ) -> Result<ExecOutcome, BuildError> {
        let log = &req.log;
        // The network: none at all, the default bridge, or one of our own
        // when there are services (internal unless the task may go out).
        let network_mode = if !req.services.is_empty() {
            let name = self.name(&req.label);
            set.network = Some(name.clone());
            let labels = self.labels(&req.label, "network");
            let create = NetworkCreateRequest {
                name: name.clone(),
                driver: Some("bridge".into()),
                internal: Some(!req.network),
                labels: Some(labels),
                ..NetworkCreateRequest::default()
            };
            if let Err(e) = self.docker.create_network(create).await {
                return refused(log, "create the task's network", e);
            }
            name
        } else if req.network {
            "bridge".to_owned()
        } else {
            "none".to_owned()
        };
        if let Some(s) = stop.now() {
            return Ok(s.outcome());
        }

        // Services, each reachable by its name.
        let mut started: Vec<(&String, &crate::model::Service, String)> = Vec::new();
        for (name, svc) in &req.services {
            let svc_image = match self.resolve_image(&svc.image).await {
                Ok(id) => id,
                Err(e) => return Ok(fail(log, format!("Service `{name}`: {}", error_chain(&e)))),
            };
            let cname = self.name(&format!("{}-{name}", req.label));
            set.containers.push(cname.clone());
            let mut labels = self.labels(&req.label, "service");
            labels.insert(LABEL_SERVICE.into(), name.clone());
            let config = ContainerCreateBody {
                image: Some(svc_image),
                cmd: svc.cmd.clone(),
                env: Some(svc.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
                labels: Some(labels),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                host_config: Some(HostConfig {
                    network_mode: Some(network_mode.clone()),
                    ..HostConfig::default()
                }),
                networking_config: Some(NetworkingConfig {
                    endpoints_config: Some(HashMap::from([(
                        network_mode.clone(),
                        EndpointSettings {
                            aliases: Some(vec![name.clone()]),
                            ..EndpointSettings::default()
                        },
                    )])),
                }),
                ..ContainerCreateBody::default()
            };
            let what = format!("create service `{name}`");
            if let Err(e) = self.create(&cname, config).await {
                return refused(log, &what, e);
            }
            match self
                .attach(&cname, log, Some(format!("[svc {name}] ")))
                .await
            {
                Ok(pump) => set.pumps.push(pump),
                Err(e) => return refused(log, &format!("attach to service `{name}`"), e),
            }
            if let Err(e) = self.docker.start_container(&cname, None).await {
                return refused(log, &format!("start service `{name}`"), e);
            }
            started.push((name, svc, cname));
            if let Some(s) = stop.now() {
                return Ok(s.outcome());
            }
        }

        // Readiness: every service's command must succeed, within one bounded wait.
        let ready_by = Instant::now() + READY_WAIT;
        for (name, svc, cname) in &started {
            if svc.ready.is_empty() {
                continue;
            }
            let waited = Instant::now();
            let ready = tokio::select! {
                r = self.wait_ready(name, cname, &svc.ready, ready_by) => r?,
                s = stop.wait() => return Ok(s.outcome()),
            };
            if let Err(why) = ready {
                return Ok(fail(log, why));
            }
            log.line(
                Stream::Stdout,
                format!(
                    "[svc {name}] ready after {:.1}s",
                    waited.elapsed().as_secs_f64()
                )
                .as_bytes(),
            );
        }

        // The primary.
        let cname = self.name(&req.label);
        set.containers.push(cname.clone());
        let config = self.primary_config(req, image, &network_mode)?;
        if let Err(e) = self.create(&cname, config).await {
            return refused(log, "create the container", e);
        }
        let pump = match self.attach(&cname, log, None).await {
            Ok(p) => p,
            Err(e) => return refused(log, "attach to the container", e),
        };
        if let Err(e) = self.docker.start_container(&cname, None).await {
            pump.abort();
            return refused(log, "start the container", e);
        }
        if let Some(s) = stop.now() {
            set.pumps.push(pump);
            return Ok(s.outcome());
        }
        let mut wait = self
            .docker
            .wait_container(&cname, None::<WaitContainerOptions>);
        let status = tokio::select! {
            w = wait.next() => w,
            s = stop.wait() => {
                set.pumps.push(pump);
                return Ok(s.outcome());
            }
        };
        let code = match status {
            Some(Ok(r)) => r.status_code,
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => code,
            Some(Err(e)) => {
                set.pumps.push(pump);
                return Err(docker_error("wait for the container")(e));
            }
            None => {
                set.pumps.push(pump);
                return Err(BuildError::Docker {
                    action: "wait for the container".into(),
                    source: DockerError::DockerStreamError {
                        error: "the daemon closed the stream without a status".into(),
                    },
                });
            }
        };
        // The output ends when the container does: drain it all before
        // saying the task ended, so the log is complete.
        drain(pump).await;
        Ok(ExecOutcome {
            exit_code: Some(i32::try_from(code).unwrap_or(i32::MAX)),
            ..ExecOutcome::default()
        })
    }

    fn primary_config(
        &self,
        req: &ExecRequest,
        image: &str,
        network_mode: &str,
    ) -> Result<ContainerCreateBody, BuildError> {
        let dirs = &req.dirs;
        let mut mounts = vec![
            bind(&dirs.inputs, "/ci/in", true)?,
            bind(&dirs.work, "/ci/work", false)?,
            bind(&dirs.context, "/ci/context", false)?,
        ];
        let mut env: Vec<String> = req
            .env
            .iter()
            .chain(req.secrets.iter())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.extend(
            [
                "CI=true",
                "CI_IN=/ci/in",
                "CI_WORK=/ci/work",
                "CI_CONTEXT=/ci/context",
            ]
            .map(String::from),
        );
        if let Some(prev) = &dirs.prev {
            mounts.push(bind(prev, "/ci/prev", true)?);
            env.push("CI_PREV=/ci/prev".into());
        }
        if let Some(prev_in) = &dirs.prev_in {
            mounts.push(bind(prev_in, "/ci/prev-in", true)?);
            env.push("CI_PREV_IN=/ci/prev-in".into());
        }
        let user = req.user.clone().unwrap_or_else(|| "0:0".into());
        if !is_root(&user) {
            // A declared non-root user still owns nothing here: let it write
            // the work directory and the context file. Modes are not content.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&dirs.work, std::fs::Permissions::from_mode(0o777));
            let _ = std::fs::set_permissions(&dirs.context, std::fs::Permissions::from_mode(0o666));
        }
        let workdir = match &req.workdir {
            Some(w) => format!("/ci/work/{}", w.trim_matches('/')),
            None => "/ci/work".into(),
        };
        Ok(ContainerCreateBody {
            image: Some(image.to_owned()),
            // The command is the whole command: the image's entrypoint is not used.
            entrypoint: Some(Vec::new()),
            cmd: Some(req.argv.clone()),
            env: Some(env),
            working_dir: Some(workdir),
            user: Some(user),
            labels: Some(self.labels(&req.label, "primary")),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                network_mode: Some(network_mode.to_owned()),
                ..HostConfig::default()
            }),
            ..ContainerCreateBody::default()
        })
    }

    async fn create(&self, name: &str, config: ContainerCreateBody) -> Result<(), DockerError> {
        let opts = CreateContainerOptionsBuilder::default().name(name).build();
        self.docker
            .create_container(Some(opts), config)
            .await
            .map(|_| ())
    }

    /// Attaches to a created container's output (before it starts, so that
    /// nothing is missed) and pumps it into `log` until the container ends.
    async fn attach(
        &self,
        name: &str,
        log: &LogSink,
        prefix: Option<String>,
    ) -> Result<JoinHandle<()>, DockerError> {
        let opts = AttachContainerOptionsBuilder::default()
            .stream(true)
            .stdout(true)
            .stderr(true)
            .build();
        let attached = self.docker.attach_container(name, Some(opts)).await?;
        let log = log.clone();
        let input = attached.input;
        Ok(tokio::spawn(async move {
            let _input = input;
            pump_lines(attached.output, log, prefix).await;
        }))
    }

    /// Runs `ready` in the service container until it exits 0, the container
    /// ends, or `by` passes. `Ok(Err(why))` when the service never got ready.
    async fn wait_ready(
        &self,
        name: &str,
        container: &str,
        ready: &[String],
        by: Instant,
    ) -> Result<Result<(), String>, BuildError> {
        let shown = ready.join(" ");
        loop {
            let (code, output) = match self.exec(container, ready).await {
                Ok(r) => r,
                // The daemon refuses to exec in a container that is not running.
                Err(DockerError::DockerResponseServerError { message, .. }) => {
                    if let Some(why) = self.ended(name, container).await? {
                        return Ok(Err(why));
                    }
                    (None, message)
                }
                Err(e) => {
                    return Err(docker_error(format!(
                        "run the readiness command of service `{name}`"
                    ))(e))
                }
            };
            if code == Some(0) {
                return Ok(Ok(()));
            }
            if let Some(why) = self.ended(name, container).await? {
                return Ok(Err(why));
            }
            if Instant::now() + READY_POLL >= by {
                let status = code.map_or("no status".to_owned(), |c| format!("status {c}"));
                let output = output.trim();
                let output = if output.is_empty() {
                    String::new()
                } else {
                    format!(": {output}")
                };
                return Ok(Err(format!(
                    "Service `{name}` was not ready after {}s: `{shown}` last ended with {status}{output}",
                    READY_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// Runs a command in a running container; its exit code and the last of its output.
    async fn exec(
        &self,
        container: &str,
        cmd: &[String],
    ) -> Result<(Option<i64>, String), DockerError> {
        let created = self
            .docker
            .create_exec(
                container,
                CreateExecOptions {
                    cmd: Some(cmd.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..CreateExecOptions::default()
                },
            )
            .await?;
        let mut text = Vec::new();
        if let StartExecResults::Attached { mut output, .. } =
            self.docker.start_exec(&created.id, None).await?
        {
            while let Some(item) = output.next().await {
                if let Ok(chunk) = item {
                    text.extend_from_slice(chunk.as_ref());
                    if text.len() > 4096 {
                        text.drain(..text.len() - 4096);
                    }
                }
            }
        }
        let inspected = self.docker.inspect_exec(&created.id).await?;
        let text = String::from_utf8_lossy(&text).replace('\n', " ");
        Ok((inspected.exit_code, text))
    }

    /// `Some(why)` when a service container is no longer running.
    async fn ended(&self, name: &str, container: &str) -> Result<Option<String>, BuildError> {
        let inspected = self
            .docker
            .inspect_container(container, None)
            .await
            .map_err(docker_error(format!("inspect service `{name}`")))?;
        let state = inspected.state.unwrap_or_default();
        if state.running == Some(true) {
            return Ok(None);
        }
        let code = state.exit_code.unwrap_or(-1);
        Ok(Some(format!(
            "Service `{name}` exited with status {code} before it was ready"
        )))
    }
}

#[async_trait::async_trait]
impl Executor for DockerExecutor {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn platform(&self) -> String {
        self.platform.clone()
    }

    /// The image's id (`sha256:…`). A missing image is pulled when a registry
    /// answers; otherwise [`BuildError::ImageUnavailable`] names it.
    async fn resolve_image(&self, image: &str) -> Result<String, BuildError> {
        let inspect = |image: String| async move {
            match self.docker.inspect_image(&image).await {
                Ok(i) => Ok(i.id),
                Err(DockerError::DockerResponseServerError {
                    status_code: 404, ..
                }) => Ok(None),
                Err(e) => Err(docker_error(format!("inspect image `{image}`"))(e)),
            }
        };
        if let Some(id) = inspect(image.to_owned()).await? {
            return Ok(id);
        }
        self.pull(image).await?;
        inspect(image.to_owned())
            .await?
            .ok_or_else(|| BuildError::ImageUnavailable {
                image: image.to_owned(),
                registry: registry_of(image),
                source: DockerError::DockerStreamError {
                    error: "the pull ended but the image is still missing".into(),
                },
            })
    }

    async fn run(&self, req: ExecRequest) -> Result<ExecOutcome, BuildError> {
        let Some(image) = req.image.clone() else {
            return Ok(fail(
                &req.log,
                "The task has no `image`, which the `docker` executor needs; add `image = \"…\"` or run it with `executor = \"host\"`".into(),
            ));
        };
        if req.argv.first().is_none_or(|p| p.is_empty()) {
            return Ok(fail(&req.log, "The command is empty".into()));
        }
        let stop = Stopper {
            cancel: req.cancel.clone(),
            deadline: req.timeout.map(|t| tokio::time::Instant::now() + t),
        };
        let mut set = ContainerSet::new(self.docker.clone(), req.log.clone());
        let outcome = self.run_set(&req, &image, &stop, &mut set).await;
        set.remove_all().await;
        outcome
    }
}

/// Why a task stopped before its command ended.
#[derive(Clone, Copy)]
enum Stopped {
    Timeout,
    Cancel,
}

impl Stopped {
    fn outcome(self) -> ExecOutcome {
        ExecOutcome {
            timed_out: matches!(self, Stopped::Timeout),
            cancelled: matches!(self, Stopped::Cancel),
            ..ExecOutcome::default()
        }
    }
}

/// The two reasons to stop early: the task's deadline and cancellation.
struct Stopper {
    cancel: tokio_util::sync::CancellationToken,
    deadline: Option<tokio::time::Instant>,
}

impl Stopper {
    fn now(&self) -> Option<Stopped> {
        if self.cancel.is_cancelled() {
            Some(Stopped::Cancel)
        } else if self
            .deadline
            .is_some_and(|d| tokio::time::Instant::now() >= d)
        {
            Some(Stopped::Timeout)
        } else {
            None
        }
    }

    async fn wait(&self) -> Stopped {
        let deadline = async {
            match self.deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.cancel.cancelled() => Stopped::Cancel,
            _ = deadline => Stopped::Timeout,
        }
    }
}

/// Everything made for one task: removed by [`ContainerSet::remove_all`],
/// or, should the task's future be dropped first, by a cleanup spawned on drop.
struct ContainerSet {
    docker: Docker,
    log: LogSink,
    /// Names, registered before each container is created.
    containers: Vec<String>,
    network: Option<String>,
    pumps: Vec<JoinHandle<()>>,
}

impl ContainerSet {
    fn new(docker: Docker, log: LogSink) -> ContainerSet {
        ContainerSet {
            docker,
            log,
            containers: Vec::new(),
            network: None,
            pumps: Vec::new(),
        }
    }

    /// Kills and removes the containers, then the network, then lets the
    /// log streams drain. Failures are written to the task's log.
    async fn remove_all(&mut self) {
        let containers = std::mem::take(&mut self.containers);
        let network = self.network.take();
        for problem in remove(&self.docker, containers, network).await {
            self.log.line(Stream::Stderr, problem.as_bytes());
        }
        for pump in std::mem::take(&mut self.pumps) {
            drain(pump).await;
        }
    }
}

impl Drop for ContainerSet {
    fn drop(&mut self) {
        if self.containers.is_empty() && self.network.is_none() {
            return;
        }
        let containers = std::mem::take(&mut self.containers);
        let network = self.network.take();
        let docker = self.docker.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                remove(&docker, containers, network).await;
            });
        }
    }
}

/// Force-removes `containers` (killing them), then `network`. Returns a
/// message per failure; objects already gone are not failures.
async fn remove(docker: &Docker, containers: Vec<String>, network: Option<String>) -> Vec<String> {
    let removals = containers.iter().map(|c| async move {
        match docker.remove_container(c, Some(force_remove())).await {
            Ok(())
            | Err(DockerError::DockerResponseServerError {
                status_code: 404, ..
            }) => None,
            Err(e) => Some(format!("warning: cannot remove container `{c}`: {e}")),
        }
    });
    let mut problems: Vec<String> = futures_util::future::join_all(removals)
        .await
        .into_iter()
        .flatten()
        .collect();
    if let Some(n) = network {
        // Endpoints of just-removed containers may take a moment to go.
        let mut tries = 0;
        loop {
            match docker.remove_network(&n).await {
                Ok(())
                | Err(DockerError::DockerResponseServerError {
                    status_code: 404, ..
                }) => break,
                Err(e) => {
                    tries += 1;
                    if tries == 5 {
                        problems.push(format!("warning: cannot remove network `{n}`: {e}"));
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
            }
        }
    }
    problems
}

fn force_remove() -> bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::default()
        .force(true)
        .v(true)
        .build()
}

/// Waits for a log pump to finish, for a bounded time.
async fn drain(mut pump: JoinHandle<()>) {
    if tokio::time::timeout(DRAIN_WAIT, &mut pump).await.is_err() {
        pump.abort();
    }
}

type LogStream = Pin<Box<dyn FuturesStream<Item = Result<LogOutput, DockerError>> + Send>>;

/// Splits a container's multiplexed output into lines for `log`.
async fn pump_lines(mut output: LogStream, log: LogSink, prefix: Option<String>) {
    let mut out = LineBuf::new(Stream::Stdout, prefix.clone());
    let mut err = LineBuf::new(Stream::Stderr, prefix);
    while let Some(item) = output.next().await {
        match item {
            Ok(LogOutput::StdOut { message }) | Ok(LogOutput::Console { message }) => {
                out.push(&message, &log)
            }
            Ok(LogOutput::StdErr { message }) => err.push(&message, &log),
            Ok(LogOutput::StdIn { .. }) => {}
            Err(_) => break,
        }
    }
    out.flush(&log);
    err.flush(&log);
}

/// One stream's partial line.
struct LineBuf {
    stream: Stream,
    prefix: Option<String>,
    buf: Vec<u8>,
}

impl LineBuf {
    fn new(stream: Stream, prefix: Option<String>) -> LineBuf {
        LineBuf {
            stream,
            prefix,
            buf: Vec::new(),
        }
    }

    fn push(&mut self, bytes: &[u8], log: &LogSink) {
        self.buf.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            self.emit(start, end, log);
            start = end + 1;
        }
        self.buf.drain(..start);
        if self.buf.len() > MAX_LINE {
            self.emit(0, self.buf.len(), log);
            self.buf.clear();
        }
    }

    fn emit(&self, start: usize, end: usize, log: &LogSink) {
        let line = &self.buf[start..end];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match &self.prefix {
            Some(p) => {
                let mut l = p.as_bytes().to_vec();
                l.extend_from_slice(line);
                log.line(self.stream, &l);
            }
            None => log.line(self.stream, line),
        }
    }

    fn flush(&mut self, log: &LogSink) {
        if !self.buf.is_empty() {
            self.emit(0, self.buf.len(), log);
            self.buf.clear();
        }
    }
}

/// A read-only or read-write bind mount of a host path.
fn bind(source: &Path, target: &str, read_only: bool) -> Result<Mount, BuildError> {
    // The daemon needs absolute paths; resolve symlinks the same way it would.
    let source = std::fs::canonicalize(source).map_err(BuildError::io("find", source))?;
    Ok(Mount {
        target: Some(target.to_owned()),
        source: Some(source.to_string_lossy().into_owned()),
        typ: Some(MountType::BIND),
        read_only: Some(read_only),
        ..Mount::default()
    })
}

fn is_root(user: &str) -> bool {
    matches!(user.split(':').next(), Some("0" | "root"))
}

/// Writes `msg` to the task's log and makes it the reason the task could not run.
fn fail(log: &LogSink, msg: String) -> ExecOutcome {
    log.line(Stream::Stderr, msg.as_bytes());
    ExecOutcome {
        spawn_error: Some(msg),
        ..ExecOutcome::default()
    }
}

/// A refusal of the daemon (bad user, missing path…) fails the task; any
/// other error means the executor cannot work.
fn refused(log: &LogSink, what: &str, e: DockerError) -> Result<ExecOutcome, BuildError> {
    match e {
        DockerError::DockerResponseServerError { message, .. } => {
            Ok(fail(log, format!("Cannot {what}: {message}")))
        }
        e => Err(docker_error(what.to_owned())(e)),
    }
}

fn docker_error(action: impl Into<String>) -> impl FnOnce(DockerError) -> BuildError {
    let action = action.into();
    move |source| BuildError::Docker { action, source }
}

/// `name` → `name:latest`; a reference with a tag or digest is kept.
/// (Pulling a reference without a tag would pull every tag.)
fn with_tag(image: &str) -> String {
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || last.contains(':') {
        image.to_owned()
    } else {
        format!("{image}:latest")
    }
}

/// The registry an image reference points at (`docker.io` when it names none).
fn registry_of(image: &str) -> String {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first.to_owned()
        }
        _ => "docker.io".to_owned(),
    }
}

/// The `ci` process that owns containers: its host, pid and start time (so
/// a reused pid is not mistaken for the original process).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Session {
    host: String,
    pid: u32,
    start: u64,
}

impl Session {
    fn current() -> Session {
        let pid = std::process::id();
        Session {
            host: hostname(),
            pid,
            start: process_start(pid).unwrap_or(0),
        }
    }

    fn id(&self) -> String {
        format!("{}/{}/{}", self.host, self.pid, self.start)
    }

    fn parse(s: &str) -> Option<Session> {
        let mut parts = s.rsplitn(3, '/');
        let start = parts.next()?.parse().ok()?;
        let pid = parts.next()?.parse().ok()?;
        let host = parts.next()?.to_owned();
        Some(Session { host, pid, start })
    }

    fn is_alive(&self) -> bool {
        process_start(self.pid) == Some(self.start)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A process's start time in clock ticks since boot (`/proc/<pid>/stat`, field 22).
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: skip past the last `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        assert_eq!(with_tag("busybox"), "busybox:latest");
        assert_eq!(
            with_tag("strata-test/busybox:latest"),
            "strata-test/busybox:latest"
        );
        assert_eq!(with_tag("localhost:5000/x"), "localhost:5000/x:latest");
        assert_eq!(with_tag("localhost:5000/x:1"), "localhost:5000/x:1");
        assert_eq!(with_tag("x@sha256:abcd"), "x@sha256:abcd");
    }

    #[test]
    fn registries() {
        assert_eq!(registry_of("busybox"), "docker.io");
        assert_eq!(registry_of("strata-test/busybox:latest"), "docker.io");
        assert_eq!(registry_of("ghcr.io/a/b"), "ghcr.io");
        assert_eq!(registry_of("localhost:5000/x"), "localhost:5000");
    }

    #[test]
    fn sessions() {
        let me = Session::current();
        assert!(me.is_alive());
        assert_eq!(Session::parse(&me.id()), Some(me.clone()));
        let gone = Session {
            start: me.start + 1,
            ..me
        };
        assert!(!gone.is_alive());
        assert_eq!(Session::parse("a/b/c"), None);
    }

    #[test]
    fn roots() {
        assert!(is_root("0:0"));
        assert!(is_root("root"));
        assert!(!is_root("65534"));
        assert!(!is_root("nobody:nogroup"));
    }
}
