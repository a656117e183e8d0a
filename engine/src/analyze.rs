//! Analysis of a run (`ci analyze`, `GET /api/v1/runs/{id}/analysis`): its
//! critical path from the recorded durations, parallelism per dependency
//! level, pure tasks that never hit the cache across the store's history,
//! and impure tasks on the critical path.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::model::{TaskKind, Workspace};
use crate::record::{RunRecord, TaskState};
use crate::{Graph, Label};

/// What `ci analyze` says of one run.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Analysis {
    pub run: String,
    /// Wall time of the run.
    pub duration_ms: u64,
    /// The chain of dependent tasks whose durations add up to the most,
    /// inputs first: no schedule could finish sooner than its sum.
    pub critical_path: Vec<PathStep>,
    pub critical_ms: u64,
    /// Sum of all task durations over the wall time: how parallel the run was.
    pub parallelism: f64,
    /// Tasks by dependency level (0: no inputs), with their summed durations.
    pub levels: Vec<Level>,
    /// Pure tasks that ran in at least two runs of the store, never came
    /// from the cache, and ran at least once although every input came from
    /// the cache: something in their own key changes every time.
    pub never_cached: Vec<NeverCached>,
    /// Impure tasks (or tasks with effects) on the critical path: they run
    /// every time and hold the run up.
    pub impure_on_critical_path: Vec<String>,
    /// Tasks of the run the pipeline no longer has (left out of the graph).
    pub unknown_tasks: Vec<String>,
    /// Whether input access was traced: unused inputs are reported only then.
    pub traced: bool,
}

#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PathStep {
    pub label: String,
    pub duration_ms: u64,
    pub cached: bool,
    pub state: TaskState,
}

#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Level {
    pub level: usize,
    pub tasks: usize,
    pub executed: usize,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NeverCached {
    pub label: String,
    pub runs: usize,
}

/// Analyses `run` over the pipeline `ws` (its graph) and `history` (every
/// run of the store, for cache behaviour over time).
pub fn analyze(ws: &Workspace, run: &RunRecord, history: &[RunRecord]) -> Analysis {
    let graph = Graph::new(ws);
    let order: Vec<&Label> = graph.topo_order();
    let by_text: HashMap<String, &Label> = order.iter().map(|l| (l.to_string(), *l)).collect();
    let in_run: Vec<&Label> = order
        .iter()
        .copied()
        .filter(|l| run.tasks.contains_key(&l.to_string()))
        .collect();
    let unknown_tasks: Vec<String> = run
        .tasks
        .keys()
        .filter(|k| !by_text.contains_key(*k))
        .cloned()
        .collect();
    let dur = |l: &Label| run.tasks.get(&l.to_string()).map_or(0, |t| t.duration_ms);

    // Longest path by duration, and level by edges, in topological order.
    let mut finish: HashMap<&Label, (u64, Option<&Label>)> = HashMap::new();
    let mut level: HashMap<&Label, usize> = HashMap::new();
    for l in &in_run {
        let task = &ws.tasks[*l];
        let mut best: (u64, Option<&Label>) = (0, None);
        let mut lv = 0;
        for i in task.inputs() {
            if let Some(&(f, _)) = finish.get(i) {
                if f >= best.0 {
                    best = (f, Some(i));
                }
            }
            if let Some(&x) = level.get(i) {
                lv = lv.max(x + 1);
            }
        }
        finish.insert(*l, (best.0 + dur(l), best.1));
        level.insert(*l, lv);
    }
    let mut end = in_run
        .iter()
        .copied()
        .max_by_key(|l| finish.get(*l).map_or(0, |f| f.0));
    let mut path = Vec::new();
    while let Some(l) = end {
        let t = &run.tasks[&l.to_string()];
        path.push(PathStep {
            label: l.to_string(),
            duration_ms: t.duration_ms,
            cached: t.cached || t.reused,
            state: t.state,
        });
        end = finish.get(l).and_then(|f| f.1);
    }
    path.reverse();
    let critical_ms = path.iter().map(|p| p.duration_ms).sum();

    let mut levels: BTreeMap<usize, Level> = BTreeMap::new();
    for l in &in_run {
        let t = &run.tasks[&l.to_string()];
        let lv = level[l];
        let e = levels.entry(lv).or_insert(Level {
            level: lv,
            tasks: 0,
            executed: 0,
            duration_ms: 0,
        });
        e.tasks += 1;
        if !t.cached && !t.reused && t.attempts > 0 {
            e.executed += 1;
        }
        e.duration_ms += t.duration_ms;
    }
    let total: u64 = run.tasks.values().map(|t| t.duration_ms).sum();
    let parallelism = if run.duration_ms == 0 {
        0.0
    } else {
        total as f64 / run.duration_ms as f64
    };

    let is_pure = |label: &str| {
        by_text
            .get(label)
            .is_some_and(|l| matches!(&ws.tasks[*l].kind, TaskKind::Run(r) if r.pure && !r.effects))
    };
    // (executed, cache hits, executions whose inputs all came from the cache)
    let mut ran: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    for r in history {
        for (label, t) in &r.tasks {
            if !is_pure(label) || t.reused {
                continue;
            }
            let e = ran.entry(label.as_str()).or_default();
            if t.cached {
                e.1 += 1;
            } else if t.attempts > 0 {
                e.0 += 1;
                let inputs_unchanged = by_text.get(label).is_some_and(|l| {
                    ws.tasks[*l].inputs().iter().all(|i| {
                        r.tasks
                            .get(&i.to_string())
                            .is_some_and(|x| x.cached || x.reused)
                    })
                });
                if inputs_unchanged {
                    e.2 += 1;
                }
            }
        }
    }
    // A task that re-ran although nothing it reads changed has something in
    // its key that changes every time (a secret name, the environment…).
    let never_cached = ran
        .into_iter()
        .filter(|(_, (executed, hits, suspicious))| {
            *executed >= 2 && *hits == 0 && *suspicious >= 1
        })
        .map(|(label, (executed, _, _))| NeverCached {
            label: label.to_owned(),
            runs: executed,
        })
        .collect();
    let impure_on_critical_path = path
        .iter()
        .filter(|p| {
            by_text.get(&p.label).is_some_and(
                |l| matches!(&ws.tasks[*l].kind, TaskKind::Run(r) if !r.pure || r.effects),
            )
        })
        .map(|p| p.label.clone())
        .collect();
    Analysis {
        run: run.id.clone(),
        duration_ms: run.duration_ms,
        critical_path: path,
        critical_ms,
        parallelism,
        levels: levels.into_values().collect(),
        never_cached,
        impure_on_critical_path,
        unknown_tasks,
        traced: false,
    }
}
