//! `floor`: the kernel's floor for fan-out. M loopback TCP pairs per room; a writer thread (the
//! "server") writes one pre-framed WebSocket text frame, shaped like a chatloop chat frame, to
//! every socket of a room with one write(2) each, at the fanout scenario's rate; reader threads
//! receive them exactly as `fanout` members do. Reports the writer's CPU per delivery.
//!
//! With `--relay`, the writer does not keep time itself: a trigger thread on the readers' CPU
//! (where `fanout`'s senders run) takes the timestamp at the scheduled time and sends it over
//! one more loopback TCP connection, and the writer, blocked in `read`, fans out when it
//! arrives. That adds what any server has in front of its fan-out: the inbound hop and
//! waking the writer's CPU, which a writer that sleeps until the scheduled time and only
//! then takes the timestamp leaves out of its latency.

use crate::args::Args;
use crate::clock::{self, now_ns};
use crate::fanout::{collect_ready, delivery_report, join_workers, run_window};
use crate::members::{Control, Member, WorkerConfig, run_worker, send_time};
use crate::report::{self, Obj, ServerWatch};
use crate::ws;
use crate::wsclient::WsClient;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, mpsc};
use std::time::Duration;

/// Payload of a chat frame like chatloop's, carrying `"<ts> <seq>"`, padded to about `size` bytes.
pub fn chat_payload(ts: u64, seq: u64, size: usize) -> String {
    let head = r#"{"id":"0198c3a2-7f10-7c5a-9f4b-3d2e1f0a9b8c","type":"chat","user":""#;
    let tail = format!(
        r#"","user_id":"3f9a1c2b","message":"{ts} {seq}","timestamp":"2025-08-19T13:45:00.123456Z","room_id":"a1b2c3d4e5"}}"#
    );
    let name_len = size.saturating_sub(head.len() + tail.len()).max(1);
    let mut s = String::with_capacity(size);
    s.push_str(head);
    s.extend(std::iter::repeat_n('u', name_len));
    s.push_str(&tail);
    s
}

/// `fanout`'s send schedule ([`send_time`]), all rooms in one sequence.
struct Schedule {
    go: u64,
    end: u64,
    rate: f64,
    next_k: Vec<u64>,
}

impl Schedule {
    fn new(go: u64, end: u64, rate: f64, rooms: usize) -> Schedule {
        Schedule {
            go,
            end,
            rate,
            next_k: vec![0; rooms],
        }
    }

    /// The earliest message not yet sent over all rooms: (room, k, due), until the end.
    fn next(&mut self) -> Option<(usize, u64, u64)> {
        let n = self.next_k.len();
        let (r, t) = (0..n)
            .map(|r| (r, send_time(self.go, self.rate, r, n, self.next_k[r])))
            .min_by_key(|&(_, t)| t)?;
        if t >= self.end {
            return None;
        }
        let k = self.next_k[r];
        self.next_k[r] += 1;
        Some((r, k, t))
    }
}

/// Blocks until the window's start time is set; `None` if stopped first.
fn wait_for_go(ctl: &Control) -> Option<u64> {
    loop {
        match ctl.go_ns.load(Relaxed) {
            0 if ctl.stop.load(Relaxed) => return None,
            0 => std::thread::sleep(Duration::from_millis(1)),
            go => return Some(go),
        }
    }
}

/// `--relay`: takes each message's timestamp at its scheduled time and sends it to the writer.
fn trigger(
    ctl: Arc<Control>,
    mut to_writer: TcpStream,
    rate: f64,
    rooms: usize,
    cpu: Option<usize>,
) -> Result<(), String> {
    if let Some(c) = cpu {
        crate::sys::pin_current_thread(c)
            .map_err(|e| format!("pinning trigger to CPU {c}: {e}"))?;
    }
    let Some(go) = wait_for_go(&ctl) else {
        return Ok(());
    };
    let mut schedule = Schedule::new(go, ctl.send_end(), rate, rooms);
    while let Some((r, k, t)) = schedule.next() {
        if ctl.stop.load(Relaxed) {
            break;
        }
        std::thread::sleep(clock::until(t));
        let mut msg = [0u8; 24];
        msg[..8].copy_from_slice(&now_ns().to_le_bytes());
        msg[8..16].copy_from_slice(&(r as u64).to_le_bytes());
        msg[16..].copy_from_slice(&k.to_le_bytes());
        to_writer
            .write_all(&msg)
            .map_err(|e| format!("trigger write: {e}"))?;
    }
    Ok(()) // dropping the socket tells the writer that the schedule is over
}

#[derive(Default)]
struct WriterResult {
    writes_in_window: u64,
    total_us: u64,
    user_us: u64,
    sys_us: u64,
    write_errors: u64,
}

fn writer(
    ctl: Arc<Control>,
    rooms: Vec<Vec<TcpStream>>,
    rate: f64,
    size: usize,
    cpu: Option<usize>,
    mut relay: Option<TcpStream>,
    writev: bool,
) -> Result<(WriterResult, Vec<Vec<TcpStream>>), String> {
    if let Some(c) = cpu {
        crate::sys::pin_current_thread(c).map_err(|e| format!("pinning writer to CPU {c}: {e}"))?;
    }
    let mut res = WriterResult::default();
    let Some(go) = wait_for_go(&ctl) else {
        return Ok((res, rooms));
    };
    let (start, end) = (ctl.measure_start(), ctl.send_end());
    let mut schedule = Schedule::new(go, end, rate, rooms.len());
    let mut dead = vec![false; rooms.iter().map(Vec::len).sum()];
    let mut cpu0: Option<(u64, u64, u64)> = None;
    let mut frame = Vec::with_capacity(size + 16);
    loop {
        if ctl.stop.load(Relaxed) {
            break;
        }
        let (r, k, mut ts) = match relay.as_mut() {
            None => {
                let Some((r, k, t)) = schedule.next() else {
                    break;
                };
                std::thread::sleep(clock::until(t));
                (r, k, now_ns())
            }
            Some(from) => {
                let mut msg = [0u8; 24];
                if from.read_exact(&mut msg).is_err() {
                    break; // the trigger is done
                }
                let word = |i: usize| {
                    u64::from_le_bytes(msg[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                };
                (word(1) as usize % rooms.len(), word(2), word(0))
            }
        };
        // "In the window" is decided by the embedded timestamp, exactly as receivers do.
        let in_window = ts >= start && ts < end;
        if in_window && cpu0.is_none() {
            let (u, s) = crate::sys::thread_cpu_us();
            cpu0 = Some((u, s, crate::sys::thread_cpu_total_us()));
            if relay.is_none() {
                ts = now_ns();
            }
        }
        frame.clear();
        ws::encode_server_frame(
            &mut frame,
            ws::OP_TEXT,
            chat_payload(ts, k, size).as_bytes(),
        );
        let base: usize = rooms[..r].iter().map(Vec::len).sum();
        for (j, s) in rooms[r].iter().enumerate() {
            if dead[base + j] {
                continue;
            }
            let mut s: &TcpStream = s;
            let wrote = if writev {
                ViaWritev(s).write_all(&frame)
            } else {
                s.write_all(&frame)
            };
            if wrote.is_err() {
                dead[base + j] = true;
                res.write_errors += 1;
            } else if in_window {
                res.writes_in_window += 1;
            }
        }
        ctl.sent[r].fetch_add(1, Relaxed);
        if in_window {
            ctl.sent_measured[r].fetch_add(1, Relaxed);
        }
    }
    if let Some((u0, s0, t0)) = cpu0 {
        let (u1, s1) = crate::sys::thread_cpu_us();
        res.user_us = u1.saturating_sub(u0);
        res.sys_us = s1.saturating_sub(s0);
        res.total_us = crate::sys::thread_cpu_total_us().saturating_sub(t0);
    }
    // The sockets go back to the caller, which closes them only after the readers stopped
    // (closing them early would look like a server hanging up).
    Ok((res, rooms))
}

/// `--writev`: a socket whose writes are one-slice `writev`s (the file layer's call) rather
/// than `send`, so `write_all` does the retrying exactly as for the default.
struct ViaWritev<'a>(&'a TcpStream);

impl Write for ViaWritev<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let mut s = self.0;
        s.write_vectored(&[std::io::IoSlice::new(b)])
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub fn run(a: &Args) -> Result<Obj, String> {
    let rooms = a.u64_or("rooms", 1)?.max(1) as usize;
    let members = a.u64_or("members", 10)?.max(1) as usize;
    let rate = a.f64_or("rate", 10.0)?;
    let duration = a.dur_or("duration", Duration::from_secs(10))?;
    let warmup = a.dur_or("warmup", Duration::from_secs(2))?;
    let drain = a.dur_or("drain", Duration::from_secs(3))?;
    let threads = a.u64_or("threads", 1)?.clamp(1, 64) as usize;
    let size = a.u64_or("frame-bytes", 200)?.clamp(100, 60_000) as usize;
    let writer_cpu = a.opt_u64("writer-cpu")?.map(|c| c as usize);
    let relay = a.flag("relay");
    let writev = a.flag("writev");
    let reader_cpu = a.opt_u64("reader-cpu")?.map(|c| c as usize);
    a.finish()?;
    if rate <= 0.0 {
        return Err("--rate must be > 0".into());
    }
    let total = rooms * members;
    let limit = crate::sys::raise_nofile().map_err(|e| format!("raising RLIMIT_NOFILE: {e}"))?;
    if 2 * total as u64 + 64 > limit {
        return Err(format!(
            "{total} socket pairs need more than the open-file limit {limit}"
        ));
    }
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("listen: {e}"))?;
    let laddr = listener.local_addr().map_err(|e| e.to_string())?;
    let mut server_side: Vec<Vec<TcpStream>> = (0..rooms).map(|_| Vec::new()).collect();
    let mut groups: Vec<Vec<Member>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..total {
        let c = TcpStream::connect_timeout(&laddr, Duration::from_secs(5))
            .map_err(|e| format!("connect pair {i}: {e}"))?;
        let (s, _) = listener
            .accept()
            .map_err(|e| format!("accept pair {i}: {e}"))?;
        for x in [&c, &s] {
            x.set_nodelay(true).map_err(|e| e.to_string())?;
        }
        s.set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        c.set_nonblocking(true).map_err(|e| e.to_string())?;
        let ws = WsClient::from_open(mio::net::TcpStream::from_std(c), i as u64 + 1);
        server_side[i / members].push(s);
        groups[i % threads].push(Member::already_open(i / members, false, ws));
    }
    drop(listener);

    let ctl = Arc::new(Control::new(rooms, warmup, duration));
    let (tx, rx) = mpsc::channel();
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let (ctl, tx) = (ctl.clone(), tx.clone());
            let cfg = WorkerConfig {
                rooms,
                rate_per_room: 0.0,
                connect_timeout: Duration::from_secs(5),
                connect_parallel: 1,
                cpu: reader_cpu,
            };
            std::thread::spawn(move || run_worker(cfg, ctl, g, tx))
        })
        .collect();
    let (relay_in, th) = if relay {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("listen: {e}"))?;
        let out = TcpStream::connect(l.local_addr().map_err(|e| e.to_string())?)
            .map_err(|e| format!("relay connect: {e}"))?;
        let (inp, _) = l.accept().map_err(|e| format!("relay accept: {e}"))?;
        for x in [&out, &inp] {
            x.set_nodelay(true).map_err(|e| e.to_string())?;
        }
        let tctl = ctl.clone();
        let th = std::thread::spawn(move || trigger(tctl, out, rate, rooms, reader_cpu));
        (Some(inp), Some(th))
    } else {
        (None, None)
    };
    let wctl = ctl.clone();
    let wh = std::thread::spawn(move || {
        writer(wctl, server_side, rate, size, writer_cpu, relay_in, writev)
    });
    let (per_room, failures, samples) =
        collect_ready(&rx, threads, rooms, Duration::from_secs(15))?;
    if failures > 0 {
        ctl.stop.store(true, Relaxed);
        return Err(format!(
            "{failures} socket pairs failed to register: {samples:?}"
        ));
    }
    let mut o = Obj::new();
    o.insert("scenario".into(), json!("floor"));
    o.insert("relay".into(), json!(relay));
    o.insert("writev".into(), json!(writev));
    o.insert("ok".into(), json!(true));
    o.insert("rooms".into(), json!(rooms));
    o.insert("members".into(), json!(members));
    o.insert("rate_per_room".into(), json!(rate));
    o.insert("duration_s".into(), json!(duration.as_secs_f64()));
    o.insert("warmup_s".into(), json!(warmup.as_secs_f64()));
    let mut no_watch = ServerWatch::new(None)?;
    let (w, _) = run_window(&ctl, &per_room, drain, &mut no_watch, &mut o, "delivery");
    if let Some(th) = th {
        th.join()
            .map_err(|_| "trigger thread panicked".to_string())??;
    }
    let writer_result = wh.join().map_err(|_| "writer thread panicked".to_string());
    let st = join_workers(handles)?;
    let (wr, sockets) = writer_result??;
    drop(sockets);
    let summary = delivery_report(&mut o, &st, &w, duration);
    let pu = report::round(
        report::ratio(wr.user_us as f64, wr.writes_in_window as f64),
        3,
    );
    let ps = report::round(
        report::ratio(wr.sys_us as f64, wr.writes_in_window as f64),
        3,
    );
    o.insert("writer_writes_in_window".into(), json!(wr.writes_in_window));
    o.insert("writer_utime_us".into(), json!(wr.user_us));
    o.insert("writer_stime_us".into(), json!(wr.sys_us));
    o.insert("writer_cpu_total_us".into(), json!(wr.total_us));
    o.insert(
        "writer_total_us_per_delivery".into(),
        json!(report::round(
            report::ratio(wr.total_us as f64, wr.writes_in_window as f64),
            3
        )),
    );
    o.insert("writer_user_us_per_delivery".into(), json!(pu));
    o.insert("writer_sys_us_per_delivery".into(), json!(ps));
    o.insert("writer_write_errors".into(), json!(wr.write_errors));
    o.insert("frame_payload_bytes".into(), json!(size));
    eprintln!(
        "floor {rooms}x{members} @ {rate}/s/room, {size}-byte frames, {:.1}s window:\n{summary}\n\
         writer CPU in window: user {}us sys {}us (precise total {}us) over {} writes => per delivery: user {pu}us sys {ps}us",
        duration.as_secs_f64(),
        wr.user_us,
        wr.sys_us,
        wr.total_us,
        wr.writes_in_window
    );
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_json_of_the_requested_size() {
        let p = chat_payload(123, 4, 200);
        assert_eq!(p.len(), 200);
        let v: serde_json::Value = serde_json::from_str(&p).unwrap();
        assert_eq!(v["message"], "123 4");
        assert_eq!(v["type"], "chat");
    }
}
