//! usbmux host side (daemon, client library, tools). Being built.
