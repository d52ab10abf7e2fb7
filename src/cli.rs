//! Command-line definition. Flags that rip.toml or `RIP_*` can also set are `Option` with no
//! clap default, so that `config` can tell "not given" from "given the default value".

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "rip",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("RIP_COMMIT"), ")"),
    about = "An HTTP server that is its own process manager"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP on a TCP port through a supervised pool of worker processes.
    Serve(Box<ServeArgs>),
    /// Show every worker of the running rip: pid, state, age, requests, memory.
    Status(StatusArgs),
    /// Replace every worker with one from the binary on disk, re-reading rip.toml.
    Reload(ReloadArgs),
    /// Change the number of workers at runtime.
    Scale(ScaleArgs),
    /// Start the rip binary now on disk in place of the running one, without closing the port.
    Upgrade(UpgradeArgs),
    /// Stop the running rip gracefully.
    Stop(ControlArgs),
    /// Check flags, RIP_* variables and rip.toml as `rip serve` would, and print the
    /// configuration it would run with, each value with where it came from.
    Config(Box<ConfigArgs>),
    /// Print a shell completion script, e.g. `rip completions bash > /etc/bash_completion.d/rip`.
    Completions(CompletionsArgs),
    /// Print the man page (roff), e.g. `rip man > /usr/local/share/man/man1/rip.1`.
    Man,
    /// Serve the app on a Unix socket (started by `rip serve`, not by hand).
    #[command(hide = true)]
    Worker(WorkerArgs),
    /// Become a command's worker (started by `rip serve`, not by hand).
    #[command(hide = true)]
    Launch(LaunchArgs),
    /// Kill the workers' process groups once `rip serve` is gone (started by it, not by hand).
    #[command(hide = true)]
    Guard(GuardArgs),
    /// Fork workers for `rip serve` from one started image (started by it, not by hand).
    #[command(hide = true, name = "forkserver")]
    ForkServer(ForkServerArgs),
}

#[derive(Debug, Clone, Args)]
pub struct LaunchArgs {
    /// Pid of the `rip serve` that started this worker; the worker exits if it is gone.
    #[arg(long)]
    pub parent: i32,
    /// A listening socket inherited under this number, to be passed to the command as fd 3.
    #[arg(long)]
    pub listen_fd: Option<i32>,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct GuardArgs {}

#[derive(Debug, Clone, Args)]
pub struct ForkServerArgs {
    /// Pid of the `rip serve` that started this server; it exits if that is gone.
    #[arg(long)]
    pub parent: i32,
    /// The socket the supervisor sends its requests on, inherited under this number.
    #[arg(long)]
    pub socket_fd: i32,
    /// Spaces: room for each forked worker's command line to be shown in.
    #[arg(hide = true)]
    pub room: Option<String>,
}

/// How a command finds the running rip.
#[derive(Debug, Default, Clone, Args)]
pub struct ControlArgs {
    /// Control socket of the rip to talk to [default: found in the runtime directory]
    #[arg(long, value_name = "PATH", global = true)]
    pub control: Option<PathBuf>,
    /// Runtime directory to look in [default: $XDG_RUNTIME_DIR/rip or /tmp/rip-$UID]
    #[arg(long, value_name = "DIR", global = true)]
    pub runtime_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Print JSON for scripts
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ReloadArgs {
    /// Wait until every worker is replaced and ready; exit non-zero if the new ones fail
    #[arg(long)]
    pub wait: bool,
    /// Longest wait with --wait
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub timeout: String,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ScaleArgs {
    /// The new number of workers
    pub workers: usize,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, Clone, Args)]
pub struct UpgradeArgs {
    /// Longest wait for the new rip to become ready
    #[arg(long, value_name = "DURATION", default_value = "5m")]
    pub timeout: String,
    #[command(flatten)]
    pub control: ControlArgs,
}

#[derive(Debug, Default, Clone, Args)]
pub struct ServeArgs {
    /// Config file [default: ./rip.toml when present]
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Every setting rip.toml and `RIP_*` can also set, declared in `config`.
    #[command(flatten)]
    pub settings: crate::config::Flags,
    /// The command each worker runs, with its arguments, in place of rip's own app (the same
    /// as --command)
    #[arg(last = true, value_name = "CMD", id = "argv")]
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish, elvish or powershell
    #[arg(value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// Print nothing; exit 0 if the configuration is valid, 1 (with the reason) if not
    #[arg(long)]
    pub check: bool,
    /// The flags `rip serve` would get
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Unix socket to listen on.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// Slot of this worker in the pool.
    #[arg(long, value_name = "N")]
    pub id: usize,
    /// How many workers held this slot before this one.
    #[arg(long, default_value_t = 0)]
    pub generation: u64,
    /// Pid of the `rip serve` that started this worker; the worker exits if it is gone.
    #[arg(long)]
    pub parent: Option<i32>,
    /// Serve static files from DIR.
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Runtime threads.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Time in-flight requests get to finish after SIGTERM, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    pub graceful_ms: u64,
    /// Log format: text or json.
    #[arg(long, default_value = "text", value_parser = parse_log_format)]
    pub log_format: crate::config::LogFormat,
    /// Also take client connections from the front-end over a hand-off channel.
    #[arg(long)]
    pub handoff: bool,
    /// With --handoff: the client header timeout, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub header_timeout_ms: u64,
    /// With --handoff: largest request body in bytes; 0 = unlimited.
    #[arg(long, default_value_t = 0)]
    pub max_body: u64,
    /// With --handoff: client connections served at once.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: usize,
    /// With --handoff: peers whose forwarding headers are believed, comma-separated CIDRs.
    #[arg(long, default_value = "")]
    pub trusted_proxies: String,
    /// With --root: the Cache-Control of each file.
    #[arg(long, value_name = "VALUE")]
    pub cache_control: Option<String>,
    /// The fd of the heartbeat page the parent shares with this worker.
    #[arg(long, value_name = "FD")]
    pub heartbeat_fd: Option<i32>,
}

impl Cli {
    /// Parses the process arguments. Help and version are printed in full; any other error is
    /// one `rip: ...` line on stderr and exit code 2, as for every other bad input.
    pub fn parse_args() -> Result<Cli, ExitCode> {
        Self::try_parse_from_iter(std::env::args_os())
    }

    pub fn try_parse_from_iter<I, T>(args: I) -> Result<Cli, ExitCode>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::error::ErrorKind;
        match Cli::try_parse_from(args) {
            Ok(cli) => Ok(cli),
            Err(err) => match err.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = err.print();
                    Err(ExitCode::from(if err.use_stderr() { 2 } else { 0 }))
                }
                _ => {
                    eprintln!("rip: {}", one_line(&err.to_string()));
                    Err(ExitCode::from(2))
                }
            },
        }
    }
}

/// `rip completions SHELL`: the script for the shell, from the same definitions as --help.
pub fn print_completions(args: &CompletionsArgs) -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "rip", &mut script);
    print_all(&script)
}

/// `rip man`: the man page, from the same definitions as --help.
pub fn print_man() -> std::io::Result<()> {
    use clap::CommandFactory;
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut page)?;
    print_all(&page)
}

/// Writes `bytes` to stdout; a reader that stopped early (`| head`) is no error.
fn print_all(bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn parse_log_format(s: &str) -> Result<crate::config::LogFormat, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

/// Reduces clap's multi-line message to its first line, without the `error: ` prefix.
fn one_line(message: &str) -> String {
    let first = message.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid arguments");
    first.trim_start_matches("error: ").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clap_errors_become_one_line() {
        let msg = "error: unexpected argument '--nope' found\n\n  tip: ...\n\nUsage: rip serve\n";
        assert_eq!(one_line(msg), "unexpected argument '--nope' found");
    }

    #[test]
    fn serve_flags_are_unset_unless_given() {
        let cli = Cli::try_parse_from(["rip", "serve", "-p", "0"]).unwrap();
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.settings.port.as_deref(), Some("0"));
        assert_eq!(args.settings.workers, None);
        assert_eq!(args.settings.max_requests, None);
    }
}
