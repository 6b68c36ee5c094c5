//! Output: one JSON line on stdout (machine readable), a readable summary on stderr.

use crate::hist::Histogram;
use crate::sys::{ProcSample, sample_process};
use serde_json::{Map, Value, json};

pub type Obj = Map<String, Value>;

/// Adds `{prefix}_p50_us`, `_p90_us`, `_p99_us`, `_p999_us`, `_max_us`, `_mean_us`, `_count`.
pub fn add_latency(o: &mut Obj, prefix: &str, h: &Histogram) {
    o.insert(format!("{prefix}_count"), json!(h.count()));
    for (name, p) in [("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p999", 99.9)] {
        o.insert(format!("{prefix}_{name}_us"), json!(h.p_us(p)));
    }
    o.insert(format!("{prefix}_max_us"), json!(h.max_us()));
    o.insert(format!("{prefix}_mean_us"), json!(h.mean_us()));
}

/// Adds `{prefix}_dist`: `[[percentile, us], ..]`, the whole latency-by-percentile curve
/// (`Histogram::distribution`, 20 points per decade), for `tools/latplot.py`.
pub fn add_distribution(o: &mut Obj, prefix: &str, h: &Histogram) {
    let d: Vec<Value> = h
        .distribution(20)
        .into_iter()
        .map(|(p, us)| json!([p, us]))
        .collect();
    o.insert(format!("{prefix}_dist"), Value::Array(d));
}

pub fn latency_line(h: &Histogram) -> String {
    format!(
        "p50 {:.1}us  p90 {:.1}us  p99 {:.1}us  p99.9 {:.1}us  max {:.1}us  (n={})",
        h.p_us(50.0),
        h.p_us(90.0),
        h.p_us(99.0),
        h.p_us(99.9),
        h.max_us(),
        h.count()
    )
}

pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 { 0.0 } else { a / b }
}

/// Optional sampling of the server process (`--server-pid`) around the measured window;
/// `--extra-pids A,B` adds more processes (other cluster nodes, Redis) to the sums.
pub struct ServerWatch {
    pids: Vec<u32>,
    start: Option<ProcSample>,
}

impl ServerWatch {
    pub fn new(pid: Option<u64>) -> Result<ServerWatch, String> {
        let pids: Vec<u32> = pid.map(|p| p as u32).into_iter().collect();
        for &p in &pids {
            sample_process(p).map_err(|e| format!("--server-pid {p}: {e}"))?;
        }
        Ok(ServerWatch { pids, start: None })
    }

    /// Also samples these processes (summed with the server's).
    pub fn with_extra(mut self, extra: Option<String>) -> Result<ServerWatch, String> {
        for p in extra
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
        {
            let p: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("--extra-pids: {p:?} is not a pid"))?;
            sample_process(p).map_err(|e| format!("--extra-pids {p}: {e}"))?;
            self.pids.push(p);
        }
        Ok(self)
    }

    pub fn sample(&self) -> Option<ProcSample> {
        let mut sum = ProcSample {
            utime_us: 0,
            stime_us: 0,
            rss_bytes: 0,
        };
        if self.pids.is_empty() {
            return None;
        }
        for &p in &self.pids {
            let s = sample_process(p).ok()?;
            sum.utime_us += s.utime_us;
            sum.stime_us += s.stime_us;
            sum.rss_bytes += s.rss_bytes;
        }
        Some(sum)
    }

    pub fn begin(&mut self) {
        self.start = self.sample();
    }

    /// Adds server CPU over the window (user/sys, total and per `ops` of kind `per`) and RSS.
    pub fn end(&self, o: &mut Obj, ops: u64, per: &str) -> String {
        let (Some(a), Some(b)) = (self.start, self.sample()) else {
            return String::new();
        };
        let ut = b.utime_us.saturating_sub(a.utime_us);
        let st = b.stime_us.saturating_sub(a.stime_us);
        o.insert("server_utime_us".into(), json!(ut));
        o.insert("server_stime_us".into(), json!(st));
        o.insert("server_rss_bytes".into(), json!(b.rss_bytes));
        let pu = round(ratio(ut as f64, ops as f64), 3);
        let ps = round(ratio(st as f64, ops as f64), 3);
        o.insert(format!("server_user_us_per_{per}"), json!(pu));
        o.insert(format!("server_sys_us_per_{per}"), json!(ps));
        format!(
            "server CPU in window: user {ut}us sys {st}us => per {per}: user {pu}us sys {ps}us; RSS {} KiB",
            b.rss_bytes / 1024
        )
    }
}

/// Measures how busy loadgen itself was over a window (all its threads, as a share of one core).
pub struct SelfBusy {
    cpu0: u64,
    t0: u64,
}

impl SelfBusy {
    pub fn start() -> SelfBusy {
        SelfBusy {
            cpu0: crate::sys::process_cpu_us(),
            t0: crate::clock::now_ns(),
        }
    }

    /// Adds `loadgen_busy` (CPU seconds per wall second); returns a warning line when it is
    /// high enough that loadgen, not the server, may be what limits the numbers.
    pub fn end(&self, o: &mut Obj) -> Option<String> {
        let cpu = crate::sys::process_cpu_us().saturating_sub(self.cpu0) as f64;
        let wall = (crate::clock::now_ns().saturating_sub(self.t0) as f64 / 1000.0).max(1.0);
        let busy = round(cpu / wall, 3);
        o.insert("loadgen_busy".into(), json!(busy));
        (busy > 0.8).then(|| {
            format!(
                "warning: loadgen used {:.0}% of a core in the window: it may be the bottleneck",
                busy * 100.0
            )
        })
    }
}

pub fn emit(o: Obj) {
    println!("{}", Value::Object(o));
}
