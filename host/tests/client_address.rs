//! `SocketAddress::parse` over every form real clients write in `USBMUXD_SOCKET_ADDRESS`, every
//! error, the environment and explicit-argument precedence, and arbitrary input.

use std::ffi::OsString;
use std::path::PathBuf;

use usbmux_host::client::{AddressError, Client, SocketAddress, DEFAULT_UNIX_PATH, ENV_VAR};

fn unix(p: &str) -> Result<SocketAddress, AddressError> {
    Ok(SocketAddress::Unix(PathBuf::from(p)))
}

fn tcp(host: &str, port: u16) -> Result<SocketAddress, AddressError> {
    Ok(SocketAddress::Tcp {
        host: host.to_owned(),
        port,
    })
}

#[test]
fn every_accepted_form() {
    let table: &[(&str, Result<SocketAddress, AddressError>)] = &[
        // libusbmuxd's UNIX: prefix (and the lower-case spelling).
        ("UNIX:/var/run/usbmuxd", unix("/var/run/usbmuxd")),
        ("unix:/tmp/u", unix("/tmp/u")),
        ("UNIX:relative/sock", unix("relative/sock")),
        ("UNIX:/tmp/with:colon", unix("/tmp/with:colon")),
        ("UNIX:/tmp/with space", unix("/tmp/with space")),
        // The prefix wins: this is the path "5", not host "unix" (which is refused).
        ("unix:5", unix("5")),
        // URL form.
        ("unix:///var/run/usbmuxd", unix("/var/run/usbmuxd")),
        ("UNIX:///tmp/x", unix("/tmp/x")),
        ("unix:////tmp/x", unix("/tmp/x")),
        // A bare path (usbmuxd -S PATH), even with a ':' in it.
        ("/var/run/usbmuxd", unix("/var/run/usbmuxd")),
        ("/tmp/a:b", unix("/tmp/a:b")),
        ("//tmp/x", unix("/tmp/x")),
        // HOST:PORT.
        ("127.0.0.1:27015", tcp("127.0.0.1", 27015)),
        ("localhost:27015", tcp("localhost", 27015)),
        ("usbmuxd.example.:1", tcp("usbmuxd.example.", 1)),
        ("my_host-1:65535", tcp("my_host-1", 65535)),
        ("[::1]:27015", tcp("::1", 27015)),
        ("[fe80::1]:5000", tcp("fe80::1", 5000)),
        // libusbmuxd splits at the last ':', so a bare IPv6 address works too.
        ("::1:27015", tcp("::1", 27015)),
        // URL form.
        ("tcp://127.0.0.1:27015", tcp("127.0.0.1", 27015)),
        ("TCP://[::1]:27015", tcp("::1", 27015)),
        ("tcp://localhost:5/", tcp("localhost", 5)),
    ];
    for (input, expected) in table {
        assert_eq!(&SocketAddress::parse(input), expected, "{input:?}");
        assert_eq!(
            &input.parse::<SocketAddress>(),
            expected,
            "{input:?} (FromStr)"
        );
    }
}

#[test]
fn every_error() {
    use AddressError::*;
    let table: &[(&str, AddressError)] = &[
        ("", Empty),
        ("UNIX:", Empty),
        ("unix://", RelativeUnixUrl(String::new())),
        ("unix://tmp/x", RelativeUnixUrl("tmp/x".into())),
        ("UNIX:/tmp/a\0b", NulInPath),
        ("/a\0", NulInPath),
        ("tcp://", Empty),
        ("tcp://localhost", MissingPort("localhost".into())),
        ("[::1]", MissingPort("[::1]".into())),
        ("[::1]27015", MissingPort("[::1]27015".into())),
        ("[::1:27015", InvalidHost("[::1:27015".into())),
        ("[1.2.3.4]:5", InvalidHost("1.2.3.4".into())),
        ("[nonsense]:5", InvalidHost("nonsense".into())),
        (":27015", EmptyHost),
        ("[]:27015", InvalidHost(String::new())),
        ("localhost:", InvalidPort(String::new())),
        ("localhost:0", InvalidPort("0".into())),
        ("localhost:65536", InvalidPort("65536".into())),
        ("localhost:99999999999", InvalidPort("99999999999".into())),
        ("localhost:+5", InvalidPort("+5".into())),
        ("localhost:0x10", InvalidPort("0x10".into())),
        ("localhost: 5", InvalidPort(" 5".into())),
        ("tcp://localhost:5/x", InvalidPort("5/x".into())),
        ("bad host:5", InvalidHost("bad host".into())),
        ("-bad:5", InvalidHost("-bad".into())),
        ("a..b:5", InvalidHost("a..b".into())),
        ("a:b:5", InvalidHost("a:b".into())),
        ("tcp://unix:5", InvalidHost("unix".into())),
        ("usbmuxd", Unrecognized("usbmuxd".into())),
        ("relative/path", Unrecognized("relative/path".into())),
        (" /tmp/x", Unrecognized(" /tmp/x".into())),
    ];
    for (input, expected) in table {
        assert_eq!(
            SocketAddress::parse(input).as_ref(),
            Err(expected),
            "{input:?}"
        );
    }
    // Errors print what is wrong.
    assert_eq!(
        AddressError::InvalidPort("0".into()).to_string(),
        "invalid port \"0\" (expected 1..=65535)"
    );
}

#[test]
fn display_is_libusbmuxd_form_and_round_trips() {
    for (input, shown) in [
        ("unix:///tmp/x", "UNIX:/tmp/x"),
        ("/var/run/usbmuxd", "UNIX:/var/run/usbmuxd"),
        ("tcp://127.0.0.1:27015", "127.0.0.1:27015"),
        ("TCP://[::1]:27015", "[::1]:27015"),
        ("::1:5", "[::1]:5"),
        ("localhost:9", "localhost:9"),
    ] {
        let addr = SocketAddress::parse(input).expect(input);
        assert_eq!(addr.to_string(), shown);
        assert_eq!(SocketAddress::parse(shown), Ok(addr));
    }
}

#[test]
fn environment_and_explicit_argument() {
    assert_eq!(
        SocketAddress::platform_default(),
        SocketAddress::Unix(DEFAULT_UNIX_PATH.into())
    );
    assert_eq!(
        SocketAddress::from_env_value(None),
        Ok(SocketAddress::platform_default())
    );
    assert_eq!(
        SocketAddress::from_env_value(Some(OsString::from(""))),
        Ok(SocketAddress::platform_default())
    );
    assert_eq!(
        SocketAddress::from_env_value(Some(OsString::from("[::1]:7"))),
        tcp("::1", 7)
    );

    // The only test in this binary that touches the process environment.
    std::env::set_var(ENV_VAR, "tcp://127.0.0.1:4000");
    assert_eq!(SocketAddress::from_env(), tcp("127.0.0.1", 4000));
    assert_eq!(
        Client::new().expect("client").address(),
        &SocketAddress::Tcp {
            host: "127.0.0.1".into(),
            port: 4000
        }
    );
    // An explicit argument wins over the environment.
    assert_eq!(SocketAddress::resolve(Some("UNIX:/x")), unix("/x"));
    assert_eq!(SocketAddress::resolve(None), tcp("127.0.0.1", 4000));
    std::env::set_var(ENV_VAR, "not an address");
    assert!(matches!(
        Client::new(),
        Err(usbmux_host::client::ClientError::Address(
            AddressError::Unrecognized(_)
        ))
    ));
    std::env::remove_var(ENV_VAR);
    assert_eq!(
        SocketAddress::from_env(),
        Ok(SocketAddress::platform_default())
    );
}

#[test]
fn arbitrary_input_never_panics() {
    // xorshift: deterministic, so a failure reproduces.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let alphabet: Vec<char> = "unixUNIXtcp:/[]0123456789.-_ %\0é\u{1F600}abf"
        .chars()
        .collect();
    for _ in 0..50_000 {
        let len = (next() % 24) as usize;
        let s: String = (0..len)
            .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
            .collect();
        if let Ok(addr) = SocketAddress::parse(&s) {
            assert_eq!(SocketAddress::parse(&addr.to_string()), Ok(addr), "{s:?}");
        }
    }
}
