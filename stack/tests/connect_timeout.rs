//! The connect timeout runs from the first poll after the connect, not from the stack's last
//! known time: socket calls take no clock, and a stack that had nothing to do for longer than
//! the timeout must still give a new connection its full time (it used to fail every connect
//! at once with `TimedOut` after 30 idle seconds).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use webnic_stack::{ConnectError, Duration, Event, Instant, Stack, StackConfig, TcpOptions};

fn events(stack: &mut Stack) -> Vec<Event> {
    std::iter::from_fn(|| stack.poll_event()).collect()
}

#[test]
fn connect_after_a_long_idle_gets_its_whole_timeout() {
    let start = Instant::from_millis(1_000);
    let mut config = StackConfig::new(1152, 7);
    config.ipv4 = Some(Ipv4Addr::new(10, 77, 0, 2));
    let mut stack = Stack::new(config, start);
    stack.poll(start);
    assert_eq!(stack.poll_timeout(), None, "an empty stack has no timer");

    // Two minutes without a poll (nothing to do), then a connect.
    let timeout = TcpOptions::default().connect_timeout;
    let later = start + Duration::from_secs(120);
    let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 99, 0, 1)), 7);
    let handle = stack
        .tcp_connect(remote, TcpOptions::default())
        .expect("connect");
    // The next poll starts the clock, so it is due at once.
    assert!(stack.poll_timeout().is_some_and(|at| at <= later));
    stack.poll(later);
    let syn = stack.poll_transmit().expect("the SYN leaves");
    assert_eq!(syn[9], 6, "TCP");
    assert_eq!(syn[33] & 0x02, 0x02, "SYN flag");
    assert!(
        events(&mut stack).is_empty(),
        "nothing failed on the first poll"
    );

    // Just before the timeout (SYN retransmissions go unanswered): still connecting.
    let almost = later + timeout - Duration::from_millis(1);
    let mut at = later;
    while at < almost {
        at = stack
            .poll_timeout()
            .expect("a SYN timer")
            .min(almost)
            .max(at);
        stack.poll(at);
        while stack.poll_transmit().is_some() {}
        assert!(events(&mut stack).is_empty(), "failed early at {at}");
    }
    // At the timeout: it fails, with TimedOut.
    let deadline = later + timeout;
    assert!(stack.poll_timeout().is_some_and(|t| t <= deadline));
    stack.poll(deadline);
    assert!(
        events(&mut stack).contains(&Event::TcpConnectFailed(handle, ConnectError::TimedOut)),
        "the connect timed out at its deadline"
    );
}
