//! The commands that talk to a running `rip serve` over its control socket. Each prints what
//! happened in one line (or the status table) and exits non-zero if it did not happen.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cli::{ControlArgs, ReloadArgs, ScaleArgs, StatusArgs, UpgradeArgs};
use crate::control::{self, Request, Response};
use crate::runtime_dir;

/// Answer time for commands that do not wait for workers.
const QUICK: Duration = Duration::from_secs(10);

fn socket(args: &ControlArgs) -> Result<PathBuf> {
    if let Some(path) = &args.control {
        return Ok(path.clone());
    }
    let base = args.runtime_dir.clone().unwrap_or_else(runtime_dir::default_base);
    control::discover(&base)
}

fn call(args: &ControlArgs, request: Request, timeout: Duration) -> Result<Response> {
    let response = control::request(&socket(args)?, &request, timeout)?;
    if !response.ok {
        bail!("{}", response.error.unwrap_or_else(|| "the command failed".into()));
    }
    Ok(response)
}

pub fn status(args: &StatusArgs) -> Result<()> {
    let response = call(&args.control, Request::Status, QUICK)?;
    let status = response.status.context("the answer had no status")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status).context("encoding the status")?);
    } else {
        print!("{}", control::format_status(&status));
    }
    Ok(())
}

pub fn reload(args: &ReloadArgs) -> Result<()> {
    let timeout = crate::config::parse_duration(&args.timeout)
        .with_context(|| format!("invalid value '{}' for --timeout", args.timeout))?;
    call(&args.control, Request::Reload { wait: args.wait }, if args.wait { timeout } else { QUICK })?;
    println!(
        "{}",
        if args.wait { "reloaded: every worker replaced, the old ones exited" } else { "reload started" }
    );
    Ok(())
}

pub fn scale(args: &ScaleArgs) -> Result<()> {
    if args.workers == 0 {
        bail!("invalid value '0' for workers: must be at least 1");
    }
    call(&args.control, Request::Scale { workers: args.workers }, QUICK)?;
    println!("scaling to {} workers", args.workers);
    Ok(())
}

pub fn upgrade(args: &UpgradeArgs) -> Result<()> {
    let timeout = crate::config::parse_duration(&args.timeout)
        .with_context(|| format!("invalid value '{}' for --timeout", args.timeout))?;
    let response = call(&args.control, Request::Upgrade, timeout)?;
    match response.pid {
        Some(pid) => println!("upgraded: new rip serve pid {pid}"),
        None => println!("upgraded"),
    }
    Ok(())
}

pub fn stop(args: &ControlArgs) -> Result<()> {
    call(args, Request::Stop, QUICK)?;
    println!("stopping");
    Ok(())
}

/// `rip config`: everything `rip serve` checks before it starts, then the configuration it
/// would run with (in the spirit of `nginx -t` and `nginx -T`).
pub fn config(args: &crate::cli::ConfigArgs) -> Result<()> {
    let (config, sources) = crate::config::resolve_sourced(&args.serve, |name| std::env::var(name).ok())?;
    if let Some(root) = &config.root {
        crate::serve::check_root(root)?;
    }
    if !args.check {
        print!("{}", crate::config::render(&config, &sources));
    }
    Ok(())
}
