//! `usbmux-sim`: the simulated iPhone's command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use usbmux_sim::socket::Server;
use usbmux_sim::trace::{self, TraceWriter};
use usbmux_sim::PhoneConfig;

/// A simulated iPhone for usbmux hosts.
///
/// It runs the device side of Apple's usbmux protocol (the same engine as the host, in the
/// device role) with echo (7), discard (9), source (19), digest (1999) and a locked lockdown
/// (62078) service. Without a command it runs the demo.
#[derive(Parser)]
#[command(name = "usbmux-sim", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a host and a simulated phone on an in-memory cable and print every packet (default).
    Demo,
    /// Serve simulated phones on Unix seqpacket sockets, one phone per PATH.
    ///
    /// A daemon (e.g. `usbmuxd --sim-socket PATH`) that connects to PATH plugs the phone in and
    /// receives its IDENTITY; closing the connection unplugs it, and the next connection gets a
    /// fresh phone. The message layout is in firmware-sim/README.md. Phone k (from 1, in the
    /// order of the paths) is `Simulated iPhone k` with UDID 00008030-000000000000000k (hex),
    /// unless --config says otherwise. Runs until killed; stale socket files are replaced on the
    /// next start.
    Serve(ServeArgs),
    /// Print a trace recorded by `serve --trace`, one decoded line per transfer.
    ///
    /// Each line shows the record index, the time in seconds since the trace started, the phone,
    /// the direction, the transfer's length and the decoded mux packet: header form and
    /// sequence counters, VERSION, SETUP, CONTROL text or TCP ports, seq, ack, flags, window and
    /// payload length. A truncated or corrupt file prints what it can, then names the bad
    /// record and exits with status 1.
    Dump {
        /// The trace file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Phone settings in TOML (UDID, USB ids, wMaxPacketSize, protocol version, buffers,
    /// lockdown values; format in the docs of `usbmux_sim::config`). The k-th phone of FILE goes
    /// with the k-th PATH; paths beyond the file's phones get the default identities; a file with
    /// more phones than paths is an error.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Record every transfer, both directions, with timestamps to FILE (created mode 0600,
    /// truncated); read it with `usbmux-sim dump FILE`.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// Log only startup errors (no plug/unplug/protocol-error lines on stderr).
    #[arg(long, short)]
    quiet: bool,
    /// Socket paths to listen on, one phone each (created mode 0600).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Demo) {
        Command::Demo => usbmux_sim::demo::run()
            .map(|out| print!("{out}"))
            .map_err(|e| format!("demo failed: {e}")),
        Command::Serve(args) => serve(args),
        Command::Dump { file } => dump(&file),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usbmux-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configurations of the phones for `n` socket paths.
fn phone_configs(config: Option<&Path>, n: usize) -> Result<Vec<PhoneConfig>, String> {
    let from_file: Vec<PhoneConfig> = match config {
        None => Vec::new(),
        Some(path) => load_config(path)?,
    };
    if from_file.len() > n {
        return Err(format!(
            "the config describes {} phones but only {n} socket paths were given",
            from_file.len()
        ));
    }
    let mut cfgs = from_file;
    for k in cfgs.len()..n {
        cfgs.push(PhoneConfig::simulated(
            u32::try_from(k + 1).unwrap_or(u32::MAX),
        ));
    }
    Ok(cfgs)
}

fn load_config(path: &Path) -> Result<Vec<PhoneConfig>, String> {
    usbmux_sim::config::load(path).map_err(|e| e.to_string())
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let cfgs = phone_configs(args.config.as_deref(), args.paths.len())?;
    let phones: Vec<(PathBuf, PhoneConfig)> = args.paths.into_iter().zip(cfgs).collect();
    let mut server = Server::bind(phones.clone())
        .map_err(|e| e.to_string())?
        .with_logging(!args.quiet);
    if let Some(path) = &args.trace {
        let w = TraceWriter::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        server = server.with_trace(w);
    }
    for (k, (path, cfg)) in phones.iter().enumerate() {
        println!(
            "phone {} {} listening on {}",
            k + 1,
            cfg.identity.udid,
            path.display()
        );
    }
    server.spawn().map_err(|e| e.to_string())?.wait();
    Ok(())
}

fn dump(file: &Path) -> Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let r = trace::dump(&bytes, &mut out);
    let _ = std::io::Write::flush(&mut out);
    match r {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{}: {e}", file.display())),
    }
}
