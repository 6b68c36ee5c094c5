//! Counters and gauges of the running server, rendered as Prometheus text for `GET /metrics`.

use std::fmt::Write as _;

use crate::hub::HubStats;

/// Upper bounds (microseconds) of the loop iteration time histogram.
const LOOP_BUCKETS_US: [u64; 10] = [10, 25, 50, 100, 250, 500, 1_000, 5_000, 25_000, 100_000];

/// Close codes counted one by one; anything else counts as "other".
const CLOSE_CODES: [u16; 9] = [1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1013];

/// The server's counters, owned by the loop and bumped where things happen; [`Metrics::render`]
/// turns them, with the [`Gauges`] read at that moment, into the `GET /metrics` page. Every
/// counter only grows (Prometheus `counter`) for the life of the process.
#[derive(Debug, Default, Clone)]
pub struct Metrics {
    /// TCP connections accepted.
    pub accepted: u64,
    /// Connections refused (503, or closed at once far over the limit) because the server was full.
    pub refused_full: u64,
    /// Connections refused (503, or closed at once far over the limit) because their address had
    /// `--max-connections-per-ip` open.
    pub refused_per_ip: u64,
    /// `accept()` calls that failed (e.g. EMFILE).
    pub accept_errors: u64,
    /// HTTP requests answered (each one of a pipelined or keep-alive series counts).
    pub http_requests: u64,
    /// HTTP requests answered with a 4xx or 5xx status.
    pub http_errors: u64,
    /// WebSocket upgrades accepted (101 sent).
    pub ws_upgrades: u64,
    /// WebSocket frames received (data and control).
    pub frames_in: u64,
    /// WebSocket frames queued to clients (a broadcast counts once per recipient).
    pub frames_out: u64,
    /// WebSocket upgrades that negotiated permessage-deflate.
    pub ws_deflate: u64,
    /// Client messages inflated.
    pub inflated: u64,
    /// Messages compressed (once per broadcast, whatever the audience).
    pub compressed: u64,
    /// Frames queued with RSV1 (compressed).
    pub frames_out_compressed: u64,
    /// Bytes read from sockets (as on the wire: TLS records count with their overhead).
    pub bytes_in: u64,
    /// Bytes written to sockets.
    pub bytes_out: u64,
    /// Write calls (`sendmsg`/`send`): at most one per connection per loop iteration.
    pub writes: u64,
    /// Connections closed because their output queue went over its byte limit.
    pub slow_consumers: u64,
    /// Connections closed by a timeout (request, idle or pong).
    pub timeouts: u64,
    /// WebSocket closes, one slot per code of `CLOSE_CODES` in order, the last slot for any other
    /// code; bumped by [`Metrics::close`].
    pub closes: [u64; CLOSE_CODES.len() + 1],
    /// Returns from `poll` (I/O events or a timer deadline).
    pub wakeups: u64,
    loop_buckets: [u64; LOOP_BUCKETS_US.len() + 1],
    loop_sum_us: u64,
}

/// Gauges read at render time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Gauges {
    /// TCP connections open, HTTP and WebSocket.
    pub connections: usize,
    /// Connections that completed the WebSocket upgrade and are open.
    pub websockets: usize,
    /// Armed timers in the loop's per-connection wheel (the hub's are in `hub.timers`).
    pub conn_timers: usize,
    /// The hub's live object counts and counters.
    pub hub: HubStats,
    /// Cluster mode: (Redis reachable, requests waiting for Redis).
    pub cluster: Option<(bool, usize)>,
}

impl Metrics {
    /// Counts one WebSocket close with close `code` (an uncounted code goes to "other").
    pub fn close(&mut self, code: u16) {
        let i = CLOSE_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(CLOSE_CODES.len());
        self.closes[i] += 1;
    }

    /// Adds one loop iteration that took `us` microseconds to the histogram.
    pub fn loop_time(&mut self, us: u64) {
        let i = LOOP_BUCKETS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(LOOP_BUCKETS_US.len());
        self.loop_buckets[i] += 1;
        self.loop_sum_us += us;
    }

    /// The Prometheus text exposition (format 0.0.4) of these counters and `g`.
    pub fn render(&self, g: &Gauges) -> String {
        let mut s = String::with_capacity(4096);
        let mut one = |name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(
                s,
                "# HELP chatloop_{name} {help}\n# TYPE chatloop_{name} {kind}\nchatloop_{name} {v}"
            );
        };
        one(
            "connections",
            "gauge",
            "Open TCP connections.",
            g.connections as u64,
        );
        one(
            "websockets",
            "gauge",
            "Open WebSocket connections.",
            g.websockets as u64,
        );
        one("rooms", "gauge", "Live rooms.", g.hub.rooms as u64);
        one("sessions", "gauge", "Live sessions.", g.hub.sessions as u64);
        one(
            "room_members",
            "gauge",
            "WebSocket members in all rooms.",
            g.hub.members as u64,
        );
        if let Some((up, waiting)) = g.cluster {
            one(
                "redis_up",
                "gauge",
                "Cluster mode: 1 while this node reaches Redis.",
                u64::from(up),
            );
            one(
                "redis_waiting_requests",
                "gauge",
                "Cluster mode: requests waiting for Redis (facts or acknowledgements).",
                waiting as u64,
            );
        }
        one(
            "timers_armed",
            "gauge",
            "Live timers in both timer wheels (connections and hub); cancelled and fired ones are gone.",
            (g.conn_timers + g.hub.timers) as u64,
        );
        one(
            "connections_accepted_total",
            "counter",
            "TCP connections accepted.",
            self.accepted,
        );
        one(
            "connections_refused_total",
            "counter",
            "Connections refused with 503 because the server was full.",
            self.refused_full,
        );
        one(
            "connections_refused_per_ip_total",
            "counter",
            "Connections refused (503, or closed at once far over the limit) because their address had --max-connections-per-ip open.",
            self.refused_per_ip,
        );
        one(
            "accept_errors_total",
            "counter",
            "accept() failures (e.g. EMFILE).",
            self.accept_errors,
        );
        one(
            "http_requests_total",
            "counter",
            "HTTP requests answered.",
            self.http_requests,
        );
        one(
            "http_errors_total",
            "counter",
            "HTTP requests answered with a 4xx or 5xx status.",
            self.http_errors,
        );
        one(
            "ws_upgrades_total",
            "counter",
            "WebSocket upgrades accepted.",
            self.ws_upgrades,
        );
        one(
            "frames_in_total",
            "counter",
            "WebSocket frames received.",
            self.frames_in,
        );
        one(
            "frames_out_total",
            "counter",
            "WebSocket frames queued to clients.",
            self.frames_out,
        );
        one(
            "ws_deflate_total",
            "counter",
            "WebSocket upgrades that negotiated permessage-deflate.",
            self.ws_deflate,
        );
        one(
            "messages_inflated_total",
            "counter",
            "Compressed client messages inflated.",
            self.inflated,
        );
        one(
            "messages_compressed_total",
            "counter",
            "Messages compressed (once per broadcast frame, however many recipients).",
            self.compressed,
        );
        one(
            "frames_out_compressed_total",
            "counter",
            "WebSocket frames queued to clients compressed (RSV1).",
            self.frames_out_compressed,
        );
        one(
            "bytes_in_total",
            "counter",
            "Bytes read from sockets.",
            self.bytes_in,
        );
        one(
            "bytes_out_total",
            "counter",
            "Bytes written to sockets.",
            self.bytes_out,
        );
        one(
            "writes_total",
            "counter",
            "Write system calls (one sendmsg or send per connection per iteration).",
            self.writes,
        );
        one(
            "messages_total",
            "counter",
            "Messages stored in room histories (chat, joins, leaves).",
            g.hub.messages,
        );
        one(
            "rate_limited_total",
            "counter",
            "Chat messages refused by the rate limit.",
            g.hub.rate_limited,
        );
        one(
            "slow_consumers_total",
            "counter",
            "Connections closed because their output queue overflowed.",
            self.slow_consumers,
        );
        one(
            "timeouts_total",
            "counter",
            "Connections closed by a timeout (request, idle, pong).",
            self.timeouts,
        );
        one(
            "rooms_expired_total",
            "counter",
            "Rooms deleted after inactivity.",
            g.hub.rooms_expired,
        );
        one(
            "messages_expired_total",
            "counter",
            "History entries dropped for their room's message_ttl.",
            g.hub.messages_expired,
        );
        one(
            "sessions_expired_total",
            "counter",
            "Sessions ended by expiry.",
            g.hub.sessions_expired,
        );
        one(
            "loop_wakeups_total",
            "counter",
            "Returns from poll (I/O events or timer deadlines).",
            self.wakeups,
        );
        let _ = writeln!(
            s,
            "# HELP chatloop_ws_closes_total WebSocket closes by close code.\n# TYPE chatloop_ws_closes_total counter"
        );
        for (i, n) in self.closes.iter().enumerate() {
            let code = CLOSE_CODES
                .get(i)
                .map_or("other".to_string(), u16::to_string);
            let _ = writeln!(s, "chatloop_ws_closes_total{{code=\"{code}\"}} {n}");
        }
        let _ = writeln!(
            s,
            "# HELP chatloop_loop_iteration_seconds Time spent handling one poll wakeup.\n# TYPE chatloop_loop_iteration_seconds histogram"
        );
        let mut cum = 0;
        for (i, n) in self.loop_buckets.iter().enumerate() {
            cum += n;
            let le = LOOP_BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| format!("{}", *us as f64 / 1e6));
            let _ = writeln!(
                s,
                "chatloop_loop_iteration_seconds_bucket{{le=\"{le}\"}} {cum}"
            );
        }
        let _ = writeln!(
            s,
            "chatloop_loop_iteration_seconds_sum {}",
            self.loop_sum_us as f64 / 1e6
        );
        let _ = writeln!(s, "chatloop_loop_iteration_seconds_count {cum}");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let mut m = Metrics::default();
        m.close(1000);
        m.close(4000);
        m.loop_time(7);
        m.loop_time(2_000_000);
        let text = m.render(&Gauges {
            connections: 3,
            ..Gauges::default()
        });
        assert!(text.contains("chatloop_connections 3\n"));
        assert!(text.contains("chatloop_ws_closes_total{code=\"1000\"} 1\n"));
        assert!(text.contains("chatloop_ws_closes_total{code=\"other\"} 1\n"));
        assert!(text.contains("chatloop_loop_iteration_seconds_bucket{le=\"0.00001\"} 1\n"));
        assert!(text.contains("chatloop_loop_iteration_seconds_bucket{le=\"+Inf\"} 2\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
