//! `ospreyd`: the osprey inference daemon (see `osprey_daemon::daemon`).

fn main() {
    osprey_daemon::daemon::main()
}
