//! What the tests leave behind: every namespace and bpffs pin directory they make is named
//! `lbt-...` (`lb_tests::unique`) and removed by a guard when the test ends. `cargo xtask
//! test` ends by looking for any that survived, removes them, and fails if there were some.
use std::{path::Path, process::Command};

/// The prefix of every name a test gives a namespace or pin directory.
const PREFIX: &str = "lbt-";
const BPFFS: &str = "/sys/fs/bpf";

/// Network namespaces and pin directories of the tests still there.
pub fn find() -> Vec<String> {
    let mut found = Vec::new();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some(name) = line
                .split_whitespace()
                .next()
                .filter(|n| n.starts_with(PREFIX))
            {
                found.push(format!("namespace {name}"));
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(BPFFS) {
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(PREFIX) {
                found.push(format!("pins {BPFFS}/{name}"));
            }
        }
    }
    found
}

/// Removes what [`find`] reported.
pub fn remove(found: &[String]) {
    for what in found {
        if let Some(ns) = what.strip_prefix("namespace ") {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        } else if let Some(dir) = what.strip_prefix("pins ") {
            let _ = std::fs::remove_dir_all(Path::new(dir));
        }
    }
}

/// Fails, after removing them, if the tests left anything behind.
pub fn check() -> anyhow::Result<()> {
    let found = find();
    if found.is_empty() {
        return Ok(());
    }
    for what in &found {
        eprintln!("left behind by the tests: {what}");
    }
    remove(&found);
    anyhow::bail!(
        "the tests left {} namespaces or pin directories behind (removed now)",
        found.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root, as `cargo xtask test` runs it.
    #[test]
    fn finds_and_removes_a_namespace_and_a_pin_directory() {
        let name = format!("{PREFIX}xtask-probe-{}", std::process::id());
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        let pins = Path::new(BPFFS).join(&name);
        std::fs::create_dir(&pins).unwrap();
        let found: Vec<String> = find().into_iter().filter(|f| f.contains(&name)).collect();
        assert_eq!(
            found,
            [
                format!("namespace {name}"),
                format!("pins {}", pins.display())
            ]
        );
        remove(&found);
        assert!(
            !find().iter().any(|f| f.contains(&name)),
            "still there: {:?}",
            find()
        );
        assert!(!pins.exists());
    }
}
