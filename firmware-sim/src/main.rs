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
/// (62078) service. Without a command it runs the demo; with --functionfs it is a real USB
/// device on Linux (FunctionFS, optionally with its configfs gadget).
#[derive(Parser)]
#[command(
    name = "usbmux-sim",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    gadget: GadgetArgs,
}

/// The phone as a USB gadget (Linux, feature `functionfs`).
#[derive(Args)]
struct GadgetArgs {
    /// Be the phone behind the FunctionFS instance mounted at DIR: write its descriptors (one
    /// usbmux interface ff/fe/02, bulk OUT = ep1, bulk IN = ep2) to DIR/ep0 and serve; every
    /// ENABLE plugs a fresh phone, DISABLE/UNBIND unplugs it. Without --configfs somebody else
    /// creates the gadget and binds the UDC once "usbmux-sim: functionfs DIR ready" is printed.
    #[arg(long, value_name = "DIR")]
    functionfs: Option<PathBuf>,
    /// Phone settings in TOML (the format of `serve --config`); the phone used is --phone K.
    #[arg(long, value_name = "FILE", requires = "functionfs")]
    config: Option<PathBuf>,
    /// Which phone of --config to be (from 1); without --config the default identity of
    /// phone K (UDID 00008030-000000000000000K in hex).
    #[arg(long, value_name = "K", default_value_t = 1, requires = "functionfs",
          value_parser = clap::value_parser!(u32).range(1..))]
    phone: u32,
    /// Also create configfs gadget NAME (/sys/kernel/config/usb_gadget/NAME: Apple's vendor id,
    /// the phone's product id and UDID as serial, function ffs.NAME), mount its FunctionFS at
    /// DIR, bind it to a UDC and print "usbmux-sim: gadget NAME bound to UDC U (udid ...)". On
    /// SIGINT/SIGTERM the gadget is unbound and removed.
    #[arg(long, value_name = "NAME", requires = "functionfs")]
    configfs: Option<String>,
    /// The device controller for --configfs (default: the first in /sys/class/udc that no
    /// gadget uses).
    #[arg(long, value_name = "UDC", requires = "configfs")]
    udc: Option<String>,
    /// bInterfaceSubClass of the usbmux interface (default 0xfe; other values test how hosts
    /// match the interface). Decimal or 0x-hex.
    #[arg(long, value_name = "N", value_parser = parse_u8, requires = "functionfs")]
    subclass: Option<u8>,
    /// One blocking read/write at a time per endpoint instead of several transfers queued
    /// through Linux AIO (slower: the controller waits for userspace between transfers). Runs
    /// a thread per endpoint.
    #[arg(long, requires = "functionfs", conflicts_with = "threaded_io")]
    blocking_io: bool,
    /// A reader and a writer thread beside the phone's (AIO transfers queued, copied between
    /// threads) instead of one thread polling ep0 and both endpoints (the default).
    #[arg(long, requires = "functionfs")]
    threaded_io: bool,
    /// Log every FunctionFS event, stalled request and phone event (connections) on stderr.
    #[arg(long, short, requires = "functionfs")]
    verbose: bool,
}

fn parse_u8(s: &str) -> Result<u8, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u8::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s:?}: {e} (0..=255, decimal or 0x-hex)"))
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
    if let Some(dir) = cli.gadget.functionfs.clone() {
        return match gadget::run(cli.gadget, &dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("usbmux-sim: {e}");
                ExitCode::FAILURE
            }
        };
    }
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

/// `--functionfs` where it is not built.
#[cfg(not(all(feature = "functionfs", target_os = "linux")))]
mod gadget {
    use std::path::Path;

    pub(crate) fn run(_args: super::GadgetArgs, _dir: &Path) -> Result<(), String> {
        Err("--functionfs needs Linux and the `functionfs` feature".into())
    }
}

/// `--functionfs DIR [--configfs NAME]`: the phone as a USB gadget.
#[cfg(all(feature = "functionfs", target_os = "linux"))]
mod gadget {
    use std::io::Write;
    use std::path::Path;

    use nix::sys::signal::{SigSet, Signal};
    use usbmux_core::Event;
    use usbmux_sim::gadget::configfs::{self, ConfigfsGadget, GadgetSpec};
    use usbmux_sim::gadget::{descriptors, functionfs, GadgetEvent, Runner};
    use usbmux_sim::PhoneConfig;

    use super::GadgetArgs;

    fn phone_config(args: &GadgetArgs) -> Result<PhoneConfig, String> {
        let k = args.phone;
        match &args.config {
            None => Ok(PhoneConfig::simulated(k)),
            Some(path) => {
                let cfgs = super::load_config(path)?;
                let n = cfgs.len();
                usize::try_from(k - 1)
                    .ok()
                    .and_then(|i| cfgs.into_iter().nth(i))
                    .ok_or_else(|| format!("--phone {k}: {} describes {n} phones", path.display()))
            }
        }
    }

    /// The stderr line for `ev`, if it is worth one (`verbose`: nearly everything).
    fn describe(ev: &GadgetEvent, verbose: bool) -> Option<String> {
        Some(match ev {
            GadgetEvent::Plugged {
                plug,
                max_packet_size,
            } => format!("plugged in (#{plug}, wMaxPacketSize {max_packet_size})"),
            GadgetEvent::Unplugged { plug, cause } => format!("unplugged (#{plug}, {cause:?})"),
            GadgetEvent::EndpointFailed { endpoint, error } => {
                format!("{endpoint} failed: {error}")
            }
            GadgetEvent::Ep0Garbage(e) => format!("ep0: {e}"),
            _ if !verbose => return None,
            GadgetEvent::Ep0(e) => format!("ep0 event {e:?}"),
            GadgetEvent::Stalled(r) => format!("stalled SETUP {r:?}"),
            GadgetEvent::EndpointDown { endpoint } => format!("{endpoint} endpoint disabled"),
            GadgetEvent::OutDropped { len } => {
                format!("OUT transfer of {len} bytes while unplugged: dropped")
            }
            GadgetEvent::Phone(Event::Readable(_) | Event::Writable(_)) => return None,
            GadgetEvent::Phone(Event::Incoming { id, port }) => {
                format!("phone: connection {} to port {port}", id.index())
            }
            GadgetEvent::Phone(Event::Reset { id, reason }) => {
                format!("phone: connection {} reset: {reason}", id.index())
            }
            GadgetEvent::Phone(e) => format!("phone: {e:?}"),
        })
    }

    pub(crate) fn run(args: GadgetArgs, dir: &Path) -> Result<(), String> {
        let cfg = phone_config(&args)?;
        // Before any thread exists, so every thread inherits the mask and only the waiter
        // below takes these signals.
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGINT);
        signals.add(Signal::SIGTERM);
        signals
            .thread_block()
            .map_err(|e| format!("cannot block signals: {e}"))?;
        let mut gadget: Option<ConfigfsGadget> = None;
        let result = serve(&args, dir, cfg, signals, &mut gadget);
        if let Some(g) = gadget {
            for e in g.remove() {
                eprintln!("usbmux-sim: removing the gadget: {e}");
            }
        }
        result
    }

    fn serve(
        args: &GadgetArgs,
        dir: &Path,
        cfg: PhoneConfig,
        signals: SigSet,
        gadget: &mut Option<ConfigfsGadget>,
    ) -> Result<(), String> {
        let udid = cfg.identity.udid.clone();
        if let Some(name) = &args.configfs {
            let spec = GadgetSpec::from_identity(&cfg.identity);
            let root = Path::new(configfs::CONFIGFS_GADGETS);
            let g = gadget.insert(
                ConfigfsGadget::create(root, name, &spec).map_err(|e| format!("configfs: {e}"))?,
            );
            g.mount_functionfs(dir)
                .map_err(|e| format!("mount functionfs: {e}"))?;
        }
        let subclass = args.subclass.unwrap_or(descriptors::USBMUX_SUBCLASS);
        let eps = functionfs::open(
            dir,
            &descriptors::usbmux_function(subclass).to_bytes(),
            &descriptors::usbmux_strings(),
            if args.blocking_io {
                functionfs::IoMode::Blocking
            } else if args.threaded_io {
                functionfs::IoMode::Queued
            } else {
                functionfs::IoMode::Loop
            },
        )
        .map_err(|e| e.to_string())?;
        let verbose = args.verbose;
        let runner = Runner::new(cfg).on_event(move |ev| {
            if let Some(line) = describe(ev, verbose) {
                eprintln!("usbmux-sim: {line}");
            }
        });
        let stopper = runner.stopper();
        std::thread::Builder::new()
            .name("usbmux-sim signals".into())
            .spawn(move || {
                if let Ok(sig) = signals.wait() {
                    eprintln!("usbmux-sim: {sig}: stopping");
                    stopper.stop();
                }
            })
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        let mut stdout = std::io::stdout();
        match gadget.as_mut() {
            Some(g) => {
                let candidates = match &args.udc {
                    Some(u) => vec![u.clone()],
                    None => configfs::free_udcs(
                        Path::new(configfs::UDC_CLASS),
                        Path::new(configfs::CONFIGFS_GADGETS),
                    )
                    .map_err(|e| format!("{}: {e}", configfs::UDC_CLASS))?,
                };
                let mut last = format!("no free UDC in {}", configfs::UDC_CLASS);
                for udc in &candidates {
                    // Another gadget may take a UDC between the listing and the bind: try the
                    // next one.
                    match g.bind(udc) {
                        Ok(()) => break,
                        Err(e) => last = format!("bind: {e}"),
                    }
                }
                let Some(udc) = g.udc() else {
                    return Err(last);
                };
                let _ = writeln!(
                    stdout,
                    "usbmux-sim: gadget {} bound to UDC {udc} (udid {udid})",
                    g.name()
                );
            }
            None => {
                let _ = writeln!(
                    stdout,
                    "usbmux-sim: functionfs {} ready (udid {udid})",
                    dir.display()
                );
            }
        }
        let _ = stdout.flush();
        let stats = match eps {
            functionfs::Opened::Threads(eps) => runner.run(eps),
            #[cfg(all(
                any(target_arch = "x86_64", target_arch = "aarch64"),
                target_endian = "little"
            ))]
            functionfs::Opened::Loop(eps) => runner.run_loop(eps),
        }
        .map_err(|e| e.to_string())?;
        if verbose {
            eprintln!("usbmux-sim: {stats:?}");
        }
        Ok(())
    }
}
