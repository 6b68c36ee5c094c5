//! `fanout`: R rooms x M members over real WebSockets; S senders per room send chat at a fixed
//! rate; every member (sender included) receives it; latency, loss and duplicates are measured.

use crate::args::{Args, loopback_src};
use crate::clock::{self, now_ns};
use crate::http;
use crate::members::{Control, Member, Ready, Stats, Target, WorkerConfig, run_worker};
use crate::report::{self, Obj, ServerWatch};
use serde_json::json;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, mpsc};
use std::time::Duration;

pub const DEFAULT_CHAT_RATE: f64 = 20.0;

/// Joins workers, collecting their stats; errors are reported, not panicked on.
pub fn join_workers(
    handles: Vec<std::thread::JoinHandle<Result<Stats, String>>>,
) -> Result<Stats, String> {
    let mut all = Stats::default();
    for h in handles {
        all.merge(
            h.join()
                .map_err(|_| "worker thread panicked".to_string())??,
        );
    }
    Ok(all)
}

/// Waits for one `Ready` per worker; returns members connected per room, failures, samples.
pub fn collect_ready(
    rx: &mpsc::Receiver<Ready>,
    workers: usize,
    rooms: usize,
    timeout: Duration,
) -> Result<(Vec<u64>, u64, Vec<String>), String> {
    let mut per_room = vec![0; rooms];
    let (mut failures, mut samples) = (0, Vec::new());
    for _ in 0..workers {
        let r = rx
            .recv_timeout(timeout)
            .map_err(|_| "a worker did not finish connecting in time".to_string())?;
        for (a, b) in per_room.iter_mut().zip(r.per_room) {
            *a += b;
        }
        failures += r.failures;
        samples.extend(r.failure_samples);
    }
    samples.truncate(5);
    Ok((per_room, failures, samples))
}

/// Everything after the connect phase, shared with `floor`: go, window, drain, results.
pub struct Window {
    pub expected: u64,
    pub expected_measured: u64,
    pub sent: u64,
    pub sent_measured: u64,
    pub drained_in_ns: u64,
}

/// Sets the start time, sleeps through warm-up and the window (sampling the server at both ends
/// if asked), then waits for the last deliveries (bounded by `drain`) and stops the workers.
pub fn run_window(
    ctl: &Control,
    per_room: &[u64],
    drain: Duration,
    watch: &mut ServerWatch,
    obj: &mut Obj,
    ops_label: &str,
) -> (Window, String) {
    ctl.go_ns.store(now_ns() + 100_000_000, Relaxed);
    std::thread::sleep(clock::until(ctl.measure_start()));
    watch.begin();
    std::thread::sleep(clock::until(ctl.send_end()));
    let sum = |v: &[std::sync::atomic::AtomicU64]| -> (u64, u64) {
        let sent: u64 = v.iter().map(|x| x.load(Relaxed)).sum();
        let exp: u64 = v
            .iter()
            .zip(per_room)
            .map(|(x, m)| x.load(Relaxed) * m)
            .sum();
        (sent, exp)
    };
    // Give senders a moment to finish the last scheduled sends.
    std::thread::sleep(Duration::from_millis(20));
    let (sent, expected) = sum(&ctl.sent);
    let (sent_measured, expected_measured) = sum(&ctl.sent_measured);
    let cpu_line = watch.end(obj, expected_measured, ops_label);
    let drain_end = now_ns() + drain.as_nanos() as u64;
    let t0 = now_ns();
    while ctl.delivered.load(Relaxed) < expected && now_ns() < drain_end {
        std::thread::sleep(Duration::from_millis(5));
    }
    let drained_in_ns = now_ns() - t0;
    ctl.stop.store(true, Relaxed);
    (
        Window {
            expected,
            expected_measured,
            sent,
            sent_measured,
            drained_in_ns,
        },
        cpu_line,
    )
}

/// Adds delivery, loss and latency fields common to `fanout` and `floor`; returns summary text.
pub fn delivery_report(o: &mut Obj, st: &Stats, w: &Window, duration: Duration) -> String {
    let lost = w.expected.saturating_sub(st.delivered);
    let dps = st.delivered_measured as f64 / duration.as_secs_f64();
    o.insert("sent".into(), json!(w.sent));
    o.insert("sent_measured".into(), json!(w.sent_measured));
    o.insert("expected".into(), json!(w.expected));
    o.insert("delivered".into(), json!(st.delivered));
    o.insert("expected_measured".into(), json!(w.expected_measured));
    o.insert("delivered_measured".into(), json!(st.delivered_measured));
    o.insert("lost".into(), json!(lost));
    o.insert(
        "loss_ratio".into(),
        json!(report::round(
            report::ratio(lost as f64, w.expected as f64),
            6
        )),
    );
    o.insert("duplicates".into(), json!(st.duplicates));
    o.insert("deliveries_per_s".into(), json!(report::round(dps, 1)));
    o.insert(
        "drain_ms".into(),
        json!(report::round(w.drained_in_ns as f64 / 1e6, 1)),
    );
    o.insert("chat_frame_bytes".into(), json!(st.chat_frame_bytes));
    o.insert("foreign_chat".into(), json!(st.foreign_chat));
    o.insert("bad_frames".into(), json!(st.bad_frames));
    o.insert("send_errors".into(), json!(st.send_errors));
    o.insert("error_frames".into(), json!(st.error_frames));
    o.insert("other_frames".into(), json!(st.other_frames));
    o.insert("members_lost".into(), json!(st.lost_members));
    let busy = report::ratio(
        st.busiest_thread_cpu_us as f64,
        duration.as_secs_f64() * 1e6,
    );
    o.insert("loadgen_window_cpu_us".into(), json!(st.window_cpu_us));
    o.insert(
        "loadgen_busiest_thread_busy".into(),
        json!(report::round(busy, 3)),
    );
    report::add_latency(o, "lat", &st.latency);
    report::add_distribution(o, "lat", &st.latency);
    let mut s = format!(
        "sent {} msgs ({} in window); delivered {} of {} expected (lost {}, dup {}); {:.0} deliveries/s in window\n\
         latency: {}",
        w.sent,
        w.sent_measured,
        st.delivered,
        w.expected,
        lost,
        st.duplicates,
        dps,
        report::latency_line(&st.latency),
    );
    if st.send_lag.count() > 0 {
        report::add_latency(o, "send_lag", &st.send_lag);
        s.push_str(&format!(
            "\nsend lag (actual - scheduled): {}",
            report::latency_line(&st.send_lag)
        ));
    }
    if busy > 0.8 {
        s.push_str(&format!(
            "\nwarning: a loadgen thread was {:.0}% busy in the window: latency includes loadgen queueing",
            busy * 100.0
        ));
    }
    if !st.error_frames.is_empty() {
        s.push_str(&format!("\nerror frames: {:?}", st.error_frames));
    }
    if !st.lost_members.is_empty() {
        s.push_str(&format!(
            "\nmembers lost during the run: {:?}",
            st.lost_members
        ));
    }
    s
}

pub fn run(a: &Args) -> Result<Obj, String> {
    let addr = a.addr()?;
    let rooms = a.u64_or("rooms", 1)?.max(1) as usize;
    let members = a.u64_or("members", 10)?.max(1) as usize;
    let senders = (a.u64_or("senders", 1)?.max(1) as usize).min(members);
    let rate = a.f64_or("rate", 10.0)?;
    let duration = a.dur_or("duration", Duration::from_secs(10))?;
    let warmup = a.dur_or("warmup", Duration::from_secs(2))?;
    let drain = a.dur_or("drain", Duration::from_secs(3))?;
    let threads = a.u64_or("threads", 1)?.clamp(1, 64) as usize;
    let connect_timeout = a.dur_or("connect-timeout", Duration::from_secs(30))?;
    let parallel = a.u64_or("connect-parallel", 128)?.max(1) as usize;
    let src_ips = a.u64_or("src-ips", 4)? as usize;
    let mut watch =
        ServerWatch::new(a.opt_u64("server-pid")?)?.with_extra(a.opt_str("extra-pids")?)?;
    // Cluster runs: members connect round-robin to --addr and these other nodes.
    let mut nodes = vec![addr];
    for n in a
        .opt_str("nodes")?
        .iter()
        .flat_map(|s| s.split(','))
        .filter(|s| !s.is_empty())
    {
        nodes.push(crate::args::parse_loopback_addr(n.trim())?);
    }
    a.finish()?;

    let total = rooms * members;
    let limit = crate::sys::raise_nofile().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;
    if total as u64 + 64 > limit {
        return Err(format!(
            "{total} connections need more than the open-file limit {limit}"
        ));
    }
    if rate / senders as f64 > DEFAULT_CHAT_RATE {
        eprintln!(
            "warning: {:.1} msgs/s per sender exceeds chatloop's default --chat-rate ({DEFAULT_CHAT_RATE}/s); \
             use more --senders or start the server with a higher --chat-rate",
            rate / senders as f64
        );
    }
    eprintln!("fanout: creating {total} sessions and {rooms} rooms on {addr}");
    let sessions = http::create_sessions(addr, total, "fan", 4)?;
    let mut client = http::Client::new(addr);
    let room_ids = (0..rooms)
        .map(|r| client.create_room(&sessions[r * members]))
        .collect::<Result<Vec<_>, _>>()?;

    let ctl = Arc::new(Control::new(rooms, warmup, duration));
    // Senders read too (each gets its room's messages): they share the receivers' threads, a
    // room's senders all in one thread (its worker keeps that room's schedule), so no
    // thread of its own competes for the CPU with the readers (as none does in `floor`).
    let mut groups: Vec<Vec<Member>> = (0..threads).map(|_| Vec::new()).collect();
    for (r, room_id) in room_ids.iter().enumerate() {
        for m in 0..members {
            let i = r * members + m;
            let target = Target {
                addr: nodes[i % nodes.len()],
                path: format!("/ws/{}?session_id={}", room_id, sessions[i]),
                src: (src_ips > 0).then(|| loopback_src(i, src_ips, 0)),
            };
            let sender = m < senders;
            let g = if sender { r % threads } else { i % threads };
            groups[g].push(Member::to_connect(r, sender, target));
        }
    }
    eprintln!(
        "fanout: connecting {total} WebSockets ({} sender(s)/room, {threads} thread(s))",
        senders
    );
    let (tx, rx) = mpsc::channel();
    let t_connect = now_ns();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let (ctl, tx) = (ctl.clone(), tx.clone());
            let cfg = WorkerConfig {
                rooms,
                rate_per_room: rate,
                connect_timeout,
                connect_parallel: parallel,
                cpu: None,
            };
            std::thread::spawn(move || run_worker(cfg, ctl, g, tx))
        })
        .collect();
    let ready = collect_ready(
        &rx,
        threads,
        rooms,
        connect_timeout + Duration::from_secs(10),
    );
    let (per_room, failures, samples) = match ready {
        Ok(r) => r,
        Err(e) => {
            ctl.stop.store(true, Relaxed);
            return Err(e);
        }
    };
    let connected: u64 = per_room.iter().sum();
    let connect_s = clock::secs(now_ns() - t_connect);
    eprintln!(
        "fanout: {connected}/{total} members welcomed in {connect_s:.2}s, {failures} failed {samples:?}"
    );
    if connected == 0 {
        ctl.stop.store(true, Relaxed);
        let _ = join_workers(handles);
        return Err(format!("no member could connect: {samples:?}"));
    }
    let mut o = Obj::new();
    o.insert("scenario".into(), json!("fanout"));
    o.insert("ok".into(), json!(true));
    o.insert("rooms".into(), json!(rooms));
    o.insert("members".into(), json!(members));
    o.insert("senders".into(), json!(senders));
    o.insert("nodes".into(), json!(nodes.len()));
    o.insert("rate_per_room".into(), json!(rate));
    o.insert("duration_s".into(), json!(duration.as_secs_f64()));
    o.insert("warmup_s".into(), json!(warmup.as_secs_f64()));
    o.insert("connected".into(), json!(connected));
    o.insert("connect_failures".into(), json!(failures));
    o.insert("connect_failure_samples".into(), json!(samples));
    o.insert("connect_s".into(), json!(report::round(connect_s, 3)));

    let (w, cpu_line) = run_window(&ctl, &per_room, drain, &mut watch, &mut o, "delivery");
    let st = join_workers(handles)?;
    let summary = delivery_report(&mut o, &st, &w, duration);
    eprintln!(
        "fanout {rooms}x{members} @ {rate}/s/room, {senders} sender(s)/room, {:.1}s window:\n{summary}",
        duration.as_secs_f64()
    );
    if !cpu_line.is_empty() {
        eprintln!("{cpu_line}");
    }
    Ok(o)
}
