//! A container started with Docker reads a bind-mounted LayerFs.
//!
//! Needs FUSE and a Docker daemon with the image named by
//! `STRATA_TEST_IMAGE` (scripts/test builds `strata-test/busybox:latest`).
//! Under `CI=true` a missing one fails the test.

mod common;

use std::process::Command;

use common::*;
use strata_fuse::{mount_layers, AllowOther, Layers, MountOptions};

fn docker_problem(image: &str) -> Option<String> {
    match Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
    {
        Err(e) => Some(format!("cannot run `docker`: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "`docker image inspect {image}` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

#[test]
fn a_docker_container_reads_a_bind_mounted_layer() {
    if !require_fuse("a_docker_container_reads_a_bind_mounted_layer") {
        return;
    }
    let image =
        std::env::var("STRATA_TEST_IMAGE").unwrap_or_else(|_| "strata-test/busybox:latest".into());
    if let Some(p) = docker_problem(&image) {
        if in_ci() {
            panic!("CI=true and Docker is unavailable: {p}");
        }
        eprintln!("a_docker_container_reads_a_bind_mounted_layer: {p}; set CI=true to make this a failure");
        return;
    }
    let t = TestStore::new();
    let src = t.mkdir("src");
    write(&src.join("hello.txt"), b"hello from a layer\n");
    write(&src.join("dir/run.sh"), b"#!/bin/sh\necho ran\n");
    chmod(&src.join("dir/run.sh"), 0o755);
    symlink("hello.txt", &src.join("link"));
    let layer = t.ingest(&src);
    let mnt = t.mkdir("mnt");
    let m = mount_layers(
        &t.store,
        &Layers::One(layer),
        &mnt,
        &MountOptions {
            // The daemon, not this process, opens the mount.
            allow_other: AllowOther::Required,
            ..MountOptions::default()
        },
    )
    .expect("mount");
    let out = Command::new("docker")
        .args(["run", "--rm", "--network", "none", "-v"])
        .arg(format!("{}:/layer:ro", mnt.display()))
        .arg(&image)
        .args([
            "sh",
            "-c",
            "cat /layer/hello.txt && cat /layer/link && /layer/dir/run.sh && ls /layer | wc -l",
        ])
        .output()
        .expect("run docker");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "docker run failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        ["hello from a layer", "hello from a layer", "ran", "3"],
        "{stdout}"
    );
    m.unmount().expect("unmount");
}
