//! The DAG view of a [`Workspace`]: order, closures, stage gating, and `ci graph` output.
//!
//! Everything here is deterministic: ties are broken by label order, so the same
//! workspace always prints the same graph and schedules in the same order.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Invalid, ModelError};
use crate::label::{Label, Pattern};
use crate::model::{Stage, Task, TaskKind, Workspace};

/// Index over a workspace's tasks and the edges between them.
///
/// Edges to labels that are not in the workspace are ignored (a validated workspace has
/// none). On a graph with a cycle, [`Graph::topo_order`] leaves out the tasks on and after it.
pub struct Graph<'w> {
    ws: &'w Workspace,
    labels: Vec<&'w Label>,
    index: HashMap<&'w Label, usize>,
    inputs: Vec<Vec<usize>>,
    users: Vec<Vec<usize>>,
    /// The tasks of each stage, in label order.
    members: HashMap<&'w String, Vec<&'w Label>>,
}

impl<'w> Graph<'w> {
    pub fn new(ws: &'w Workspace) -> Graph<'w> {
        let labels: Vec<&Label> = ws.tasks.keys().collect();
        let index: HashMap<&Label, usize> =
            labels.iter().enumerate().map(|(i, l)| (*l, i)).collect();
        let mut inputs = vec![Vec::new(); labels.len()];
        let mut users = vec![Vec::new(); labels.len()];
        for (i, task) in ws.tasks.values().enumerate() {
            for input in task.inputs() {
                if let Some(&j) = index.get(input) {
                    inputs[i].push(j);
                    users[j].push(i);
                }
            }
        }
        for list in users.iter_mut() {
            list.sort_unstable();
            list.dedup();
        }
        let mut members: HashMap<&String, Vec<&Label>> = HashMap::new();
        for (label, task) in &ws.tasks {
            if let Some(stage) = &task.stage {
                members.entry(stage).or_default().push(label);
            }
        }
        Graph {
            ws,
            labels,
            index,
            inputs,
            users,
            members,
        }
    }

    pub fn workspace(&self) -> &'w Workspace {
        self.ws
    }

    pub fn contains(&self, label: &Label) -> bool {
        self.index.contains_key(label)
    }

    /// The tasks `label` reads (deps, transform, merge base and sides), each once.
    pub fn inputs_of(&self, label: &Label) -> Vec<&'w Label> {
        self.index
            .get(label)
            .map(|&i| self.inputs[i].iter().map(|&j| self.labels[j]).collect())
            .unwrap_or_default()
    }

    /// The tasks that read `label` directly, in label order.
    pub fn users_of(&self, label: &Label) -> Vec<&'w Label> {
        self.index
            .get(label)
            .map(|&i| self.users[i].iter().map(|&j| self.labels[j]).collect())
            .unwrap_or_default()
    }

    /// Every task, inputs before the tasks that read them; among tasks that are ready at
    /// the same time, label order.
    pub fn topo_order(&self) -> Vec<&'w Label> {
        self.order_of(&(0..self.labels.len()).collect::<Vec<_>>())
    }

    /// Like [`Graph::topo_order`], restricted to `subset` (edges leaving it are ignored).
    pub fn topo_order_of(&self, subset: &BTreeSet<&Label>) -> Vec<&'w Label> {
        let ids: Vec<usize> = subset
            .iter()
            .filter_map(|l| self.index.get(*l).copied())
            .collect();
        self.order_of(&ids)
    }

    fn order_of(&self, ids: &[usize]) -> Vec<&'w Label> {
        let member: HashMap<usize, ()> = ids.iter().map(|&i| (i, ())).collect();
        let mut missing: HashMap<usize, usize> = HashMap::new();
        let mut ready = BTreeSet::new();
        for &i in ids {
            let n = self.inputs[i]
                .iter()
                .filter(|j| member.contains_key(j))
                .count();
            if n == 0 {
                ready.insert(i);
            } else {
                missing.insert(i, n);
            }
        }
        let mut out = Vec::with_capacity(ids.len());
        while let Some(i) = ready.pop_first() {
            out.push(self.labels[i]);
            for &u in &self.users[i] {
                if let Some(n) = missing.get_mut(&u) {
                    *n -= 1;
                    if *n == 0 {
                        missing.remove(&u);
                        ready.insert(u);
                    }
                }
            }
        }
        out
    }

    /// `targets` and everything they read, transitively. Unknown targets are ignored
    /// (use [`expand`] first to refuse them).
    pub fn deps_closure(&self, targets: &[Label]) -> BTreeSet<&'w Label> {
        self.walk(targets, &self.inputs)
    }

    /// `changed` and every task downstream of them: what re-executes when they change.
    pub fn downstream(&self, changed: &[Label]) -> BTreeSet<&'w Label> {
        self.walk(changed, &self.users)
    }

    fn walk(&self, start: &[Label], edges: &[Vec<usize>]) -> BTreeSet<&'w Label> {
        let mut seen = vec![false; self.labels.len()];
        let mut stack: Vec<usize> = start
            .iter()
            .filter_map(|l| self.index.get(l).copied())
            .collect();
        let mut out = BTreeSet::new();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            out.insert(self.labels[i]);
            stack.extend(edges[i].iter().copied().filter(|&j| !seen[j]));
        }
        out
    }

    /// The tasks that must succeed before `label` may start because of stages: every task
    /// of the stages listed in `after` of its stage, limited to `within` (the run's tasks)
    /// when given. Does not include data inputs.
    pub fn stage_gates(&self, label: &Label, within: Option<&BTreeSet<&Label>>) -> Vec<&'w Label> {
        let Some(stage) = self.ws.tasks.get(label).and_then(|t| t.stage.as_ref()) else {
            return Vec::new();
        };
        let Some(stage) = self.ws.stages.get(stage) else {
            return Vec::new();
        };
        let mut gates: Vec<&'w Label> = stage
            .after
            .iter()
            .filter_map(|s| self.members.get(s))
            .flatten()
            .copied()
            .filter(|l| within.is_none_or(|w| w.contains(l)))
            .collect();
        gates.sort();
        gates.dedup();
        gates
    }

    /// A dependency cycle, if any: the labels along it, the first repeated at the end.
    pub fn find_cycle(&self) -> Option<Vec<&'w Label>> {
        find_cycle(self.labels.len(), |i| &self.inputs[i])
            .map(|path| path.into_iter().map(|i| self.labels[i]).collect())
    }

    /// Labels indexed by the node ids used internally (label order).
    pub(crate) fn node_labels(&self) -> &[&'w Label] {
        &self.labels
    }

    pub(crate) fn node_inputs(&self, i: usize) -> &[usize] {
        &self.inputs[i]
    }
}

/// Finds a cycle in the graph `0..n` with successors `succ`, searching from nodes in
/// order so the answer is deterministic. Returns the path with its first node repeated
/// at the end. Iterative, so long chains do not overflow the stack.
pub(crate) fn find_cycle<'a>(n: usize, succ: impl Fn(usize) -> &'a [usize]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; n];
    for start in 0..n {
        if mark[start] != Mark::New {
            continue;
        }
        // (node, next successor position)
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = Mark::Open;
        while let Some(&mut (node, ref mut pos)) = stack.last_mut() {
            let next = succ(node).get(*pos).copied();
            *pos += 1;
            match next {
                None => {
                    mark[node] = Mark::Done;
                    stack.pop();
                }
                Some(s) => match mark[s] {
                    Mark::New => {
                        mark[s] = Mark::Open;
                        stack.push((s, 0));
                    }
                    Mark::Open => {
                        let from = stack.iter().position(|&(v, _)| v == s).unwrap_or(0);
                        let mut path: Vec<usize> = stack[from..].iter().map(|&(v, _)| v).collect();
                        path.push(s);
                        return Some(path);
                    }
                    Mark::Done => {}
                },
            }
        }
    }
    None
}

/// The tasks named by `patterns`, sorted and without repeats.
///
/// A single target that is not in the workspace is [`Invalid::UnknownTarget`]; a
/// package or recursive pattern that matches nothing is [`Invalid::NoMatch`].
pub fn expand(ws: &Workspace, patterns: &[Pattern]) -> Result<Vec<Label>, ModelError> {
    let mut out = BTreeSet::new();
    for pattern in patterns {
        match pattern {
            Pattern::Target(label) => {
                if !ws.tasks.contains_key(label) {
                    return Err(ModelError::new(
                        None,
                        Invalid::UnknownTarget {
                            from: None,
                            label: label.clone(),
                            known: names_in_package(ws, label.package()),
                        },
                    ));
                }
                out.insert(label.clone());
            }
            _ => {
                let mut any = false;
                for label in ws.tasks.keys().filter(|l| pattern.matches(l)) {
                    any = true;
                    out.insert(label.clone());
                }
                if !any {
                    return Err(ModelError::new(None, Invalid::NoMatch(pattern.to_string())));
                }
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// The names of the tasks of `package`, sorted (for "did you mean" messages).
pub(crate) fn names_in_package(ws: &Workspace, package: &str) -> Vec<String> {
    ws.tasks
        .keys()
        .filter(|l| l.package() == package)
        .map(|l| l.name().to_owned())
        .collect()
}

/// An output format of `ci graph`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphFormat {
    /// Graphviz; data flows from inputs to the tasks that read them.
    Dot,
    /// A Mermaid flowchart, for Markdown.
    Mermaid,
    /// [`GraphJson`], pretty-printed.
    Json,
}

impl FromStr for GraphFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<GraphFormat, String> {
        match s {
            "dot" => Ok(GraphFormat::Dot),
            "mermaid" => Ok(GraphFormat::Mermaid),
            "json" => Ok(GraphFormat::Json),
            _ => Err(format!(
                "Unknown graph format `{s}`; use `dot`, `mermaid` or `json`"
            )),
        }
    }
}

/// `ci graph --json`: the tasks `targets` need, in the model's own types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphJson {
    /// The requested tasks.
    pub targets: Vec<Label>,
    /// Every task below, inputs first (the order a one-at-a-time run would take).
    pub order: Vec<Label>,
    pub tasks: BTreeMap<Label, Task>,
    pub stages: BTreeMap<String, Stage>,
}

/// Renders the tasks `targets` need (all tasks when `targets` is empty) in `format`.
/// Deterministic: the same workspace and targets give the same bytes.
pub fn render_graph(ws: &Workspace, targets: &[Label], format: GraphFormat) -> String {
    let graph = Graph::new(ws);
    let selected: BTreeSet<&Label> = if targets.is_empty() {
        ws.tasks.keys().collect()
    } else {
        graph.deps_closure(targets)
    };
    match format {
        GraphFormat::Dot => render_dot(ws, &selected),
        GraphFormat::Mermaid => render_mermaid(ws, &selected),
        GraphFormat::Json => {
            let json = GraphJson {
                targets: if targets.is_empty() {
                    ws.tasks.keys().cloned().collect()
                } else {
                    targets.to_vec()
                },
                order: graph
                    .topo_order_of(&selected)
                    .into_iter()
                    .cloned()
                    .collect(),
                tasks: selected
                    .iter()
                    .map(|l| ((*l).clone(), ws.tasks[*l].clone()))
                    .collect(),
                stages: ws.stages.clone(),
            };
            let mut text = serde_json::to_string_pretty(&json).unwrap_or_default();
            text.push('\n');
            text
        }
    }
}

/// One edge of the picture: from an input to the task reading it, and why.
fn edges(task: &Task) -> Vec<(&Label, String, EdgeKind)> {
    let mut out = Vec::new();
    for dep in &task.deps {
        out.push((&dep.label, dep.mount.clone(), EdgeKind::Dep));
    }
    if let Some(t) = &task.transform {
        out.push((t, "transform".to_owned(), EdgeKind::Base));
    }
    if let TaskKind::Merge(m) = &task.kind {
        out.push((&m.base, "base".to_owned(), EdgeKind::Base));
        for side in &m.sides {
            out.push((side, "side".to_owned(), EdgeKind::Side));
        }
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum EdgeKind {
    Dep,
    Base,
    Side,
}

/// The stages in an order where each comes after the stages in its `after`; among
/// stages that are ready at the same time, name order. Stages on a cycle are left out
/// (a validated workspace has none).
pub fn stage_order(ws: &Workspace) -> Vec<&str> {
    let mut missing: BTreeMap<&str, usize> = BTreeMap::new();
    let mut ready: BTreeSet<&str> = BTreeSet::new();
    for (name, stage) in &ws.stages {
        let n = stage
            .after
            .iter()
            .filter(|a| ws.stages.contains_key(*a))
            .count();
        if n == 0 {
            ready.insert(name);
        } else {
            missing.insert(name, n);
        }
    }
    let mut out = Vec::with_capacity(ws.stages.len());
    while let Some(name) = ready.pop_first() {
        out.push(name);
        for (other, stage) in &ws.stages {
            if stage.after.iter().any(|a| a == name) {
                if let Some(n) = missing.get_mut(other.as_str()) {
                    *n -= 1;
                    if *n == 0 {
                        missing.remove(other.as_str());
                        ready.insert(other);
                    }
                }
            }
        }
    }
    out
}

/// Groups the selected tasks by stage: tasks without a stage first, then stages in
/// [`stage_order`] (unknown stages last, by name); each group in label order.
fn by_stage<'a>(
    ws: &'a Workspace,
    selected: &BTreeSet<&'a Label>,
) -> Vec<(Option<&'a str>, Vec<&'a Label>)> {
    let rank: HashMap<&str, usize> = stage_order(ws)
        .into_iter()
        .enumerate()
        .map(|(i, s)| (s, i))
        .collect();
    let mut groups: BTreeMap<(usize, Option<&str>), Vec<&Label>> = BTreeMap::new();
    for label in selected {
        let stage = ws.tasks[*label].stage.as_deref();
        let key = match stage {
            None => 0,
            Some(s) => 1 + rank.get(s).copied().unwrap_or(usize::MAX - 1),
        };
        groups.entry((key, stage)).or_default().push(label);
    }
    groups
        .into_iter()
        .map(|((_, stage), labels)| (stage, labels))
        .collect()
}

fn quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_dot(ws: &Workspace, selected: &BTreeSet<&Label>) -> String {
    let mut out = String::new();
    out.push_str("digraph strata {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n");
    for (stage, labels) in by_stage(ws, selected) {
        let indent = if stage.is_some() { "    " } else { "  " };
        if let Some(stage) = stage {
            let after = ws
                .stages
                .get(stage)
                .map(|s| s.after.join(", "))
                .unwrap_or_default();
            let title = if after.is_empty() {
                format!("stage {stage}")
            } else {
                format!("stage {stage} (after {after})")
            };
            let _ = writeln!(
                out,
                "  subgraph {} {{\n    label={};",
                quoted(&format!("cluster_{stage}")),
                quoted(&title)
            );
        }
        for label in labels {
            let task = &ws.tasks[label];
            let shape = match task.kind {
                TaskKind::Run(_) => "box",
                TaskKind::Merge(_) => "hexagon",
                TaskKind::LocalSource(_) | TaskKind::GitSource(_) => "folder",
                TaskKind::Timer(_) | TaskKind::Webhook(_) => "cds",
            };
            let _ = writeln!(
                out,
                "{indent}{} [label={}, shape={shape}];",
                quoted(&label.to_string()),
                quoted(&format!("{label}\n{}", task.kind_name()))
            );
        }
        if stage.is_some() {
            out.push_str("  }\n");
        }
    }
    for label in selected {
        for (input, name, kind) in edges(&ws.tasks[*label]) {
            if !selected.contains(input) {
                continue;
            }
            let style = match kind {
                EdgeKind::Dep => "",
                EdgeKind::Base => ", style=bold",
                EdgeKind::Side => ", style=dashed",
            };
            let _ = writeln!(
                out,
                "  {} -> {} [label={}{style}];",
                quoted(&input.to_string()),
                quoted(&label.to_string()),
                quoted(&name)
            );
        }
    }
    out.push_str("}\n");
    out
}

fn render_mermaid(ws: &Workspace, selected: &BTreeSet<&Label>) -> String {
    let ids: HashMap<&Label, String> = selected
        .iter()
        .enumerate()
        .map(|(i, l)| (*l, format!("t{i}")))
        .collect();
    let mut out = String::from("flowchart LR\n");
    let groups = by_stage(ws, selected);
    let drawn: BTreeSet<&str> = groups.iter().filter_map(|(s, _)| *s).collect();
    // Stage names may hold `-`, which Mermaid ids may not: number them instead.
    let stage_ids: HashMap<&str, String> = ws
        .stages
        .keys()
        .enumerate()
        .map(|(i, name)| (name.as_str(), format!("s{i}")))
        .collect();
    for (stage, labels) in &groups {
        let indent = if stage.is_some() { "    " } else { "  " };
        if let Some(stage) = stage {
            let id = stage_ids
                .get(stage)
                .cloned()
                .unwrap_or_else(|| format!("stage_{stage}"));
            let _ = writeln!(out, "  subgraph {id} [\"stage {stage}\"]");
        }
        for label in labels {
            let text = format!("{label}");
            let node = match ws.tasks[*label].kind {
                TaskKind::Run(_) => format!("[\"{text}\"]"),
                TaskKind::Merge(_) => format!("{{{{\"{text}\"}}}}"),
                TaskKind::LocalSource(_) | TaskKind::GitSource(_) => format!("[/\"{text}\"/]"),
                TaskKind::Timer(_) | TaskKind::Webhook(_) => format!("([\"{text}\"])"),
            };
            let _ = writeln!(out, "{indent}{}{node}", ids[*label]);
        }
        if stage.is_some() {
            out.push_str("  end\n");
        }
    }
    for label in selected {
        for (input, name, kind) in edges(&ws.tasks[*label]) {
            let Some(from) = ids.get(input) else { continue };
            let arrow = match kind {
                EdgeKind::Dep => "-->",
                EdgeKind::Base => "==>",
                EdgeKind::Side => "-.->",
            };
            let _ = writeln!(out, "  {from} {arrow}|{name}| {}", ids[*label]);
        }
    }
    // Stage order, between the stages that are drawn.
    for (name, stage) in &ws.stages {
        if !drawn.contains(name.as_str()) {
            continue;
        }
        for after in &stage.after {
            if !drawn.contains(after.as_str()) {
                continue;
            }
            if let (Some(from), Some(to)) =
                (stage_ids.get(after.as_str()), stage_ids.get(name.as_str()))
            {
                let _ = writeln!(out, "  {from} -.->|then| {to}");
            }
        }
    }
    out
}
