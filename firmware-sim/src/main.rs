//! `usbmux-sim`: the simulated iPhone's command line.

use clap::{Parser, Subcommand};

/// A simulated iPhone for usbmux hosts.
#[derive(Parser)]
#[command(name = "usbmux-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a host and a simulated phone on an in-memory cable and print every packet (default).
    Demo,
}

fn main() {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Demo) {
        Command::Demo => match usbmux_sim::demo::run() {
            Ok(out) => print!("{out}"),
            Err(e) => {
                eprintln!("usbmux-sim: demo failed: {e}");
                std::process::exit(1);
            }
        },
    }
}
