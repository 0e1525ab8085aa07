//! The `natpunch` command line. The only crate that uses `anyhow`: library
//! errors are typed; here they become one line on stderr and an exit code
//! (2 for misuse, 1 for a failure at run time).

mod bench;
mod cmd_nat;
mod cmd_peer;
mod cmd_server;
mod cmd_session;
mod cmd_turn;
mod demo;
mod lab;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Connect two computers directly through NATs and firewalls, encrypted,
/// or tell you why not. Peer mode: `natpunch -s SERVER` registers and waits
/// for peers, `natpunch -s SERVER -d PEER_ID` connects to one; then it
/// pipes stdin and stdout like netcat, or forwards TCP ports.
#[derive(Debug, Parser)]
#[command(
    name = "natpunch",
    version,
    about,
    propagate_version = true,
    args_conflicts_with_subcommands = true,
    after_help = "Peer mode (the original tool's flags):\n  natpunch -s SERVER             register, print our peer ID, wait (like `listen`)\n  natpunch -s SERVER -d PEER_ID  connect to a peer (like `connect PEER_ID`)"
)]
struct Cli {
    /// More logging on stderr (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(flatten)]
    common: cmd_peer::CommonArgs,
    /// Connect to this peer ID (without it: register and wait).
    #[arg(short = 'd', long = "dest", value_name = "PEER_ID")]
    dest: Option<natpunch_proto::identity::PeerId>,
    #[command(flatten)]
    listen: cmd_peer::ListenOpts,
    #[command(flatten)]
    connect: cmd_peer::ConnectOpts,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Register with a rendezvous server and wait for peers.
    Listen(cmd_peer::ListenArgs),
    /// Connect to a peer through a rendezvous server.
    Connect(cmd_peer::ConnectArgs),
    /// Print this host's peer ID (creating the key file if needed).
    Id(IdArgs),
    /// Run the STUN (RFC 8489/5780) and rendezvous server.
    Server(cmd_server::ServerArgs),
    /// Report this host's NAT behaviour (RFC 5780) and port allocation.
    Nat(cmd_nat::NatArgs),
    /// Ask a STUN server once for this host's public address.
    Stun(cmd_nat::StunArgs),
    /// Allocate a relayed address on a TURN server and report it.
    Turn(cmd_turn::TurnArgs),
    /// Show natpunch working end to end on this machine.
    Demo(demo::DemoArgs),
    /// Measure natpunch against a reference in the same run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The NAT lab: real Linux NATs in network namespaces (root).
    #[command(subcommand)]
    Lab(lab::LabCommand),
}

#[derive(Debug, clap::Args)]
struct IdArgs {
    /// Identity key file (created with mode 0600 if missing).
    #[arg(long, value_name = "FILE")]
    key: Option<std::path::PathBuf>,
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // One clear line, not clap's multi-line usage block.
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let line = message.join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            eprintln!("natpunch: {line} (see --help)");
            return ExitCode::from(2);
        }
    };
    init_logging(cli.verbose);
    let result = match cli.command {
        None if cli.common.server.is_none() => {
            eprintln!("natpunch: nothing to do: give a command or -s SERVER (see --help)");
            return ExitCode::from(2);
        }
        None => cmd_peer::run(cli.common, cli.dest, cli.listen, cli.connect),
        Some(c) => run_command(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("natpunch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_command(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Listen(a) => cmd_peer::run(a.common, None, a.listen, Default::default()),
        Command::Id(a) => cmd_peer::print_id(a.key),
        Command::Connect(a) => {
            cmd_peer::run(a.common, Some(a.peer_id), Default::default(), a.connect)
        }
        Command::Server(a) => cmd_server::run(a),
        Command::Nat(a) => cmd_nat::run_nat(a),
        Command::Stun(a) => cmd_nat::run_stun(a),
        Command::Turn(a) => cmd_turn::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Bench(b) => bench::run(b),
        Command::Lab(l) => lab::run(l),
    }
}

/// A single-threaded tokio runtime: every command's work is I/O bound and
/// one thread keeps the servers' per-packet cost lowest.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}
