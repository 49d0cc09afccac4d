//! `inetcat`: standard input and output ↔ a TCP port on the device, through usbmuxd.
//!
//! Unlike libusbmuxd's, it does not drop the device's last replies: at the end of standard
//! input it stops sending and keeps writing what the device sends until the device closes the
//! connection or `-q SECS` of silence pass.

use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use usbmux_host::tools::DeviceFilter;

/// Connect standard input and output to a TCP port on a device (over usbmuxd).
#[derive(Parser, Debug)]
#[command(name = "inetcat", version, disable_version_flag = true)]
struct Cli {
    /// The TCP port on the device.
    device_port: u16,
    /// Target the device with this UDID.
    #[arg(short = 'u', long = "udid")]
    udid: Option<String>,
    /// Connect to network devices only.
    #[arg(short = 'n', long = "network", conflicts_with = "local")]
    network: bool,
    /// Connect to USB devices only.
    #[arg(short = 'l', long = "local")]
    local: bool,
    /// After standard input ends, wait this many seconds of silence from the device before
    /// exiting (-1: until the device closes the connection).
    #[arg(
        short = 'q',
        long = "quiet-wait",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    quiet_wait: f64,
    /// Print debug output to standard error.
    #[arg(short = 'd', long = "debug")]
    debug: bool,
    /// The usbmuxd socket (default: USBMUXD_SOCKET_ADDRESS, else /var/run/usbmuxd).
    #[arg(long = "socket", value_name = "ADDR")]
    socket: Option<String>,
    /// Print the version.
    #[arg(short = 'v', long = "version", action = clap::ArgAction::Version)]
    version: (),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inetcat: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<(), String> {
    let client = usbmux_host::tools::client(cli.socket.as_deref(), "inetcat")?;
    let filter = DeviceFilter {
        udid: cli.udid.clone(),
        usb_only: cli.local,
        network_only: cli.network,
    };
    let device = filter.pick(&client).map_err(|e| e.to_string())?;
    if cli.debug {
        eprintln!(
            "inetcat: device {} ({}), port {}",
            device.device_id, device.udid, cli.device_port
        );
    }
    let stream = client
        .connect(device.device_id, cli.device_port)
        .map_err(|e| {
            format!(
                "cannot connect to port {} of {}: {e}",
                cli.device_port, device.udid
            )
        })?;
    let mut to_device = stream.try_clone().map_err(|e| e.to_string())?;
    let mut from_device = stream;
    // stdin → device on a thread; at stdin's end it just stops (no shutdown: usbmux has no
    // half-close, a shutdown would reset the connection and lose the replies in flight).
    let debug = cli.debug;
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut stdin = io::stdin().lock();
        let r = usbmux_host::tools::pump(&mut stdin, &mut to_device);
        if debug {
            eprintln!("inetcat: standard input ended ({r:?})");
        }
        let _ = tx.send(());
    });
    let mut stdout = io::stdout().lock();
    let mut buf = vec![0u8; 256 * 1024];
    let mut input_done = false;
    loop {
        if !input_done && rx.try_recv().is_ok() {
            input_done = true;
        }
        let timeout = if input_done && cli.quiet_wait >= 0.0 {
            Some(Duration::from_secs_f64(cli.quiet_wait.max(0.001)))
        } else {
            Some(Duration::from_millis(100))
        };
        from_device
            .set_read_timeout(timeout)
            .map_err(|e| e.to_string())?;
        match from_device.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                stdout.write_all(&buf[..n]).map_err(|e| e.to_string())?;
                stdout.flush().map_err(|e| e.to_string())?;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if input_done && cli.quiet_wait >= 0.0 {
                    // Silence after our input ended: done.
                    return Ok(());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
    }
}
