//! `cellctl` against the live control plane (etcd). Built with the `etcd`
//! feature; without it every online command explains how to get it.

use anyhow::Result;

use crate::{OnlineCommand, Target};

#[cfg(not(feature = "etcd"))]
pub(crate) fn run(_target: &Target, _cmd: OnlineCommand) -> Result<()> {
    anyhow::bail!(
        "this cellctl was built without etcd support; build it with the default features (`cargo build -p routing-rules`; etcd is on unless --no-default-features)"
    )
}

#[cfg(feature = "etcd")]
pub(crate) fn run(target: &Target, cmd: OnlineCommand) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(imp::run(target, cmd))
}

#[cfg(feature = "etcd")]
mod imp {
    use anyhow::{Context, Result};
    use routing_rules::edit;
    use routing_rules::etcd::ControlPlane;
    use routing_rules::{diff, parse_rules};

    use super::*;
    use crate::{Output, Reported};

    fn who() -> String {
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        let host = routing_rules::etcd::host_name().unwrap_or_else(|| "localhost".into());
        format!("{user}@{host}")
    }

    async fn connect(target: &Target) -> Result<ControlPlane> {
        let endpoints = target
            .etcd
            .as_deref()
            .context("no etcd endpoints: give --etcd URL[,URL...] or set CELLGATE_ETCD")?;
        let endpoints = routing_rules::etcd::parse_endpoints(endpoints);
        Ok(ControlPlane::connect(&endpoints, &target.cluster).await?)
    }

    /// Applies `new_text` over `current` (text, revision) after printing the diff.
    async fn apply_edit(
        cp: &mut ControlPlane,
        current: Option<(String, u64)>,
        new_text: &str,
        expect: Option<u64>,
        message: &str,
        dry_run: bool,
        output: Output,
    ) -> Result<()> {
        let new_rules = match parse_rules(new_text) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("invalid rules: {e}");
                return Err(Reported.into());
            }
        };
        let (old_text, current_rev) = current.unwrap_or_default();
        let d = if old_text.is_empty() {
            None
        } else {
            Some(diff(
                &parse_rules(&old_text).context("the stored rules do not validate")?,
                &new_rules,
            ))
        };
        let expected = expect.unwrap_or(current_rev);
        // Nothing would change (a failback of an active cell, a document
        // equal to the live one): no new revision, nothing written.
        // (A stale --expect-revision is still a conflict.)
        if d.as_ref().is_some_and(|d| d.is_empty()) && expected == current_rev {
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"applied": false, "no_changes": true, "revision": current_rev})
                ),
                Output::Text => {
                    println!("no changes (the live rules stay at revision {current_rev})")
                }
            }
            return Ok(());
        }
        if dry_run {
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"dry_run": true, "current_revision": current_rev, "diff": d})
                ),
                Output::Text => {
                    println!("dry run against revision {current_rev}; nothing written");
                    print!(
                        "{}",
                        d.map(|d| d.summary())
                            .unwrap_or_else(|| "first version of the rules\n".into())
                    );
                }
            }
            return Ok(());
        }
        match cp.apply(new_text, expected, &who(), message).await {
            Ok(rev) => {
                match output {
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({"applied": true, "revision": rev, "previous_revision": current_rev, "diff": d})
                    ),
                    Output::Text => {
                        print!(
                            "{}",
                            d.map(|d| d.summary())
                                .unwrap_or_else(|| "first version of the rules\n".into())
                        );
                        println!("applied revision {rev}");
                    }
                }
                Ok(())
            }
            Err(e) => {
                eprintln!("cellctl: {e}");
                Err(Reported.into())
            }
        }
    }

    /// A replicated cell (a record under `replication/CELL`) fails over only
    /// to its standby, and only while the shard is recorded in sync (its
    /// standby then holds every acknowledged write); `force` overrides.
    async fn check_replicated_failover(
        cp: &mut ControlPlane,
        cell: &str,
        to: &str,
        force: bool,
    ) -> Result<()> {
        let records = cp.replication().await?;
        let Some(r) = records.get(cell) else {
            return Ok(());
        };
        let standby = r["standby"].as_str().unwrap_or("");
        let state = r["state"].as_str().unwrap_or("unknown");
        let problem = if standby != to {
            Some(format!(
                "cell {cell}'s shard is replicated to {standby}, not {to}: {to} holds none of its data"
            ))
        } else if state != "in-sync" {
            Some(format!(
                "cell {cell}'s shard is recorded {state} (acknowledged LSN {}): {to} may lack acknowledged writes",
                r["acked_lsn"]
            ))
        } else {
            None
        };
        match problem {
            None => Ok(()),
            Some(p) if force => {
                eprintln!("cellctl: warning: {p}; failing over anyway (--force)");
                Ok(())
            }
            Some(p) => {
                eprintln!("cellctl: refused: {p}; nothing changed (--force to fail over anyway, accepting the loss)");
                Err(Reported.into())
            }
        }
    }

    pub(crate) async fn run(target: &Target, cmd: OnlineCommand) -> Result<()> {
        let mut cp = connect(target).await?;
        let current = cp.get().await?.map(|s| (s.document, s.revision));
        let need_current = || -> Result<(String, u64)> {
            current.clone().context(
                "no rules have been applied to this cluster yet (cellctl rules apply FILE)",
            )
        };
        match cmd {
            OnlineCommand::Get { output } => {
                let (text, rev) = need_current()?;
                match output {
                    crate::GetFormat::Toml => print!("{text}"),
                    crate::GetFormat::Json => println!(
                        "{}",
                        serde_json::json!({"revision": rev, "cluster": target.cluster, "document": text})
                    ),
                }
                Ok(())
            }
            OnlineCommand::Apply {
                file,
                dry_run,
                expect_revision,
                message,
                output,
            } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                apply_edit(
                    &mut cp,
                    current,
                    &text,
                    expect_revision,
                    &message,
                    dry_run,
                    output,
                )
                .await
            }
            OnlineCommand::History { output } => {
                let h = cp.history().await?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&h)?),
                    Output::Text => {
                        for e in &h {
                            println!(
                                "revision {:>4}  {}  {}  {}",
                                e.revision, e.applied_at_ms, e.applied_by, e.message
                            );
                        }
                        if h.is_empty() {
                            println!("no revisions yet");
                        }
                    }
                }
                Ok(())
            }
            OnlineCommand::Rollback {
                revision,
                message,
                output,
            } => {
                let old = cp.history_entry(revision).await?;
                let msg = if message.is_empty() {
                    format!("rollback to revision {revision}")
                } else {
                    message
                };
                apply_edit(&mut cp, current, &old.document, None, &msg, false, output).await
            }
            OnlineCommand::Edit {
                edit,
                message,
                output,
            } => {
                let (text, _) = need_current()?;
                let new_text = match edit {
                    crate::EditOp::Split { cell, green } => {
                        edit::set_split(&text, &cell, edit::percent_to_bp(&green)?)?
                    }
                    crate::EditOp::State { cell, state } => edit::set_state(&text, &cell, state)?,
                    crate::EditOp::Failover { cell, to, force } => {
                        check_replicated_failover(&mut cp, &cell, &to, force).await?;
                        edit::failover(&text, &cell, &to)?
                    }
                    crate::EditOp::Failback { cell } => edit::failback(&text, &cell)?,
                    crate::EditOp::OverrideSet { user, cell, colour } => {
                        edit::set_override(&text, &user, cell.as_deref(), colour)?
                    }
                    crate::EditOp::OverrideRm { user } => edit::remove_override(&text, &user)?,
                };
                apply_edit(&mut cp, current, &new_text, None, &message, false, output).await
            }
            OnlineCommand::Status { output } => {
                let mut status = cp.status().await?;
                if status.revision == 0 {
                    // A wrong --cluster, or nothing applied yet: never "all
                    // current".
                    match output {
                        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                        Output::Text => println!(
                            "cluster {}: no rules in etcd (a wrong --cluster? apply some with `cellctl --cluster {} rules apply FILE`)",
                            target.cluster, target.cluster
                        ),
                    }
                    return Err(Reported.into());
                }
                let token = std::env::var("CELLGATE_ADMIN_TOKEN").ok();
                status.add_health(token.as_deref()).await;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
                    Output::Text => print!("{}", status.summary()),
                }
                if status.all_current() {
                    Ok(())
                } else {
                    Err(Reported.into())
                }
            }
            OnlineCommand::Replication { output } => {
                let records = cp.replication().await?;
                crate::offline::replication_status(
                    &records,
                    output,
                    &format!("cluster {}", target.cluster),
                )
            }
            OnlineCommand::Document => {
                let (text, rev) = need_current()?;
                crate::LIVE.with(|l| *l.borrow_mut() = Some((text, rev)));
                Ok(())
            }
        }
    }
}
