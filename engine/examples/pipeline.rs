//! The engine as a library: a pipeline declared in Rust (no `BUILD.star`),
//! validated by the same gate as Starlark, built against a store in memory,
//! and its outputs printed. Run it with
//! `cargo build --workspace --examples && target/debug/examples/pipeline`
//! (`cargo test --workspace` builds it; `tests/tests/example.rs` runs it).

use std::collections::BTreeMap;

use strata_engine::{
    BuildOptions, Command, Dep, Engine, EventSink, Label, Run, Task, TaskKind, TaskState, Workspace,
};
use strata_store::{Entry, RelPath, Store};
use tokio_util::sync::CancellationToken;

fn task(
    name: &str,
    script: &str,
    deps: &[(&str, &str)],
) -> Result<Task, Box<dyn std::error::Error>> {
    Ok(Task {
        label: Label::new("", name)?,
        kind: TaskKind::Run(Run::new(Command::Script(script.to_owned()))),
        deps: deps
            .iter()
            .map(|(mount, dep)| {
                Ok(Dep {
                    mount: (*mount).to_owned(),
                    label: Label::new("", *dep)?,
                })
            })
            .collect::<Result<_, strata_engine::LabelError>>()?,
        transform: None,
        stage: None,
        location: None,
    })
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut ws = Workspace::default();
    ws.insert_task(task(
        "words",
        "printf 'layers\\nare\\nimmutable\\n' > words.txt",
        &[],
    )?)?;
    ws.insert_task(task(
        "count",
        "wc -l < \"$CI_IN/w/words.txt\" | tr -d ' ' > count.txt",
        &[("w", "words")],
    )?)?;
    ws.validate()?;

    let store = Store::memory();
    let events = EventSink::new(|e| {
        if let strata_engine::Event::TaskFinished { label, state, .. } = e {
            eprintln!("{label}: {}", state.as_str());
        }
    });
    let engine = Engine::new(store.clone(), ws, events);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let opts = BuildOptions {
        jobs: 2,
        ..BuildOptions::default()
    };
    let run =
        rt.block_on(engine.build(&[Label::new("", "count")?], &opts, CancellationToken::new()))?;
    if run.state != TaskState::Succeeded {
        return Err(format!("the run {}: {:?}", run.state.as_str(), run.tasks).into());
    }
    let outputs: BTreeMap<&String, _> = run
        .tasks
        .iter()
        .filter_map(|(l, t)| Some((l, t.output?)))
        .collect();
    for (label, layer) in &outputs {
        println!("{label} {layer}");
    }
    let count = outputs[&"//:count".to_owned()];
    let Some(Entry::File { digest, .. }) = store.lookup(&count, &RelPath::parse(b"count.txt")?)?
    else {
        return Err("count.txt is missing from the output".into());
    };
    print!(
        "count.txt: {}",
        String::from_utf8_lossy(&store.read_blob(&digest)?)
    );
    Ok(())
}
