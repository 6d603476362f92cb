//! meshctl: the operator's tool. One module per subcommand group.

mod keys;
mod status;

use clap::{Parser, Subcommand, ValueEnum};
use std::process::ExitCode;

#[derive(Parser)]
#[command(version, about = "Operate a meshd mesh: keys, status")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin and print its public key, like `wg pubkey`.
    Pubkey,
    /// Show peers, endpoints, handshake age, bytes and drops, read from the running daemon.
    Status {
        /// Interface; every running meshd when omitted.
        ifname: Option<String>,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
        /// Admin socket to use instead of /var/run/meshd/IFNAME.sock.
        #[arg(long)]
        socket: Option<std::path::PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// A failure and the exit code it maps to: 1 when the operation failed, 2 for bad input.
pub struct Failure {
    pub code: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn input(error: anyhow::Error) -> Failure {
        Failure { code: 2, error }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Failure {
        Failure { code: 1, error }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Genkey => keys::genkey(),
        Command::Pubkey => keys::pubkey(),
        Command::Status {
            ifname,
            output,
            socket,
        } => status::run(ifname, output, socket),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("meshctl: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}
